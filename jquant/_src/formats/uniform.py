"""The uniform integer grid (`method="uniform"`): mid-tread or mid-rise, symmetric or asymmetric.

Conventions (tested against a NumPy float64 reference):

* Integer ranges: symmetric b-bit → [-(2^(b-1)-1), 2^(b-1)-1] (int8: [-127, 127]); asymmetric →
  [-2^(b-1), 2^(b-1)-1] (int8: [-128, 127]); mid-rise → [-2^(b-1), 2^(b-1)-1].
* Clip range [lo, hi] per group: the data's range by default; `QuantSpec.calibration` may
  clip it (percentile, MSE-searched ratio, HQQ-fitted grid — `calibration`). The formulas below
  use it.
* Symmetric scale: z = 0, s = absmax / Qmax.
* Mid-rise (symmetric, `QuantSpec.midrise`): q in [-2^(b-1), 2^(b-1)-1], s = absmax / 2^(b-1),
  q = clip(floor(x / s), Qmin, Qmax) (a value on a decision boundary goes up), x̂ = s·(q + 1/2).
* Asymmetric scale: lo = min(min(x), 0), hi = max(max(x), 0), s = (hi - lo) / (Qmax - Qmin),
  z = Qmin - round(lo / s), an integer in [Qmin, Qmax], so 0.0 is represented exactly.
  If hi - lo overflows to Inf (|x| near the float max), s = (hi/2 - lo/2) / ((Qmax-Qmin)/2).
* Quantize: q = clip(round(x / s) + z, Qmin, Qmax) with round half to even (`jnp.round`).
* Dequantize: x̂ = s · (q - z + offset), saturating (`numerics.dequantize_grouped`).
* A fixed (calibrated) zero-point must hold integers in [Qmin, Qmax] (checked eagerly; under jit
  it is clipped to that range, never wrapped by the int8 cast).

The general conventions (compute dtype, zero scales, eager = jit, NaN) are in
`jquant._src.numerics`. The integer dot multiplies q − z (mid-rise: 2q + 1 on the scale s/2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jquant._src import numerics
from jquant._src.formats.base import Format, broadcast_fixed


@dataclasses.dataclass(frozen=True)
class Uniform(Format):
    """The affine integer grid x̂ = s·(q − z + offset), 2..8 bits (module docstring)."""

    name = "uniform"
    integer_grid = True
    ranged = True
    static_range = True

    def validate(self, spec) -> None:
        if not 2 <= spec.bits <= 8:
            hint = " (for 1-bit use method='sign')" if spec.bits == 1 else ""
            raise ValueError(f"QuantSpec.bits={spec.bits} is out of range for method='uniform'; allowed: 2..8{hint}")
        if spec.midrise and not spec.symmetric:
            raise ValueError(f"QuantSpec.midrise=True with method='uniform', symmetric={spec.symmetric}; a mid-rise "
                             "grid is symmetric uniform (method='uniform', symmetric=True)")

    def qrange(self, spec):
        top = 2 ** (spec.bits - 1)
        return -top + (1 if spec.symmetric and not spec.midrise else 0), top - 1

    def offset(self, spec) -> float:
        return 0.5 if spec.midrise else 0.0

    def integer_magnitude(self, spec) -> int:
        """|q − z|: Qmax symmetric, Qmax − Qmin asymmetric, |2q + 1| = 2^b − 1 mid-rise."""
        if spec.midrise:
            return 2 ** spec.bits - 1
        return spec.qmax if spec.symmetric else spec.qmax - spec.qmin

    def params(self, x, spec, lay, scale=None, zero_point=None):
        if scale is None:
            if zero_point is not None:
                raise ValueError("zero_point given without scale; pass both or neither")
            lo, hi = calibrated_range(lay.to_grouped(x.astype(numerics.compute_dtype(x.dtype))), spec, lay)
            return scale_from_range(lo, hi, spec)
        if spec.symmetric != (zero_point is None):
            need = "no zero_point (symmetric spec)" if spec.symmetric else "a zero_point (asymmetric spec)"
            raise ValueError(f"a fixed scale for {spec!r} needs {need}")
        scale = broadcast_fixed("scale", jnp.asarray(scale, numerics.compute_dtype(x.dtype)), spec, lay)
        if zero_point is not None:
            zero_point = jnp.asarray(zero_point)
            if not isinstance(zero_point, jax.core.Tracer):
                z = np.asarray(zero_point, np.float64)
                bad = (z != np.round(z)) | (z < spec.qmin) | (z > spec.qmax)
                if np.any(bad):
                    raise ValueError(f"zero_point for {spec!r} must hold integers in [{spec.qmin}, {spec.qmax}]; "
                                     f"got {z[bad].ravel()[:4].tolist()}")
            # clip before the int8 cast: an out-of-range zero-point must not wrap around (under jit)
            zero_point = broadcast_fixed("zero_point", jnp.clip(zero_point, spec.qmin, spec.qmax).astype(jnp.int8),
                                         spec, lay)
        return scale, zero_point

    def encode(self, x, spec, lay, scale, zero_point, *, fixed: bool):
        bounded = not fixed and reciprocal_is_normal(spec, x.dtype)
        return lay.from_grouped(quantize_grouped(lay.to_grouped(x), scale, zero_point, spec, bounded=bounded))

    def decode(self, q, scale, zero_point, spec, lay, *, saturate: bool = True):
        x = numerics.dequantize_grouped(lay.to_grouped(q), scale, zero_point, spec.offset, saturate=saturate)
        return lay.from_grouped(x)

    def range_params(self, lo, hi, spec):
        return scale_from_range(lo, hi, spec)

    def saturates(self, scale, zero_point, spec):
        # |q − z + offset| < 2^bits on the grid: a finite scale below max / 2^bits cannot overflow
        # (a non-finite one is left to propagate either way)
        finite = jnp.isfinite(scale)
        return jnp.any(finite & (jnp.abs(jnp.where(finite, scale, 0)) > jnp.finfo(scale.dtype).max / 2 ** spec.bits))

    def fake_quantize(self, x, spec, lay, scale, zero_point, *, fixed: bool):
        bounded = not fixed and reciprocal_is_normal(spec, x.dtype)
        return lay.from_grouped(fake_quantize_grouped(lay.to_grouped(x), scale, zero_point, spec, bounded=bounded))

    def inside(self, x, spec, lay, scale, zero_point, *, fixed: bool):
        # A min/max range computed from x contains x: the mask would be all ones. Clipping
        # calibrations (percentile, MSE, HQQ) and fixed ranges leave values outside.
        if not fixed and not spec.calibration.clips:
            return None
        bounded = not fixed and reciprocal_is_normal(spec, x.dtype)
        q = unclipped_integers(lay.to_grouped(x), scale, zero_point, spec, bounded=bounded)
        return lay.from_grouped((q >= spec.qmin) & (q <= spec.qmax))

    def integer_problem(self, spec):
        if spec.midrise and spec.bits > 7:
            return f"is {spec!r}; a mid-rise grid multiplies 2q + 1, which fits int8 only for bits <= 7"
        return None

    def integer_operand(self, q, scale, spec):
        if spec.midrise:  # s·(q + 1/2) = (s/2)·(2q + 1): odd integers on a half-size scale
            return 2 * q + 1, scale / 2
        return q, scale

    def quantize_elements(self, w, scale, zero_point, spec):
        return fake_quantize_grouped(w, scale, zero_point, spec)


def scale_from_range(lo, hi, spec):
    """Scale and zero-point for the range [lo, hi] (arrays of the scale's shape, or scalars; lo <= hi).

    Symmetric: s = max(|lo|, |hi|) / Qmax (mid-rise: / 2^(b-1)), computed as max(−lo, hi), which
    is equal for lo <= hi; z = None. Asymmetric: lo → min(lo, 0), hi → max(hi, 0),
    s = (hi - lo) / (Qmax - Qmin), z = Qmin - round(lo / s) (int8).

    Returns:
      (scale, zero_point): float scale; int8 zero-point of the same shape, or None if symmetric.
    """
    dtype = numerics.compute_dtype(jnp.result_type(lo, hi))
    lo = jnp.asarray(lo, dtype)
    hi = jnp.asarray(hi, dtype)
    if spec.symmetric:
        top = spec.qmax + 1 if spec.midrise else spec.qmax
        return numerics.divide_by_constant(jnp.maximum(-lo, hi), top), None
    lo = jnp.minimum(lo, 0)
    hi = jnp.maximum(hi, 0)
    levels = spec.qmax - spec.qmin
    span = hi - lo
    # hi - lo can overflow to Inf when |lo|, |hi| approach the float max; hi/2 - lo/2 cannot (and
    # its exact halvings round the same whether or not XLA fuses them into an FMA).
    scale = jnp.where(jnp.isinf(span) & jnp.isfinite(lo) & jnp.isfinite(hi),
                      numerics.divide_by_constant(hi * 0.5 - lo * 0.5, levels / 2),
                      numerics.divide_by_constant(span, levels))
    zero_point = spec.qmin - jnp.round(lo / numerics.safe_divisor(scale))
    zero_point = jnp.clip(zero_point, spec.qmin, spec.qmax)
    # NaN propagates into the scale; the zero-point must still be a valid integer.
    zero_point = jnp.where(jnp.isnan(zero_point), spec.qmin, zero_point).astype(jnp.int8)
    return scale, zero_point


def calibrated_range(xg, spec, lay: numerics.Layout):
    """(lo, hi) of each group of the grouped view `xg` per `spec.calibration` (scale shape).

    The calibration's statistic (`group_range`), then its `refine` on this grid (`MSE` searches
    the clip ratio, `HQQ` fits the grid; see `calibration`). An empty tensor has range [0, 0] (a
    reduction over nothing has no identity).
    """
    if xg.size == 0:
        zeros = jnp.zeros(lay.scale_shape, xg.dtype)
        return zeros, zeros
    lo, hi = spec.calibration.group_range(xg, lay.reduce_axes, spec.symmetric)
    return spec.calibration.refine(xg, lo, hi, CalibrationGrid(spec, lay.reduce_axes,
                                                               reciprocal_is_normal(spec, xg.dtype)))


@dataclasses.dataclass(frozen=True)
class CalibrationGrid:
    """The uniform grid of `spec` as a calibration's `refine` sees it (the protocol is in the
    `calibration` module docstring): groups reduce over `axes`; `bounded` is the division mode of
    the format's own quantize pass on this data (`reciprocal_is_normal`)."""

    spec: object
    axes: tuple
    bounded: bool

    def params(self, lo, hi):
        """The stored (scale, zero-point) of the range [lo, hi] (`scale_from_range`)."""
        return scale_from_range(lo, hi, self.spec)

    def fake_quantize(self, xg, scale, zero_point, *, bounded: bool):
        """x̂, the numbers `quantize` then `dequantize` return (`fake_quantize_grouped`)."""
        return fake_quantize_grouped(xg, scale, zero_point, self.spec, bounded=bounded)

    def levels(self, xg, scale, zero_point):
        """k = clip(q) − z + offset in the scale's dtype: x̂ = s·k (before saturation)."""
        spec = self.spec
        k = jnp.clip(unclipped_integers(xg, scale, zero_point, spec, bounded=self.bounded), spec.qmin, spec.qmax)
        if zero_point is not None:
            k = k - zero_point.astype(k.dtype)
        return k + spec.offset if spec.offset else k

    def range_of(self, scale, zero_point):
        """[lo, hi] whose `params` are (scale, zero_point) (up to the rounding of the scale):
        ±s·Qmax symmetric (mid-rise ±s·2^(b−1)), [s·(Qmin − z), s·(Qmax − z)] asymmetric."""
        spec = self.spec
        if zero_point is None:
            top = scale * (spec.qmax + 1 if spec.midrise else spec.qmax)
            return -top, top
        zero_point = zero_point.astype(scale.dtype)
        return scale * (spec.qmin - zero_point), scale * (spec.qmax - zero_point)


