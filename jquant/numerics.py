"""The quantization formulas: granularity layout, scale and zero-point, round, clip, dequantize.

Conventions (every function here follows them; tests check them against NumPy float64):

* Integer ranges (`QuantSpec.qmin/qmax`): symmetric b-bit → [-(2^(b-1)-1), 2^(b-1)-1] (int8:
  [-127, 127]); asymmetric → [-2^(b-1), 2^(b-1)-1] (int8: [-128, 127]); sign → {-1, +1}.
* Clip range [lo, hi] per group: the data's range by default; `QuantSpec.calibration` may
  clip it (percentile, MSE-searched ratio — `jquant.calibration`). The formulas below use it.
* Symmetric scale: z = 0, s = absmax / Qmax.
* Mid-rise (symmetric, `QuantSpec.midrise`): q in [-2^(b-1), 2^(b-1)-1], s = absmax / 2^(b-1),
  q = clip(floor(x / s), Qmin, Qmax) (a value on a decision boundary goes up), x̂ = s·(q + 1/2).
* Asymmetric scale: lo = min(min(x), 0), hi = max(max(x), 0), s = (hi - lo) / (Qmax - Qmin),
  z = Qmin - round(lo / s), an integer in [Qmin, Qmax], so 0.0 is represented exactly.
  If hi - lo overflows to Inf (|x| near the float max), s = (hi/2 - lo/2) / ((Qmax-Qmin)/2).
* Sign scale (XNOR-Net): s = mean|x| over the group (computed as (Σ|x|·2^-k)·(2^k/n) with
  2^k ≥ n, which cannot overflow); q = +1 where x >= 0, else -1.
* Quantize: q = clip(round(x / s) + z, Qmin, Qmax) with round half to even (`jnp.round`).
* Dequantize: x̂ = s · (q - z), saturating at ±(float max) when the scale is finite (the grid
  may reach half a step past the data, which at the float limit would overflow).
* Arithmetic runs in float32 (float64 for float64 inputs); scales are stored in that dtype.
  bf16/f16 inputs are upcast exactly, and `dequantize` casts back to the input dtype.
* Zero scale: a group that is all zeros (or whose scale underflows to 0) gets s = 0; division
  uses 1 in its place (also for a scale below the smallest normal float, which XLA:CPU flushes to
  0 anyway), so q = z and x̂ = 0 exactly — never NaN.
* Eager = jit, bit for bit: XLA rewrites some divisions into multiplications by a rounded
  reciprocal under jit (depending on shapes and the surrounding program) and not eagerly. So no
  formula leaves the choice to it: x / s is computed as x · (1/s) (`divide`), and a division by a
  constant (s = absmax / Qmax, (hi − lo) / (Qmax − Qmin), mean|x| = Σ(|x| / n)) as a
  multiplication by the correctly rounded reciprocal (`divide_by_constant`). Sums that set a
  scale (the sign scale) run in a fixed order (`sum_in_fixed_order`).
* NaN/Inf input: not masked. A NaN anywhere in a group makes that group's scale NaN and the whole
  group dequantizes to NaN; an Inf makes the scale Inf and the group dequantizes to NaN/Inf. The
  corruption stays visible; it is never turned into plausible numbers.

Granularity is one code path: the "grouped view" of a tensor splits `group_axis` (size n) into
`(n // group_size, group_size)`; the scale is reduced over the inner group axis and over every
axis that is not a channel axis, with keepdims. Per-tensor and per-channel are the same code with
no split.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jquant.calibration import MSE
from jquant.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class Layout:
    """A spec resolved against a shape: where the groups are and which axes a scale spans.

    Attributes:
      shape: the tensor's shape.
      grouped_shape: `shape` with `group_axis` split into (n // group_size, group_size).
      channel_axes: non-negative channel axes in original coordinates.
      group_axis: the non-negative split axis in original coordinates, or None.
      reduce_axes: axes of the grouped view that share one scale.
    """

    shape: Tuple[int, ...]
    grouped_shape: Tuple[int, ...]
    channel_axes: Tuple[int, ...]
    group_axis: Optional[int]
    reduce_axes: Tuple[int, ...]

    @property
    def scale_shape(self) -> Tuple[int, ...]:
        """Shape of the scale (and zero-point): `grouped_shape` with 1 on every reduced axis."""
        return tuple(1 if i in self.reduce_axes else d for i, d in enumerate(self.grouped_shape))

    def grouped_axis(self, axis: int) -> int:
        """Position in the grouped view of original `axis` (the outer part, for the split axis)."""
        return axis + 1 if self.group_axis is not None and axis > self.group_axis else axis

    def to_grouped(self, x):
        """Reshape `x` (of `shape`) to `grouped_shape` — a free reshape, no data movement."""
        return jnp.reshape(x, self.grouped_shape)

    def from_grouped(self, x):
        """Inverse of `to_grouped`."""
        return jnp.reshape(x, self.shape)


def _normalize_axis(axis: int, ndim: int, what: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"QuantSpec.{what}={axis} is out of range for a tensor of rank {ndim}; "
                         f"allowed: {-ndim}..{ndim - 1}" if ndim else
                         f"QuantSpec.{what}={axis} given for a 0-d tensor, which has no axes")
    return axis % ndim


def layout(shape: Tuple[int, ...], spec: QuantSpec) -> Layout:
    """Resolve `spec`'s granularity against `shape`.

    Raises:
      ValueError: a channel/group axis out of range, a group size that does not divide its axis,
        or a group size without any non-channel axis to split.
    """
    shape = tuple(int(d) for d in shape)
    ndim = len(shape)
    channel = tuple(sorted(_normalize_axis(a, ndim, "channel_axes") for a in spec.channel_axes))
    if len(set(channel)) != len(channel):
        raise ValueError(f"QuantSpec.channel_axes={spec.channel_axes} name the same axis twice for rank {ndim}")
    group_axis = None
    if spec.group_size is not None:
        if spec.group_axis is None:
            candidates = [a for a in range(ndim) if a not in channel]
            if not candidates:
                raise ValueError(f"QuantSpec.group_size={spec.group_size} needs an axis to split, but every axis of "
                                 f"shape {shape} is a channel axis {channel}")
            # The largest shared axis (the last of equals): the contraction axis of Dense (in, out),
            # Conv HWIO and DenseGeneral kernels alike, and the axis where one scale covers most values.
            group_axis = max(reversed(candidates), key=lambda a: shape[a])
        else:
            group_axis = _normalize_axis(spec.group_axis, ndim, "group_axis")
            if group_axis in channel:
                raise ValueError(f"QuantSpec.group_axis={spec.group_axis} is a channel axis {channel} for rank {ndim}")
        n = shape[group_axis]
        if n % spec.group_size:
            raise ValueError(f"QuantSpec.group_size={spec.group_size} does not divide axis {group_axis} of size {n} "
                             f"(shape {shape}); choose a divisor of {n}")
    if group_axis is None:
        grouped = shape
        reduce_axes = tuple(a for a in range(ndim) if a not in channel)
    else:
        g = spec.group_size
        grouped = shape[:group_axis] + (shape[group_axis] // g, g) + shape[group_axis + 1:]
        reduce_axes = tuple(sorted(
            [a + (a > group_axis) for a in range(ndim) if a not in channel and a != group_axis] + [group_axis + 1]))
    return Layout(shape, grouped, channel, group_axis, reduce_axes)


def compute_dtype(dtype) -> jnp.dtype:
    """Float dtype the formulas run in: float32, or float64 for float64 input."""
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(jnp.float32)


def divide_by_constant(x, c):
    """x / c for a Python number c, computed as x · fl(1/c), eagerly and under jit alike.

    Whether XLA turns a division into a multiplication by the rounded reciprocal depends on the
    shapes and the surrounding program (a scalar divided by a constant, or an array by a broadcast
    scalar, is rewritten under jit; the same division run eagerly is not), which changes the last
    bit. So the formulas multiply by the correctly rounded reciprocal themselves: at most one
    rounding more than x / c, and the same bits in every mode. For the divisors used (Qmax,
    Qmax − Qmin, 2^(b−1)), c · fl(1/c) rounds to exactly 1, so a range of c whole steps gives back
    exactly that step.
    """
    return x * (np.asarray(1, x.dtype) / np.asarray(c, x.dtype))


def scale_from_range(lo, hi, spec: QuantSpec):
    """Scale and zero-point for the range [lo, hi] (arrays of the scale's shape, or scalars; lo <= hi).

    Symmetric: s = max(|lo|, |hi|) / Qmax (mid-rise: / 2^(b-1)), computed as max(−lo, hi), which
    is equal for lo <= hi; z = None. Asymmetric: lo → min(lo, 0), hi → max(hi, 0),
    s = (hi - lo) / (Qmax - Qmin), z = Qmin - round(lo / s) (int8). Sign: not range based — use
    `compute_scale`.

    Returns:
      (scale, zero_point): float scale; int8 zero-point of the same shape, or None if symmetric.
    """
    if spec.method == "sign":
        raise ValueError("QuantSpec(method='sign') has no clip range: its scale is mean|x|; use compute_scale")
    dtype = compute_dtype(jnp.result_type(lo, hi))
    lo = jnp.asarray(lo, dtype)
    hi = jnp.asarray(hi, dtype)
    if spec.symmetric:
        top = spec.qmax + 1 if spec.midrise else spec.qmax
        return divide_by_constant(jnp.maximum(-lo, hi), top), None
    lo = jnp.minimum(lo, 0)
    hi = jnp.maximum(hi, 0)
    levels = spec.qmax - spec.qmin
    span = hi - lo
    # hi - lo can overflow to Inf when |lo|, |hi| approach the float max; hi/2 - lo/2 cannot (and
    # its exact halvings round the same whether or not XLA fuses them into an FMA).
    scale = jnp.where(jnp.isinf(span) & jnp.isfinite(lo) & jnp.isfinite(hi),
                      divide_by_constant(hi * 0.5 - lo * 0.5, levels / 2), divide_by_constant(span, levels))
    zero_point = spec.qmin - jnp.round(lo / safe_divisor(scale))
    zero_point = jnp.clip(zero_point, spec.qmin, spec.qmax)
    # NaN propagates into the scale; the zero-point must still be a valid integer.
    zero_point = jnp.where(jnp.isnan(zero_point), spec.qmin, zero_point).astype(jnp.int8)
    return scale, zero_point


def compute_scale(x, spec: QuantSpec, lay: Optional[Layout] = None):
    """Scale and zero-point of `x` from its own range (absmax / min-max / mean|x|).

    Args:
      x: float array of any shape.
      spec: the QuantSpec.
      lay: `layout(x.shape, spec)` if already known.

    Returns:
      (scale, zero_point) of shape `lay.scale_shape`; scale float32 (float64 for float64 x),
      zero_point int8 or None when symmetric.
    """
    lay = lay or layout(x.shape, spec)
    xg = lay.to_grouped(x.astype(compute_dtype(x.dtype)))
    if spec.method == "sign":
        if xg.size == 0:
            return jnp.zeros(lay.scale_shape, xg.dtype), None
        # mean|x| as (Σ |x|·2^-k)·(2^k/n) with 2^k ≥ n: each term is at most max/n, so the sum
        # cannot overflow the way Σ|x| does near the float max (except by rounding, which the
        # bound mean ≤ max|x| undoes); the terms are exact, so a multiply-add contracted into an
        # FMA (as XLA:CPU does inside fused code) rounds exactly like the separate operations.
        count = math.prod(xg.shape[a] for a in lay.reduce_axes)
        shift = 2.0 ** -count.bit_length()
        total = sum_in_fixed_order(jnp.abs(xg) * shift, lay.reduce_axes)
        mean = divide_by_constant(total, count * shift)
        return jnp.minimum(mean, jnp.max(jnp.abs(xg), axis=lay.reduce_axes, keepdims=True)), None
    lo, hi = calibrated_range(xg, spec, lay)
    return scale_from_range(lo, hi, spec)


def calibrated_range(xg, spec: QuantSpec, lay: Layout):
    """(lo, hi) of each group of the grouped view `xg` per `spec.calibration` (scale shape).

    `MinMax`/`Percentile` reduce the group directly; `MSE` then searches the clip ratio (see
    `jquant.calibration`). An empty tensor has range [0, 0] (a reduction over nothing has no
    identity).
    """
    if xg.size == 0:
        zeros = jnp.zeros(lay.scale_shape, xg.dtype)
        return zeros, zeros
    lo, hi = spec.calibration.group_range(xg, lay.reduce_axes, spec.symmetric)
    if isinstance(spec.calibration, MSE):
        lo, hi = _search_clip_ratio(xg, lo, hi, spec, lay)
    return lo, hi


def _search_clip_ratio(xg, lo, hi, spec: QuantSpec, lay: Layout):
    """r·(lo, hi) with the candidate ratio r of `spec.calibration` that minimises Σ|x - Q_r(x)|^p.

    The search runs on each group divided by its absmax (the error's argmin is scale-invariant,
    and the powers cannot overflow for data near the float max). Candidates are visited from
    r = 1 downwards and only a strictly smaller error replaces the best, so ties keep the larger
    range. A NaN in a group makes every error NaN, so r stays 1 and the NaN reaches the scale.
    """
    cal = spec.calibration
    unit = safe_divisor(jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
    xn, lo_n, hi_n = divide(xg, unit), lo / unit, hi / unit  # x·(1/unit): see `divide`
    ratios = cal.ratios().astype(xg.dtype)

    def error(r):
        scale, zero_point = scale_from_range(lo_n * r, hi_n * r, spec)
        diff = jnp.abs(fake_quantize_grouped(xn, scale, zero_point, spec, bounded=True) - xn)  # scales <= 1
        return jnp.sum(diff ** cal.norm, axis=lay.reduce_axes, keepdims=True)

    def visit(i, best):
        best_error, best_ratio = best
        r = ratios[ratios.shape[0] - 1 - i]
        e = error(r)
        better = e < best_error
        return jnp.where(better, e, best_error), jnp.where(better, r, best_ratio)

    first = (error(ratios[-1]), jnp.ones_like(lo))
    _, ratio = jax.lax.fori_loop(1, ratios.shape[0], visit, first)
    return lo * ratio, hi * ratio


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


def reduce_groups(fn, xg, lay: Layout):
    """`fn` (jnp.max/min) over the shared axes of the grouped view, keepdims (scale shape).
    An empty tensor has range [0, 0] (max/min over nothing has no identity)."""
    if xg.size == 0:
        return jnp.zeros(lay.scale_shape, xg.dtype)
    return fn(xg, axis=lay.reduce_axes, keepdims=True)


def safe_divisor(scale):
    """The divisor used for `scale`: 1 where the scale is 0, so an all-zero group gives q = z.

    A nonzero scale below the smallest normal float counts as 0 too: 1/s would overflow to Inf
    and turn the group's zeros into NaN (XLA:CPU flushes such scales to 0 anyway).
    """
    return jnp.where(jnp.abs(scale) < jnp.finfo(scale.dtype).tiny, jnp.ones_like(scale), scale)


def divide(x, scale, *, bounded: bool = False):
    """x / s for the grouped view `x` and its (broadcast) scale, computed as x · (1/s), with
    `safe_divisor`'s guard.

    Under jit XLA rewrites a division by a broadcast scale into a multiplication by its
    reciprocal; writing that out makes eager execution round the same numbers, so q is
    bit-identical eagerly and under jit. x · (1/s) differs from x / s by at most an ulp or two,
    which matters only that close to a rounding tie. A scale ≥ 2^64 is first divided by 2^64 on
    both sides (exact: a power of two), because its reciprocal would be subnormal, which XLA:CPU
    flushes to 0. `bounded=True` says that no scale can come near that (see
    `reciprocal_is_normal`) and skips the per-element shift — the same numbers, about an eighth
    less time in a quantization pass.
    """
    s = safe_divisor(scale)
    if bounded:
        return x * (1 / s)
    shift = jnp.where(jnp.abs(s) >= 2.0 ** 64, 2.0 ** -64, 1.0).astype(s.dtype)
    return (x * shift) * (1 / (s * shift))


def reciprocal_is_normal(spec: QuantSpec, dtype) -> bool:
    """Whether every scale `compute_scale` can return for `spec` on data of float `dtype` has a
    normal reciprocal, so that `divide` needs no shift.

    A computed scale is at most (largest float) / top, top = Qmax (mid-rise: 2^(b-1)), or
    (Qmax − Qmin) / 2 for an asymmetric grid; its reciprocal is normal when that bound is below
    1 / (smallest normal): in float32 from top > 4 (4-bit symmetric, 4-bit asymmetric, and
    wider). A fixed or learned scale can be anything, so its callers pass `bounded=False`.
    """
    if spec.method == "sign":
        return False
    if spec.symmetric:
        top = spec.qmax + 1 if spec.midrise else spec.qmax
    else:
        top = (spec.qmax - spec.qmin) / 2
    info = jnp.finfo(compute_dtype(dtype))
    return float(info.max) / top * (1 + 4 * float(info.eps)) < 1 / float(info.tiny)


def quantize_grouped(xg, scale, zero_point, spec: QuantSpec, *, bounded: bool = False):
    """Integers of the grouped view `xg`: q = clip(round(x / s) + z, Qmin, Qmax) as int8.

    For `method="sign"`: q = +1 where x >= 0, else -1 (NaN maps to +1; its scale is NaN).
    `bounded`: see `divide`. The float → int8 conversion adds 1.5 · 2^m (m mantissa bits) to the
    clipped value and keeps the low bits of its integer image: the addition itself rounds half to
    even onto whole numbers (|v| ≤ 128 ≪ 2^(m−1)), so q equals round-then-convert (with a
    zero-point, x/s is rounded before z is added, as the formula says), without the
    range and NaN checks of XLA's float → int conversion (a NaN stores an unspecified integer;
    its group's scale is NaN).
    """
    if spec.method == "sign":
        return jnp.where(xg < 0, -1, 1).astype(jnp.int8)
    dtype = scale.dtype
    if spec.symmetric and not spec.midrise:
        v = divide(xg.astype(dtype), scale, bounded=bounded)  # rounded by the addition below
    else:  # floor, or round(x/s) + z: rounding x/s + z would move the ties
        v = unclipped_integers(xg, scale, zero_point, spec, bounded=bounded)
    v = jnp.clip(v, spec.qmin, spec.qmax)
    mantissa = jnp.finfo(dtype).nmant
    magic = np.asarray(1.5 * 2.0 ** mantissa, dtype)
    image = jnp.int32 if mantissa < 32 else jnp.int64
    bits = jax.lax.bitcast_convert_type(v + magic, image)
    return (bits - magic.view(np.dtype(image))).astype(jnp.int8)


def unclipped_integers(xg, scale, zero_point, spec: QuantSpec, *, bounded: bool = False):
    """round(x / s) + z (mid-rise: floor(x / s)) before clipping, in the compute dtype (used for
    the STE clip mask). `bounded`: see `divide`."""
    xg = xg.astype(scale.dtype)
    to_integer = jnp.floor if spec.midrise else jnp.round
    q = to_integer(divide(xg, scale, bounded=bounded))
    if zero_point is not None:
        q = q + zero_point.astype(q.dtype)
    return q


def fake_quantize_grouped(xg, scale, zero_point, spec: QuantSpec, *, bounded: bool = False):
    """x̂ of the grouped view `xg` in the scale's dtype: `dequantize_grouped(quantize_grouped(...))`
    computed without the int8 cast — the forward of fake quantization.

    The same numbers for every non-NaN x (q is an integer-valued float, exact in any float
    dtype; s · (q − z + offset) and the saturation at ±max are those of `dequantize_grouped`), in
    one fused elementwise pass: the float → int8 → float round trip costs XLA:CPU about as much as
    the rest of the pass. A NaN x gives NaN here; the int8 storage of `quantize` cannot hold NaN
    (that only shows with a fixed scale — a computed scale is NaN itself). `bounded`: see `divide`.
    """
    xg = xg.astype(scale.dtype)
    if spec.method == "sign":
        q = jnp.where(xg < 0, -1, 1).astype(scale.dtype)
    else:
        q = jnp.clip(unclipped_integers(xg, scale, zero_point, spec, bounded=bounded), spec.qmin, spec.qmax)
        q = jnp.where(q == 0, 0, q)  # round(-0.3) is -0.0; the integer it stands for is 0 (XLA drops q + 0)
        if zero_point is not None:
            q = q - zero_point.astype(q.dtype)
        if spec.offset:
            q = q + spec.offset
    # One clip against a per-group bound (±max, or ±Inf for a non-finite scale, which stays
    # visible) instead of `dequantize_grouped`'s select per element.
    bound = jnp.where(jnp.isfinite(scale), jnp.finfo(scale.dtype).max, jnp.inf).astype(scale.dtype)
    return jnp.clip(scale * q, -bound, bound)


def cast_saturating(x, dtype):
    """`x` cast to `dtype`, finite values saturating at ±max of `dtype` (NaN/Inf kept).

    The grid can reach half a step past the data, so for bf16/f16 data near their largest value
    x̂ (computed in float32) can exceed what the narrower dtype holds; a plain cast would give ±Inf.
    When `x` already has `dtype` it is returned as is.
    """
    if x.dtype == jnp.dtype(dtype):
        return x
    largest = jnp.finfo(dtype).max
    return jnp.where(jnp.isfinite(x), jnp.clip(x, -largest, largest), x).astype(dtype)


def dequantize_grouped(q, scale, zero_point, offset: float = 0.0):
    """x̂ = s · (q - z + offset) in the scale's dtype, on the grouped view (`offset` is
    `QuantSpec.offset`: 1/2 for a mid-rise grid).

    The grid can reach half a step beyond the data's range (s = absmax/Qmax rounds, z rounds), so
    for data at the float limit s · (q - z) can exceed the largest float: with a finite scale the
    result saturates at ±max instead of becoming ±Inf. A non-finite scale (NaN/Inf input) is left
    to propagate.
    """
    q = q.astype(scale.dtype)
    if zero_point is not None:
        q = q - zero_point.astype(scale.dtype)
    if offset:
        q = q + offset
    largest = jnp.finfo(scale.dtype).max
    x = scale * q
    return jnp.where(jnp.isfinite(scale), jnp.clip(x, -largest, largest), x)
