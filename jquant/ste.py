"""Straight-through estimators: `ste_round` and `fake_quant`.

Both are `jax.custom_jvp` functions. A custom JVP gives reverse mode (`grad`, `vjp`) by JAX's
linearize-and-transpose *and* forward mode (`jvp`, `jacfwd`, Hessian-vector products as
jvp∘grad), which a `custom_vjp` would refuse; the backward pass is the one the STE prescribes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jquant import numerics
from jquant.qarray import check_spec, quantize, resolve_scale
from jquant.spec import CODEBOOK_METHODS, QuantSpec


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
    pass without the int8 storage; a NaN element stays NaN, which int8 storage cannot hold).
    Backward: the upstream gradient where the clip is inactive and 0 where it saturates:
    ∂x̂/∂x = 1 if Qmin <= round(x/s) + z <= Qmax, else 0 — i.e. 1 inside the clip range
    [s(Qmin - z), s(Qmax - z)] (widened by the half step that rounds back into it), 0 outside.
    With the scale computed from `x` by the default `MinMax` calibration every element is inside;
    with a clipping calibration (`Percentile`, `MSE`) or a fixed `scale`/`zero_point` the
    elements beyond the range get zero gradient. The scale and
    zero-point receive no gradient (a learned step size is a separate estimator).
    `method="sign"` and the codebook methods have no clip: their gradient is the identity
    (BinaryConnect STE).

    Args:
      x: float array; spec: the QuantSpec; scale, zero_point: as in `jquant.quantize`.

    Returns:
      float array of x's shape and dtype.
    """
    check_spec(spec, "fake_quant")
    x = jnp.asarray(x)
    if spec.method in CODEBOOK_METHODS:
        # No clip range: the levels span the group's values. Identity gradient (forward and reverse).
        # x̂ + (x - x) is x̂ exactly (x + (x̂ - x) would round, in bf16 visibly); its derivative is 1.
        x_hat = quantize(x, spec, scale=scale).dequantize()
        return jax.lax.stop_gradient(x_hat) + (x - jax.lax.stop_gradient(x))
    lay = numerics.layout(x.shape, spec)
    # A min/max range computed from x contains x, so the mask would be all ones: skip computing
    # it. Clipping calibrations (percentile, MSE) leave values outside and need the mask.
    pass_through = (scale is None and not spec.calibration.clips) or spec.method == "sign"
    bounded = scale is None and numerics.reciprocal_is_normal(spec, x.dtype)
    scale, zero_point = resolve_scale(x, spec, lay, scale, zero_point)
    scale = jax.lax.stop_gradient(scale)
    return _fake_quant(spec, lay, pass_through, bounded, x, scale, zero_point)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _fake_quant(spec, lay, pass_through, bounded, x, scale, zero_point):
    x_hat = numerics.fake_quantize_grouped(lay.to_grouped(x), scale, zero_point, spec, bounded=bounded)
    return numerics.cast_saturating(lay.from_grouped(x_hat), x.dtype)


@_fake_quant.defjvp
def _fake_quant_jvp(spec, lay, pass_through, bounded, primals, tangents):
    x, scale, zero_point = primals
    dx = tangents[0]
    out = _fake_quant(spec, lay, pass_through, bounded, x, scale, zero_point)
    if pass_through:
        return out, dx
    q = numerics.unclipped_integers(lay.to_grouped(x), scale, zero_point, spec, bounded=bounded)
    inside = lay.from_grouped((q >= spec.qmin) & (q <= spec.qmax))
    return out, jnp.where(inside, dx, jnp.zeros_like(dx))
