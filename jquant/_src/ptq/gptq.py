"""GPTQ (Frantar et al. 2022): quantize a weight column by column, feeding each column's error forward.

For a weight W met by inputs X (rows × K; K = the weight's contracted axes), the layer's output
error ‖XW − XQ‖² = tr((W − Q)ᵀ H (W − Q)) / 2 with H = 2XᵀX / rows. GPTQ quantizes the K rows
of W (the input channels) one at a time in a fixed order; after quantizing row k it moves the
rest of W by the optimal compensation −U[k, j] / U[k, k] · (w_k − q_k) for the rows j > k, where U
is the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU). Conventions:

* Damping: H + λ·mean(diag H)·I with λ = `damp` (default 0.01). An input channel that never
  fires (diag H = 0) gets H[k, k] = 1 and its weights are set to 0 (they cannot matter).
* Order: the contracted axes with the spec's group axis outermost, then the others in axis
  order (a Dense kernel (in, out) is just its `in` rows). `act_order=True` visits rows by
  decreasing diag H instead ("act-order").
* The grid: any `QuantSpec` (uniform sym/asym/mid-rise, sign, k-means, NF4; per tensor, channel
  or group). Scales and codebooks come from the weight itself as `jquant.quantize` computes them,
  at the start; with groups along a contracted axis (and no act-order) each group's scale or
  codebook is recomputed from the already-updated weights when GPTQ reaches the group, as in
  the paper. With act-order all groups are fixed at the start ("static groups").
* Output: a QArray with exactly GPTQ's values on the stored grid, and the relative output error
  tr(ΔᵀHΔ) / tr(WᵀHW) on the calibration inputs, next to round-to-nearest's for comparison.
* Float target (`reference=`, GPTAQ's asymmetric calibration, Li et al. 2025): in sequential
  PTQ the inputs X̃ a weight meets come from the partly quantized model, while the float model
  gives it X. GPTQ then fits Ŵ to the float model's output, min ‖X̃Ŵ − XW‖², which splits into
  ‖X̃(Ŵ − W*)‖² + const with the least-squares target W* = W + H̃⁻¹·X̃ᵀ(X − X̃)·W (H̃ = X̃ᵀX̃,
  damped as above, so W* = W exactly where X̃ = X): GPTQ of W* under H̃. Both errors are then
  ‖X̃Ŵ − XW‖² / ‖XW‖², the output error against the float model.
* Rotated specs (`QuantSpec(rotation=...)`, R along a contracted axis): GPTQ runs on W' = Rᵀ·W
  with the Hessian of the rotated inputs X·R, H' = Rᵀ·H·R (R acting on its axis of K), and
  the QArray stores Q(W') as `jquant.quantize` would; both errors are measured in the original
  basis (against rotated round-to-nearest). An equalized spec (`QuantSpec(equalization=...)`)
  likewise: W' = W / r with r from the weight (from W* with a float target) and H' = r·H·r (r
  along its axis of K), before any rotation: W' = Rᵀ·(W / r), H' = Rᵀ·(r·H·r)·R.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jquant._src import numerics, rotation
from jquant._src.qarray import QArray, quantize, to_stored_basis
from jquant._src.spec import QuantSpec, transformed, untransformed


class LayerError(NamedTuple):
    """A PTQ algorithm's relative output error on one weight's calibration inputs,
    tr(ΔᵀHΔ) / tr(WᵀHW) with Δ = W − Ŵ and H ∝ XᵀX, next to round-to-nearest's."""
    error: float
    rtn_error: float


def contraction_order(shape: Tuple[int, ...], contracted: Tuple[int, ...], spec: QuantSpec) -> Tuple[int, ...]:
    """The order K runs over the contracted axes: the spec's group axis (if contracted) first."""
    group_axis = numerics.layout(shape, spec).group_axis
    rest = sorted(a % len(shape) for a in contracted if a % len(shape) != group_axis)
    return ((group_axis,) if group_axis in [a % len(shape) for a in contracted] else ()) + tuple(rest)


