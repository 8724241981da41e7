"""Straight-through estimators: `ste_round` and `fake_quant`.

Both are `jax.custom_jvp` functions. A custom JVP gives reverse mode (`grad`, `vjp`) by JAX's
linearize-and-transpose *and* forward mode (`jvp`, `jacfwd`, Hessian-vector products as
jvp∘grad), which a `custom_vjp` would refuse; the backward pass is the one the STE prescribes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jquant._src import numerics
from jquant._src.qarray import check_float_input, from_stored_basis, to_stored_basis
from jquant._src.spec import QuantSpec, transformed, untransformed


@jax.custom_jvp
def ste_round(x):
    """Round half to even forward; identity backward (∂round(x)/∂x := 1)."""
    return jnp.round(x)


@ste_round.defjvp
def _ste_round_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return jnp.round(x), dx


def fake_quant(x, spec: QuantSpec, *, scale=None, zero_point=None):
    """Quantize-dequantize with the straight-through estimator.

    Forward: exactly `quantize(x, spec, ...).dequantize()` (the same bits, computed in one float
    pass without the integer storage; a NaN element stays NaN, which int8 storage cannot hold).
    Backward: the upstream gradient where the clip is inactive and 0 where it saturates
    (the format's `inside`): for a uniform grid ∂x̂/∂x = 1 if Qmin <= round(x/s) + z <= Qmax,
    else 0 — i.e. 1 inside the clip range [s(Qmin - z), s(Qmax - z)] (widened by the half step
    that rounds back into it), 0 outside. With the scale computed from `x` by the default
    `MinMax` calibration every element is inside; with a clipping calibration (`Percentile`,
    `MSE`) or a fixed `scale`/`zero_point` the elements beyond the range get zero gradient. The
    scale and zero-point receive no gradient (a learned step size is a separate estimator,
    `jquant.learned`). Sign and codebook formats have no clip: their gradient is the identity
    (BinaryConnect STE). A rotated spec computes R·fq(Rᵀ·x), the rotations ordinary linear maps:
    the gradient is R·(mask ⊙ Rᵀ·g), the mask taken in the rotated basis. An equalized spec
    computes r·fq(x / r) (with a rotation r·R·fq(Rᵀ·(x / r))), r from x and, like the scale, given
    no gradient: the gradient is r·(mask ⊙ g / r).

    Args:
      x: float array; spec: the QuantSpec; scale, zero_point: as in `jquant.quantize`.

    Returns:
      float array of x's shape and dtype.

    Raises:
      TypeError, ValueError: as `jquant.quantize`.
    """
    x = check_float_input(x, spec, "fake_quant")
    lay = numerics.layout(x.shape, spec)
    if transformed(spec):
        stored, eq_scale = to_stored_basis(x, spec, lay)
        x_hat = fake_quant(stored, untransformed(spec), scale=scale, zero_point=zero_point)
        return numerics.cast_saturating(from_stored_basis(x_hat, spec, lay, eq_scale), x.dtype)
    fixed = scale is not None
    scale, zero_point = spec.method.params(jax.lax.stop_gradient(x), spec, lay, scale, zero_point)
    scale = jax.lax.stop_gradient(scale)
    return _fake_quant(spec, lay, fixed, x, scale, zero_point)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _fake_quant(spec, lay, fixed, x, scale, zero_point):
    x_hat = spec.method.fake_quantize(x, spec, lay, scale, zero_point, fixed=fixed)
    return numerics.cast_saturating(x_hat, x.dtype)


@_fake_quant.defjvp
def _fake_quant_jvp(spec, lay, fixed, primals, tangents):
    x, scale, zero_point = primals
    dx = tangents[0]
    out = _fake_quant(spec, lay, fixed, x, scale, zero_point)
    inside = spec.method.inside(x, spec, lay, scale, zero_point, fixed=fixed)
    if inside is None:
        return out, dx
    return out, jnp.where(inside, dx, jnp.zeros_like(dx))
