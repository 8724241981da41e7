"""What every format shares: granularity layout, compute dtype, guarded division, saturation.

General conventions (every format follows them; tests check them against NumPy float64; each
format's own grid, scale rule and rounding are in its module under `jquant._src.formats`):

* Granularity is one code path: the "grouped view" of a tensor splits `group_axis` (size n) into
  `(n // group_size, group_size)`; the scale is reduced over the inner group axis and over every
  axis that is not a channel axis, with keepdims. Per-tensor and per-channel are the same code
  with no split.
* Arithmetic runs in float32 (float64 for float64 inputs); scales are stored in that dtype.
  bf16/f16 inputs are upcast exactly, and dequantization casts back to the input dtype,
  saturating at its largest finite value (`cast_saturating`).
* Zero scale: a group that is all zeros (or whose scale underflows to 0) gets s = 0; division
  uses 1 in its place (also for a scale below the smallest normal float, which XLA:CPU flushes to
  0 anyway), so q = z and x̂ = 0 exactly — never NaN.
* Eager = jit, bit for bit: XLA rewrites some divisions into multiplications by a rounded
  reciprocal under jit (depending on shapes and the surrounding program) and not eagerly. So no
  formula leaves the choice to it: x / s is computed as x · (1/s) (`divide`), and a division by a
  constant (s = absmax / Qmax, (hi − lo) / (Qmax − Qmin), mean|x| = Σ(|x| / n)) as a
  multiplication by the correctly rounded reciprocal (`divide_by_constant`).
* Dequantize: x̂ = s · (q - z + offset), saturating at ±(float max) when the scale is finite (a
  grid may reach half a step past the data, which at the float limit would overflow).
* NaN/Inf input: not masked. A NaN anywhere in a group makes that group's scale NaN and the whole
  group dequantizes to NaN (at every size: ranges come from `extrema`, not `jnp.max`); an Inf makes the scale Inf and the group dequantizes to NaN/Inf. The
  corruption stays visible; it is never turned into plausible numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

@dataclasses.dataclass(frozen=True)
class Layout:
    """A spec resolved against a shape: where the groups are and which axes a scale spans.

    Attributes:
      shape: the tensor's shape.
      grouped_shape: `shape` with `group_axis` split into (n // group_size, group_size).
      channel_axes: non-negative channel axes in original coordinates.
      group_axis: the non-negative split axis in original coordinates, or None.
      reduce_axes: axes of the grouped view that share one scale.
      transform_axis: the non-negative axis a `spec.rotation` rotates and a `spec.equalization`
        scales (the contraction axis), or None without either: the group axis, or without a group
        the axis a group would default to (the largest axis that is not a channel axis, the last
        of equal ones).
    """

    shape: Tuple[int, ...]
    grouped_shape: Tuple[int, ...]
    channel_axes: Tuple[int, ...]
    group_axis: Optional[int]
    reduce_axes: Tuple[int, ...]
    transform_axis: Optional[int] = None

    @property
    def averaged_axes(self) -> Tuple[int, ...]:
        """The axes an equalization's norms run over (`jquant._src.equalization`): all but
        `transform_axis` and the channel axes leading up to it from axis 0 (a stack's layers)."""
        return _averaged_axes(len(self.shape), self.transform_axis, self.channel_axes)

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


def _axis_problem(axis: int, ndim: int, what: str) -> Optional[str]:
    if -ndim <= axis < ndim:
        return None
    if not ndim:
        return f"QuantSpec.{what}={axis} given for a 0-d tensor, which has no axes"
    return f"QuantSpec.{what}={axis} is out of range for a tensor of rank {ndim}; allowed: {-ndim}..{ndim - 1}"


def layout(shape: Tuple[int, ...], spec) -> Layout:
    """Resolve `spec`'s granularity against `shape`.

    Raises:
      ValueError: what `layout_problem` says.
    """
    problem, lay = _resolve(shape, spec)
    if problem is not None:
        raise ValueError(problem)
    return lay


def layout_problem(shape: Tuple[int, ...], spec) -> Optional[str]:
    """Why `spec` does not fit a tensor of `shape` (None: it fits): a channel/group axis out of
    range, a group size that does not divide its axis, a group size without any non-channel
    axis to split, or a rotation without an axis to rotate or of a size it cannot rotate, or an
    equalization without an axis to act on or to take norms over."""
    return _resolve(shape, spec)[0]


def _resolve(shape, spec):
    shape = tuple(int(d) for d in shape)
    ndim = len(shape)
    for a in spec.channel_axes:
        if _axis_problem(a, ndim, "channel_axes"):
            return _axis_problem(a, ndim, "channel_axes"), None
    channel = tuple(sorted(a % ndim for a in spec.channel_axes))
    if len(set(channel)) != len(channel):
        return f"QuantSpec.channel_axes={spec.channel_axes} name the same axis twice for rank {ndim}", None
    group_axis = None
    candidates = [a for a in range(ndim) if a not in channel]
    # The largest shared axis (the last of equals): the contraction axis of Dense (in, out),
    # Conv HWIO and DenseGeneral kernels alike, and the axis where one scale covers most values.
    default_axis = max(reversed(candidates), key=lambda a: shape[a]) if candidates else None
    if spec.group_size is not None:
        if spec.group_axis is None:
            if not candidates:
                return (f"QuantSpec.group_size={spec.group_size} needs an axis to split, but every axis of shape "
                        f"{shape} is a channel axis {channel}"), None
            group_axis = default_axis
        else:
            if _axis_problem(spec.group_axis, ndim, "group_axis"):
                return _axis_problem(spec.group_axis, ndim, "group_axis"), None
            group_axis = spec.group_axis % ndim
            if group_axis in channel:
                return f"QuantSpec.group_axis={spec.group_axis} is a channel axis {channel} for rank {ndim}", None
        n = shape[group_axis]
        if n % spec.group_size:
            return (f"QuantSpec.group_size={spec.group_size} does not divide axis {group_axis} of size {n} (shape "
                    f"{shape}); choose a divisor of {n}"), None
    rotation = getattr(spec, "rotation", None)
    equalization = getattr(spec, "equalization", None)
    transform_axis = None
    for name, transform in (("rotation", rotation), ("equalization", equalization)):
        if transform is None:
            continue
        transform_axis = default_axis if group_axis is None else group_axis
        if transform_axis is None:
            return (f"QuantSpec.{name}={transform!r} needs an axis to act on (the contraction axis), but every axis "
                    f"of shape {shape} is a channel axis {channel}"), None
    if rotation is not None:
        problem = rotation.size_problem(shape[transform_axis])
        if problem is not None:
            return f"QuantSpec.rotation along axis {transform_axis} of shape {shape}: {problem}", None
    if equalization is not None:
        if not _averaged_axes(ndim, transform_axis, channel):
            return (f"QuantSpec.equalization={equalization!r} scales axis {transform_axis} of shape {shape} by the "
                    f"norms over the other axes, but every other axis is a leading channel (or layer) axis "
                    f"{channel}: there is nothing to take a norm over"), None
    if group_axis is None:
        grouped = shape
        reduce_axes = tuple(a for a in range(ndim) if a not in channel)
    else:
        g = spec.group_size
        grouped = shape[:group_axis] + (shape[group_axis] // g, g) + shape[group_axis + 1:]
        reduce_axes = tuple(sorted(
            [a + (a > group_axis) for a in range(ndim) if a not in channel and a != group_axis] + [group_axis + 1]))
    return None, Layout(shape, grouped, channel, group_axis, reduce_axes, transform_axis)


def _averaged_axes(ndim: int, axis: int, channel: Tuple[int, ...]) -> Tuple[int, ...]:
    leading = 0
    while leading < axis and leading in channel:
        leading += 1
    return tuple(a for a in range(ndim) if a != axis and a >= leading)


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


# Entries of a reduced axis folded elementwise by `extrema` before its reduction (see there).
_FOLD = 32


@functools.partial(jax.jit, static_argnames=("axes", "kind"))
def extrema(x, axes: Tuple[int, ...], kind: str):
    """max|x| (`kind="absmax"`), min x or max x over `axes`, keepdims, with NaN propagated.

    XLA:CPU's vectorised max/min reductions drop NaN (at sizes where it vectorises, e.g. a
    (256, 64) column max), so `jnp.max` alone would let a NaN vanish from a range. Its
    elementwise `maximum`/`minimum` propagate NaN at every size. So the largest reduced axis (not
    the last one, where another is reduced) is first folded elementwise: viewed as (n / F, F), its F inner entries are combined by a balanced
    tree of slices (one fused pass, |x| taken inside it, nothing of the input's size written); the
    F-times smaller rest is then reduced by `jnp.max`/`jnp.min` and checked for NaN by
    `jnp.any(jnp.isnan(...))`, which XLA:CPU reduces exactly. Sharding: the folded entries are an
    inner sub-axis, so a sharded axis keeps its shards on the outer one and the fold needs no
    communication; the reductions are ordinary XLA reductions. Measured on this CPU (2 cores,
    4096² float32, jit): 1.1–1.3× `jnp.max` alone for column, grouped and per-tensor reductions,
    1.3–2.3× for row (per-token) ones; the whole quantize pass
    (`python benchmarks/quantize_throughput.py`) is as fast as before for int8 per channel and
    faster for int4 g128. An empty reduction gives 0.
    """
    combine = jnp.minimum if kind == "min" else jnp.maximum
    lift = jnp.abs if kind == "absmax" else (lambda v: v)
    if x.size == 0:
        return jnp.zeros(tuple(1 if a in axes else n for a, n in enumerate(x.shape)), x.dtype)
    if not axes:
        return lift(x)
    # The fold's slices are whole rows of the inner axes when the folded axis is not the last one
    # (a strided gather of single elements when it is): 2.2x jnp.max for a per-tensor range of a
    # (8, 56, 56, 64) activation instead of 4.9x.
    outer = [a for a in axes if a != x.ndim - 1 and x.shape[a] > 1]
    axis = max(outer or axes, key=lambda a: x.shape[a])
    size = x.shape[axis]
    fold = max(f for f in range(1, _FOLD + 1) if size % f == 0)
    split = x.reshape(x.shape[:axis] + (size // fold, fold) + x.shape[axis + 1:])
    folded = _tree([lift(lax.slice_in_dim(split, i, i + 1, axis=axis + 1)) for i in range(fold)], combine)
    folded = folded.reshape(x.shape[:axis] + (size // fold,) + x.shape[axis + 1:])
    reduce = jnp.min if kind == "min" else jnp.max
    nan = jnp.any(jnp.isnan(folded), axis=axes, keepdims=True)
    return jnp.where(nan, jnp.nan, reduce(folded, axis=axes, keepdims=True)).astype(x.dtype)


def _tree(parts, combine):
    """Balanced pairwise fold of a list (XLA fuses it into one elementwise pass)."""
    while len(parts) > 1:
        parts = [combine(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)] + parts[len(parts) & ~1:]
    return parts[0]


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
    flushes to 0. `bounded=True` says that no scale can come near that (see the uniform grid's
    `reciprocal_is_normal`) and skips the per-element shift — the same numbers, about an eighth
    less time in a quantization pass.
    """
    s = safe_divisor(scale)
    if bounded:
        return x * (1 / s)
    shift = jnp.where(jnp.abs(s) >= 2.0 ** 64, 2.0 ** -64, 1.0).astype(s.dtype)
    return (x * shift) * (1 / (s * shift))


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


def dequantize_grouped(q, scale, zero_point, offset: float = 0.0, *, saturate: bool = True):
    """x̂ = s · (q - z + offset) in the scale's dtype, on the grouped view (`offset` is
    `QuantSpec.offset`: 1/2 for a mid-rise grid).

    The grid can reach half a step beyond the data's range (s = absmax/Qmax rounds, z rounds), so
    for data at the float limit s · (q - z) can exceed the largest float: with a finite scale the
    result saturates at ±max instead of becoming ±Inf. A non-finite scale (NaN/Inf input) is left
    to propagate. `saturate=False` skips that clip, for callers that know no product overflows.
    """
    q = q.astype(scale.dtype)
    if zero_point is not None:
        q = q - zero_point.astype(scale.dtype)
    if offset:
        q = q + offset
    x = scale * q
    if not saturate:
        return x
    largest = jnp.finfo(scale.dtype).max
    return jnp.where(jnp.isfinite(scale), jnp.clip(x, -largest, largest), x)


def saturating_product(scale, q):
    """s · q clipped against a per-group bound: ±(float max) for a finite scale, ±Inf otherwise
    (a non-finite scale stays visible). The same numbers as `dequantize_grouped`'s select per
    element, with one clip (cheaper in a fused elementwise pass)."""
    bound = jnp.where(jnp.isfinite(scale), jnp.finfo(scale.dtype).max, jnp.inf).astype(scale.dtype)
    return jnp.clip(scale * q, -bound, bound)