def gptq_weight(w, xtx, rows: int, spec: QuantSpec, order: Tuple[int, ...], *, damp: float = 0.01,
                act_order: bool = False, reference=None) -> Tuple[QArray, LayerError]:
    """GPTQ of one weight.

    Args:
      w: float weight of any shape.
      xtx: Σ XᵀX (K, K) float32 of its inputs, K running over `order`.
      rows: number of input rows behind `xtx`.
      spec: the QuantSpec of the result.
      order: the contracted axes of `w`, in K order (`contraction_order`).
      damp: relative damping λ (> 0).
      act_order: visit input channels by decreasing diag H.
      reference: None, or (Σ X̃ᵀX, Σ XᵀX) (K, K) for the inputs X the float model gives this
        weight, row for row against the X̃ behind `xtx`: fit the float model's output XW
        (module docstring, "Float target").

    Returns:
      (the QArray, its LayerError).

    Raises:
      ValueError: `damp` ≤ 0; a rotated or equalized spec whose transform axis is not in `order`.
    """
    if not damp > 0:
        raise ValueError(f"gptq damp={damp} must be > 0")
    w = jnp.asarray(w)
    order = tuple(a % w.ndim for a in order)
    hessian = 2 * jnp.asarray(xtx, jnp.float32) / max(rows, 1)
    target = w.astype(jnp.float32)
    if reference is not None:  # W* = W + H̃⁻¹X̃ᵀ(X − X̃)W, H̃ damped as in _run
        cross, reference_xtx = (2 * jnp.asarray(a, jnp.float32) / max(rows, 1) for a in reference)
        to_rows, from_rows = matrix_view(w.shape, order)
        rows_w = to_rows(target)
        target = from_rows(rows_w + jnp.linalg.solve(_damped(hessian, damp), (cross - hessian) @ rows_w))
    stored_spec, target_hessian, eq_scale = spec, hessian, None
    if transformed(spec):  # GPTQ of W' under H' (module docstring)
        lay = numerics.layout(w.shape, spec)
        axis = lay.transform_axis
        if axis not in order:
            raise ValueError(f"gptq: {spec!r} rotates or equalizes axis {axis} of the weight of shape {w.shape}, "
                             f"which its inputs do not contract (contracted axes {order}); give a contracted axis")
        stored_spec = untransformed(spec)
        sizes, position = tuple(w.shape[a] for a in order), order.index(axis)
        target, eq_scale = to_stored_basis(target, spec, lay)
        if eq_scale is not None:
            target_hessian = _scaled_hessian(target_hessian, sizes, position, eq_scale, w.shape[axis])
        if spec.rotation is not None:
            target_hessian = _rotated_hessian(target_hessian, sizes, position, spec.rotation)
    values, grid = _run(target, target_hessian, stored_spec, order, float(damp), bool(act_order))
    values = values if transformed(spec) else values.astype(w.dtype)
    stored = quantize(values, stored_spec, scale=grid[0], zero_point=grid[1])
    qarray = QArray(stored.value, stored.scale, stored.zero_point, spec=spec, shape=w.shape, dtype=w.dtype,
                    eq_scale=eq_scale)
    rtn = quantize(w, spec).dequantize()
    if reference is None:
        return qarray, LayerError(_relative_error(w, qarray.dequantize(), hessian, order),
                                  _relative_error(w, rtn, hessian, order))
    return qarray, LayerError(_float_target_error(w, qarray.dequantize(), hessian, cross, reference_xtx, order),
                              _float_target_error(w, rtn, hessian, cross, reference_xtx, order))


def _damped(hessian, damp: float):
    """H + λ·mean(diag H)·I (module docstring, "Damping")."""
    return hessian + damp * jnp.mean(jnp.diag(hessian)) * jnp.eye(hessian.shape[0], dtype=hessian.dtype)


def _float_target_error(w, w_hat, hessian, cross, reference_xtx, order):
    """‖X̃Ŵ − XW‖² / ‖XW‖² from X̃ᵀX̃, X̃ᵀX and XᵀX (all scaled alike)."""
    to_rows, _ = matrix_view(w.shape, order)
    w, w_hat = to_rows(w.astype(jnp.float32)), to_rows(w_hat.astype(jnp.float32))
    reference = jnp.sum(w * (reference_xtx @ w))
    num = jnp.sum(w_hat * (hessian @ w_hat)) - 2 * jnp.sum(w_hat * (cross @ w)) + reference
    return float(jnp.maximum(num, 0.0) / jnp.where(reference == 0, 1.0, reference))


def _scaled_hessian(hessian, sizes, position, eq_scale, n):
    """r·H·r for H over K = the product of `sizes` (row-major), r (n values, `eq_scale`) along K's
    axis `position`.

    Raises:
      ValueError: r varies along more than that axis (a stacked weight)."""
    if eq_scale.size != n:
        raise ValueError(f"gptq: an equalization scale of shape {eq_scale.shape} varies along more than the "
                         "contracted axis (a stack of layers); quantize each layer's weight on its own")
    shape = [1] * len(sizes)
    shape[position] = n
    d = jnp.reshape(jnp.broadcast_to(jnp.reshape(eq_scale.astype(hessian.dtype), shape), sizes), (-1,))
    return d[:, None] * hessian * d[None, :]