def reciprocal_is_normal(spec, dtype) -> bool:
    """Whether every scale `compute_scale` can return for `spec` on data of float `dtype` has a
    normal reciprocal, so that `divide` needs no shift.

    A computed scale is at most (largest float) / top, top = Qmax (mid-rise: 2^(b-1)), or
    (Qmax − Qmin) / 2 for an asymmetric grid; its reciprocal is normal when that bound is below
    1 / (smallest normal): in float32 from top > 4 (4-bit symmetric, 4-bit asymmetric, and
    wider). A fixed or learned scale can be anything, so its callers pass `bounded=False`.
    """
    if spec.symmetric:
        top = spec.qmax + 1 if spec.midrise else spec.qmax
    else:
        top = (spec.qmax - spec.qmin) / 2
    info = jnp.finfo(numerics.compute_dtype(dtype))
    return float(info.max) / top * (1 + 4 * float(info.eps)) < 1 / float(info.tiny)


def quantize_grouped(xg, scale, zero_point, spec, *, bounded: bool = False):
    """Integers of the grouped view `xg`: q = clip(round(x / s) + z, Qmin, Qmax) as int8.

    `bounded`: see `divide`. The float → int8 conversion adds 1.5 · 2^m (m mantissa bits) to the
    clipped value and keeps the low bits of its integer image: the addition itself rounds half to
    even onto whole numbers (|v| ≤ 128 ≪ 2^(m−1)), so q equals round-then-convert (with a
    zero-point, x/s is rounded before z is added, as the formula says), without the
    range and NaN checks of XLA's float → int conversion (a NaN stores an unspecified integer;
    its group's scale is NaN).
    """
    dtype = scale.dtype
    if spec.symmetric and not spec.midrise:
        v = numerics.divide(xg.astype(dtype), scale, bounded=bounded)  # rounded by the addition below
    else:  # floor, or round(x/s) + z: rounding x/s + z would move the ties
        v = unclipped_integers(xg, scale, zero_point, spec, bounded=bounded)
    v = jnp.clip(v, spec.qmin, spec.qmax)
    mantissa = jnp.finfo(dtype).nmant
    magic = np.asarray(1.5 * 2.0 ** mantissa, dtype)
    image = jnp.int32 if mantissa < 32 else jnp.int64
    bits = jax.lax.bitcast_convert_type(v + magic, image)
    return (bits - magic.view(np.dtype(image))).astype(jnp.int8)


