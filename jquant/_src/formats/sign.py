"""1-bit sign quantization (`method="sign"`, XNOR-Net): x̂ = s·sign(x), s = mean|x| per group.

Conventions: q = +1 where x >= 0, else -1 (0 maps to +1; NaN maps to +1 and its group's scale is
NaN); stored packed as the code (q + 1) / 2. The scale is mean|x| over the group, computed as
(Σ|x|·2^-k)·(2^k/n) with 2^k ≥ n, which cannot overflow, and summed in an order fixed by the shape
(`sum_in_fixed_order`), so it is the same bits eagerly and under jit; it is capped at max|x|
(the bound rounding could otherwise pass). The integer dot multiplies q ∈ {−1, +1} itself. The
straight-through gradient is the identity (BinaryConnect): there is no clip.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from jquant._src import numerics
from jquant._src.formats.base import Format, broadcast_fixed, check_no_range_options, no_zero_point


@dataclasses.dataclass(frozen=True)
class Sign(Format):
    """1-bit sign with a mean|x| scale (module docstring)."""

    name = "sign"
    integer_grid = True

    def validate(self, spec) -> None:
        if spec.bits != 1:
            raise ValueError(f"QuantSpec.bits={spec.bits} with method='sign'; sign quantization is 1-bit (bits=1)")
        check_no_range_options(spec, self)

    def qrange(self, spec):
        return -1, 1

    def params(self, x, spec, lay, scale=None, zero_point=None):
        no_zero_point(zero_point, spec)
        xg = lay.to_grouped(x.astype(numerics.compute_dtype(x.dtype)))
        if scale is not None:
            return broadcast_fixed("scale", jnp.asarray(scale, xg.dtype), spec, lay), None
        if xg.size == 0:
            return jnp.zeros(lay.scale_shape, xg.dtype), None
        # Each term is at most max/n, so the sum cannot overflow the way Σ|x| does near the float
        # max (except by rounding, which the bound mean ≤ max|x| undoes); the terms are exact, so
        # a multiply-add contracted into an FMA (as XLA:CPU does inside fused code) rounds exactly
        # like the separate operations.
        count = math.prod(xg.shape[a] for a in lay.reduce_axes)
        shift = 2.0 ** -count.bit_length()
        total = sum_in_fixed_order(jnp.abs(xg) * shift, lay.reduce_axes)
        mean = numerics.divide_by_constant(total, count * shift)
        return jnp.minimum(mean, numerics.extrema(xg, lay.reduce_axes, "absmax")), None

    def encode(self, x, spec, lay, scale, zero_point, *, fixed: bool):
        return jnp.where(x < 0, -1, 1).astype(jnp.int8)

    def decode(self, q, scale, zero_point, spec, lay):
        # |s · ±1| = |s|: the product never leaves the float range, nothing to clip
        return lay.from_grouped(numerics.dequantize_grouped(lay.to_grouped(q), scale, None, saturate=False))

    def to_codes(self, q, spec):
        return (q + 1) // 2

    def from_codes(self, codes, spec):
        return 2 * codes.astype(jnp.int8) - 1

    def fake_quantize(self, x, spec, lay, scale, zero_point, *, fixed: bool):
        xg = lay.to_grouped(x).astype(scale.dtype)
        return lay.from_grouped(self.quantize_elements(xg, scale, None, spec))

    def quantize_elements(self, w, scale, zero_point, spec):
        w = w.astype(scale.dtype)
        return numerics.saturating_product(scale, jnp.where(w < 0, -1, 1).astype(scale.dtype))


def sum_in_fixed_order(x, axes):
    """Σ over `axes` (keepdims) as a pairwise tree of elementwise adds, in an order fixed by the
    shape alone, so that it rounds the same eagerly and under jit.

    XLA compiles a reduction in whatever order suits the surrounding program (a fused jit program
    and a one-op eager call sum differently, in the last bit); it never reorders elementwise float
    adds. Costs about twice the memory traffic of a reduction — used for the sign scale only.
    (Terms that are products should be exact, e.g. scaled by a power of two: XLA:CPU may contract
    a multiply and an add into an FMA inside fused code, which skips the product's rounding.)
    """
    axes = tuple(sorted(a % x.ndim for a in axes))
    kept = [a for a in range(x.ndim) if a not in axes]
    n = math.prod(x.shape[a] for a in axes)
    keepdims = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
    if n == 0:
        return jnp.zeros(keepdims, x.dtype)
    rows = jnp.reshape(jnp.transpose(x, kept + list(axes)), [x.shape[a] for a in kept] + [n])
    while n > 1:
        if n % 2:
            rows = jnp.pad(rows, [(0, 0)] * (rows.ndim - 1) + [(0, 1)])
            n += 1
        n //= 2
        rows = rows[..., :n] + rows[..., n:]
    return jnp.reshape(rows, keepdims)