def _rotated_hessian(hessian, sizes, position, rot):
    """Rᵀ·H·R for H over K = the product of `sizes` (row-major), R acting on K's axis `position`."""
    k = hessian.shape[0]
    h = jnp.reshape(hessian, sizes + sizes)
    h = rotation.to_rotated(h, rot, position)
    return jnp.reshape(rotation.to_rotated(h, rot, len(sizes) + position), (k, k))


def _relative_error(w, w_hat, hessian, order):
    to_rows, _ = matrix_view(w.shape, order)
    w, delta = to_rows(w.astype(jnp.float32)), to_rows((w_hat - w).astype(jnp.float32))
    num = jnp.sum(delta * (hessian @ delta))
    den = jnp.sum(w * (hessian @ w))
    return float(num / jnp.where(den == 0, 1.0, den))


def matrix_view(shape, order):
    """Functions between a weight of `shape` and its (K, N) matrix (K over `order`)."""
    ndim = len(shape)
    perm = list(order) + [a for a in range(ndim) if a not in order]
    k = math.prod(shape[a] for a in order)
    moved = tuple(shape[a] for a in perm)

    def to_rows(x):
        return jnp.reshape(jnp.transpose(x, perm + list(range(ndim, x.ndim))), (k, -1) + x.shape[ndim:])

    def from_rows(m):
        return jnp.transpose(jnp.reshape(m, moved), np.argsort(perm))

    return to_rows, from_rows


def _grid(x, spec: QuantSpec):
    """The stored grid parameters of `x` as `jquant.quantize` computes them: (scale, zero_point);
    for k-means the scale is the codebook."""
    qa = quantize(x, spec)
    return qa.scale, qa.zero_point


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _run(w, hessian, spec: QuantSpec, order, damp: float, act_order: bool):
    shape = w.shape
    to_rows, from_rows = matrix_view(shape, order)
    lay = numerics.layout(shape, spec)
    k = hessian.shape[0]
    grouped_rows = lay.group_axis is not None and lay.group_axis == order[0] and not act_order
    rows_per_group = k // shape[order[0]] * spec.group_size if grouped_rows else k

    dead = jnp.diag(hessian) == 0
    hessian = jnp.where(jnp.diag(dead), 1.0, hessian)
    w = from_rows(jnp.where(dead[:, None], 0.0, to_rows(w)))
    hessian = _damped(hessian, damp)
    visit = jnp.argsort(-jnp.diag(hessian)) if act_order else jnp.arange(k)
    hessian = hessian[visit][:, visit]
    chol = jnp.linalg.cholesky(hessian)
    inverse = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(k, dtype=hessian.dtype))
    upper = jnp.linalg.cholesky(inverse).T  # H⁻¹ = UᵀU

    grid = _grid(w, spec)

    def expand(grid):
        scale, zero_point = spec.method.element_params(*grid, spec, lay)
        return to_rows(scale)[visit], None if zero_point is None else to_rows(zero_point)[visit]

    def refresh(grid, current, group):
        # The group's grid from the weights as GPTQ has updated them so far; other groups keep theirs.
        new = _grid(from_rows(current[jnp.argsort(visit)]), spec)
        outer = lay.group_axis
        mask_shape = [1] * new[0].ndim
        mask_shape[outer] = new[0].shape[outer]
        mask = jnp.reshape(jnp.arange(new[0].shape[outer]) == group, mask_shape)
        # Per-group parameters take the group's new values; one shared by all groups (NVFP4's
        # tensor scale) keeps its first value, on which the other groups' grids already rest.
        pick = lambda a, b: None if a is None else jnp.where(mask, a, b) if a.shape[outer] > 1 else b  # noqa: E731
        return tuple(pick(a, b) for a, b in zip(new, grid))

    def step(i, state):
        current, grid, per = state
        if grouped_rows:
            grid, per = jax.lax.cond(i % rows_per_group == 0,
                                     lambda: (lambda g: (g, expand(g)))(refresh(grid, current, i // rows_per_group)),
                                     lambda: (grid, per))
        row = current[i]
        scale = per[0][i]
        zero_point = None if per[1] is None else per[1][i]
        q = spec.method.quantize_elements(row, scale, zero_point, spec)
        err = (row - q) / upper[i, i]
        current = current - upper[i][:, None] * err[None, :]
        return current.at[i].set(q), grid, per

    current = to_rows(w)[visit]
    current, grid, _ = jax.lax.fori_loop(0, k, step, (current, grid, expand(grid)))
    return from_rows(current[jnp.argsort(visit)]), grid