def unclipped_integers(xg, scale, zero_point, spec, *, bounded: bool = False):
    """round(x / s) + z (mid-rise: floor(x / s)) before clipping, in the compute dtype (used for
    the STE clip mask). `bounded`: see `divide`."""
    xg = xg.astype(scale.dtype)
    to_integer = jnp.floor if spec.midrise else jnp.round
    q = to_integer(numerics.divide(xg, scale, bounded=bounded))
    if zero_point is not None:
        q = q + zero_point.astype(q.dtype)
    return q


def fake_quantize_grouped(xg, scale, zero_point, spec, *, bounded: bool = False):
    """x̂ of the grouped view `xg` in the scale's dtype: `dequantize_grouped(quantize_grouped(...))`
    computed without the int8 cast — the forward of fake quantization.

    The same numbers for every non-NaN x (q is an integer-valued float, exact in any float
    dtype; s · (q − z + offset) and the saturation at ±max are those of `dequantize_grouped`), in
    one fused elementwise pass: the float → int8 → float round trip costs XLA:CPU about as much as
    the rest of the pass. A NaN x gives NaN here; the int8 storage of `quantize` cannot hold NaN
    (that only shows with a fixed scale — a computed scale is NaN itself). `bounded`: see `divide`.
    """
    q = jnp.clip(unclipped_integers(xg, scale, zero_point, spec, bounded=bounded), spec.qmin, spec.qmax)
    q = jnp.where(q == 0, 0, q)  # round(-0.3) is -0.0; the integer it stands for is 0 (XLA drops q + 0)
    if zero_point is not None:
        q = q - zero_point.astype(q.dtype)
    if spec.offset:
        q = q + spec.offset
    return numerics.saturating_product(scale, q)
