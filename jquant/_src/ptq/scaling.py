"""Per-input-channel scaling folded into the float params: AWQ and SmoothQuant.

Both rewrite X·W = (X / s)·(s ⊙ W), s > 0 one number per input channel (the contracted axis),
multiplying the weight rows by s and folding 1/s into the parameters that produce X (a norm's
scale and bias, or the previous linear's output columns — `folding`). The float
function is unchanged (up to rounding); only what quantization sees changes. The result's params are an
ordinary float tree: quantize it with `jquant.quantize_params(params, policy)` or
`jquant.ptq.gptq(fn, params, policy, batches)`.

* **AWQ** (Lin et al. 2023): s = m^α / √(max(m^α)·min(m^α)) with m = mean|X| per channel;
  α is searched on a grid in [0, 1] (α = 0 is round-to-nearest) for the smallest output error
  Σ_W tr(Δᵀ XᵀX Δ), Δ = W − Q(s ⊙ W) / s, over the weights sharing X, with each weight's spec.
* **SmoothQuant** (Xiao et al. 2023): s = max|X|^α / max|W|^(1−α) per channel (max over the
  weights sharing X), moving activation outliers into the weights before W8A8.

Weights whose input cannot be scaled by changing parameters (after a nonlinearity, a reshape or
a residual branch) are left as they are, and reported: a warning lists them with the reason.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jquant._src import numerics
from jquant._src.policy import Policy
from jquant._src.ptq.capture import statistics_program
from jquant._src.ptq.folding import fold_groups, scale_along
from jquant._src.ptq.gptq import LayerError, matrix_view
from jquant._src.ptq.layerwise import Result, calibration_batches, matched_targets
from jquant._src.qarray import quantize
from jquant._src.spec import QuantSpec

_TINY = 1e-8


def awq(fn, params, policy: Policy, batches, *, grid: int = 20) -> Result:
    """AWQ scales for every scalable group of policy-matched weights, folded into `params`.

    Args:
      fn, params, policy, batches: as in `jquant.ptq.gptq`.
      grid: α is searched over {0, 1/grid, ..., 1}.

    Returns:
      Result(params, errors): the float params with the scales folded (same structure), and each
      scaled weight's LayerError: the relative output error tr(ΔᵀXᵀXΔ) / tr(WᵀXᵀXW) on the
      calibration inputs of round-to-nearest with the scales, and without (α = 0).
    """
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"awq grid={grid!r} must be a positive int")

    def choose(errors_with, stats, weights):
        mean_abs = np.maximum(np.asarray(stats.abs_sum) / max(stats.rows, 1), _TINY)
        candidates = []
        for alpha in np.linspace(0.0, 1.0, grid + 1):
            s = mean_abs ** alpha
            s = s / np.sqrt(s.max() * s.min())
            candidates.append((s, errors_with(s)))
        best = min(candidates, key=lambda c: sum(e[0] for e in c[1]))
        return best[0], best[1], candidates[0][1]  # α = 0: round-to-nearest

    return _scale_groups(fn, params, policy, batches, "AWQ", choose)


def smoothquant(fn, params, policy: Policy, batches, *, alpha: float = 0.5) -> Result:
    """SmoothQuant scales s = max|X|^α / max|W|^(1−α) for every scalable group of
    policy-matched weights, folded into `params`.

    Returns:
      Result(params, errors): float params of the same structure, and each scaled weight's
      LayerError (round-to-nearest with the scales vs without, as for `awq`).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"smoothquant alpha={alpha!r} must be in [0, 1]")

    def choose(errors_with, stats, weights):
        x_max = np.maximum(np.asarray(stats.abs_max), _TINY)
        w_max = np.max([_channel_absmax(w, axis) for w, axis in weights], axis=0)
        s = x_max ** alpha / np.maximum(w_max, _TINY) ** (1 - alpha)
        return s, errors_with(s), errors_with(np.ones_like(s))

    return _scale_groups(fn, params, policy, batches, "SmoothQuant", choose)


def _scale_groups(fn, params, policy, batches, algorithm, choose) -> Result:
    """Fold the scales `choose` picks into every scalable group of matched weights.

    `choose(errors_with, stats, weights)` gets a function from candidate scales s to each weight's
    (tr(ΔᵀXᵀXΔ), tr(WᵀXᵀXW)) after round-to-nearest with s, the group's input Statistics and its
    (weight, contracted axis) pairs; it returns (s, errors with s, errors without scaling).
    """
    leaves, treedef, targets, groups, stats = _prepare(fn, params, policy, batches, algorithm)
    errors = {}
    for group in groups:
        if not group.folds:
            continue
        first = stats[group.weights[0][0]]

        def errors_with(s, group=group, xtx=first.xtx):
            s = jnp.asarray(s, jnp.float32)
            return [tuple(float(v) for v in _awq_error(leaves[leaf], xtx, s, targets[leaf].spec, axis))
                    for leaf, axis in group.weights]

        s, scaled, unscaled = choose(errors_with, first, [(leaves[leaf], axis) for leaf, axis in group.weights])
        for (leaf, _), (e, norm), (e_rtn, norm_rtn) in zip(group.weights, scaled, unscaled):
            errors[targets[leaf].path] = LayerError(e / norm, e_rtn / norm_rtn)
        _apply(leaves, group, s)
    return Result(jax.tree_util.tree_unflatten(treedef, leaves), errors)


def _prepare(fn, params, policy, batches, algorithm):
    batches = calibration_batches(batches, algorithm)
    targets = {t.leaf: t for t in matched_targets(fn, params, policy, batches[0], algorithm)}
    groups = fold_groups(fn, params, batches[0], targets)
    stats = statistics_program(fn, params, {leaf: t.order for leaf, t in targets.items()})(params, batches)
    grouped = {leaf for g in groups for leaf, _ in g.weights}
    skipped = [f"{targets[leaf].path} ({g.reason})" for g in groups if not g.folds for leaf, _ in g.weights]
    skipped += [f"{t.path} (contracted over several axes or inside a nested call)"
                for leaf, t in targets.items() if leaf not in grouped]
    if skipped:
        warnings.warn(f"jquant {algorithm}: {len(skipped)} weight(s) not scaled (left as they are): "
                      + "; ".join(skipped), stacklevel=3)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return list(leaves), treedef, targets, groups, stats


def _apply(leaves, group, s):
    s = jnp.asarray(s, jnp.float32)
    for leaf, axis in group.weights:
        leaves[leaf] = scale_along(leaves[leaf], s, axis, +1)
    for leaf, axis in group.folds:
        leaves[leaf] = scale_along(leaves[leaf], s, axis, -1)


def _channel_absmax(w, axis):
    others = tuple(a for a in range(np.ndim(w)) if a != axis)
    return np.asarray(numerics.extrema(jnp.asarray(w), others, "absmax")).reshape(-1)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _awq_error(w, xtx, s, spec: QuantSpec, axis: int):
    """(tr(ΔᵀXᵀXΔ), tr(WᵀXᵀXW)) with Δ = W − Q(s ⊙ W) / s along `axis`."""
    w = w.astype(jnp.float32)
    w_hat = scale_along(quantize(scale_along(w, s, axis, +1), spec).dequantize(), s, axis, -1)
    to_rows, _ = matrix_view(w.shape, (axis,))
    delta, w = to_rows(w_hat - w), to_rows(w)
    return jnp.sum(delta * (xtx @ delta)), jnp.sum(w * (xtx @ w))
