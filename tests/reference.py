"""Plain NumPy float64 reference of jquant's quantization formulas (no JAX, no jquant imports).

Written from the conventions in the docstrings of `jquant.numerics` and `jquant.QuantSpec`, not
from their code, and as directly as possible:

* integer range: symmetric b-bit [-(2^(b-1)-1), 2^(b-1)-1], asymmetric [-2^(b-1), 2^(b-1)-1],
  sign {-1, +1};
* granularity: every element belongs to one group; a group is one index of the channel axes and,
  with a group size g, one block of g consecutive elements of the group axis (default: the
  largest non-channel axis, the last of equal ones); all other axes are shared;
* scale: symmetric s = absmax / Qmax; asymmetric lo = min(min x, 0), hi = max(max x, 0),
  s = (hi - lo) / (Qmax - Qmin), z = Qmin - round(lo / s); sign s = mean|x|;
* q = clip(round_half_even(x / s) + z, Qmin, Qmax); sign q = +1 for x >= 0 else -1;
* x̂ = s (q - z); a zero scale divides by 1 instead, so q = z and x̂ = 0.

Also: `as_f64` (any array, bfloat16 included, as float64 — exactly) and `dot_general` (lax's
dimension numbers in NumPy, exact for int64 operands).

Spec arguments are duck-typed: anything with `bits`, `symmetric`, `channel_axes`, `group_size`,
`group_axis` and `method` attributes (a `QuantSpec` will do; only its fields are read).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import ml_dtypes
import numpy as np


def qrange(bits: int, symmetric: bool = True, method: str = "uniform") -> Tuple[int, int]:
    """(Qmin, Qmax) of the integer grid."""
    if method == "sign":
        return -1, 1
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if symmetric else -qmax - 1), qmax


def channel_and_group_axes(shape, spec) -> Tuple[Tuple[int, ...], Optional[int]]:
    """Non-negative channel axes (sorted) and the non-negative group axis (None without groups)."""
    ndim = len(shape)
    axes = spec.channel_axes if isinstance(spec.channel_axes, tuple) else (spec.channel_axes,)
    channel = tuple(sorted(a % ndim for a in axes)) if ndim else ()
    if spec.group_size is None:
        return channel, None
    if spec.group_axis is not None:
        return channel, spec.group_axis % ndim
    shared = [a for a in range(ndim) if a not in channel]
    largest = max(shape[a] for a in shared)
    return channel, [a for a in shared if shape[a] == largest][-1]


def group_ids(shape, spec) -> np.ndarray:
    """An int array of `shape`: the id of the group (the scale) each element belongs to."""
    channel, group_axis = channel_and_group_axes(shape, spec)
    index = np.indices(shape)
    ids = np.zeros(shape, np.int64)
    for a in channel:  # mixed radix: one id per (channel index, group block)
        ids = ids * shape[a] + index[a]
    if group_axis is not None:
        ids = ids * shape[group_axis] + index[group_axis] // spec.group_size
    return ids


def scale_shape(shape, spec) -> Tuple[int, ...]:
    """Documented shape of jquant's scale: `shape` with the group axis split into (n/g, g), then 1
    on every axis that is shared (the inner group axis and every non-channel axis)."""
    channel, group_axis = channel_and_group_axes(shape, spec)
    out = []
    for a, d in enumerate(shape):
        if a == group_axis:
            out += [d // spec.group_size, 1]
        else:
            out.append(d if a in channel else 1)
    return tuple(out)


def expand(per_group, shape, spec) -> np.ndarray:
    """Broadcast an array of `scale_shape(shape, spec)` back to one value per element of `shape`."""
    _, group_axis = channel_and_group_axes(shape, spec)
    grouped = list(shape)
    if group_axis is not None:
        grouped[group_axis:group_axis + 1] = [shape[group_axis] // spec.group_size, spec.group_size]
    return np.broadcast_to(np.asarray(per_group), grouped).reshape(shape)


class Reference(NamedTuple):
    """Per-element results (all of the input's shape): scale and zero point of the element's group,
    the zero point before rounding (Qmin - lo/s; equal to `zero_point` when symmetric or given),
    t = x / s (float64, before rounding), q, x̂."""
    scale: np.ndarray
    zero_point: np.ndarray
    zero_point_unrounded: np.ndarray
    t: np.ndarray
    q: np.ndarray
    x_hat: np.ndarray


def scale_and_zero_point(x, spec) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-element scale, zero point and unrounded zero point (Qmin - lo/s) of `x` (float64)
    computed from each group's values."""
    x = np.asarray(x, np.float64)
    qmin, qmax = qrange(spec.bits, spec.symmetric, spec.method.name)
    _, member_of = np.unique(group_ids(x.shape, spec), return_inverse=True)
    member_of = member_of.ravel()
    n_groups = member_of.max() + 1
    v = x.ravel()
    if spec.method.name == "sign":
        s = np.bincount(member_of, np.abs(v), n_groups) / np.bincount(member_of, None, n_groups)
        z = z_exact = np.zeros(n_groups)
    elif spec.symmetric:
        absmax = np.zeros(n_groups)
        np.maximum.at(absmax, member_of, np.abs(v))  # NaN propagates, as it should
        s, z = absmax / qmax, np.zeros(n_groups)
        z_exact = z
    else:
        lo, hi = np.zeros(n_groups), np.zeros(n_groups)  # starting at 0: lo <= 0 <= hi
        np.minimum.at(lo, member_of, v)
        np.maximum.at(hi, member_of, v)
        s = (hi - lo) / (qmax - qmin)
        z_exact = qmin - lo / np.where(s == 0, 1.0, s)
        z = np.where(np.isnan(z_exact), qmin, np.clip(round_half_even(z_exact), qmin, qmax))
    return tuple(a[member_of].reshape(x.shape) for a in (s, z, z_exact))


def round_half_even(t):
    """Round to nearest, ties to even (NumPy's `np.round` is exactly that)."""
    return np.round(t)


def quantize(x, spec, scale=None, zero_point=None) -> Reference:
    """Reference quantize → dequantize of `x` with the group's own scale (default) or with given
    per-element `scale` / `zero_point` (broadcast to x's shape)."""
    x = np.asarray(x, np.float64)
    qmin, qmax = qrange(spec.bits, spec.symmetric, spec.method.name)
    if scale is None:
        scale, zero_point, zero_point_unrounded = scale_and_zero_point(x, spec)
    else:
        scale = np.broadcast_to(np.asarray(scale, np.float64), x.shape)
        zero_point = np.broadcast_to(np.asarray(0.0 if zero_point is None else zero_point, np.float64), x.shape)
        zero_point_unrounded = zero_point
    divisor = np.where(scale == 0, 1.0, scale)
    t = x / divisor
    if spec.method.name == "sign":
        q = np.where(x < 0, -1.0, 1.0)
    else:
        q = np.clip(round_half_even(t) + zero_point, qmin, qmax)
    x_hat = scale * (q - zero_point)
    return Reference(scale, zero_point, zero_point_unrounded, t, q, x_hat)


def near_tie(t, rtol: float = 1e-5) -> np.ndarray:
    """Where `t` is within `rtol` (relative, at least absolute for |t| < 1) of a .5 rounding tie:
    the only places where float32 arithmetic may round to the other neighbour."""
    t = np.asarray(t, np.float64)
    distance = np.abs(np.abs(t - np.floor(t)) - 0.5)
    return distance <= rtol * np.maximum(np.abs(t), 1.0)


def mse(x, x_hat) -> float:
    """Mean squared error mean((x - x̂)²), in float64."""
    return float(np.mean((as_f64(x) - as_f64(x_hat)) ** 2))


def sqnr_db(x, x_hat) -> float:
    """Signal-to-quantization-noise ratio 10 log10(Σx² / Σ(x - x̂)²) in dB."""
    x = np.asarray(x, np.float64)
    x_hat = np.asarray(x_hat, np.float64)
    return float(10 * np.log10(np.sum(x ** 2) / np.sum((x - x_hat) ** 2)))


def as_f64(a) -> np.ndarray:
    """Any array — NumPy, JAX, bfloat16/float16 (through ml_dtypes) — as float64; exact for every
    float format of 32 bits or fewer."""
    return np.asarray(a).astype(np.float64)


def dot_general(lhs, rhs, dimension_numbers) -> np.ndarray:
    """`lax.dot_general` in NumPy (an einsum with explicit subscripts): contract the paired axes,
    keep the batch axes, lay out as (batch, lhs free, rhs free). Exact for int64 operands."""
    (lc, rc), (lb, rb) = dimension_numbers
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    ls = [next(letters) for _ in range(np.ndim(lhs))]
    rs = [next(letters) for _ in range(np.ndim(rhs))]
    for a, b in zip(tuple(lc) + tuple(lb), tuple(rc) + tuple(rb)):
        rs[b] = ls[a]
    out = [ls[a] for a in lb] + [ls[a] for a in range(len(ls)) if a not in tuple(lc) + tuple(lb)] + \
          [rs[b] for b in range(len(rs)) if b not in tuple(rc) + tuple(rb)]
    return np.einsum(f"{''.join(ls)},{''.join(rs)}->{''.join(out)}", lhs, rhs)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, specs,
                         feature_group_count: int = 1) -> np.ndarray:
    """`lax.conv_general_dilated` in NumPy, written from its definition: the input dilated (zeros
    between elements), padded by explicit `(low, high)` pairs (negative crops), then for every
    kernel tap t the strided input window at offset t·rhs_dilation times the tap's (O, I) matrix,
    per feature group, summed. `specs` = (lhs_spec, rhs_spec, out_spec) as in
    `lax.ConvDimensionNumbers` ((batch, feature, spatial…), (out, in, spatial…), (batch, feature,
    spatial…)). Integer operands are multiplied as float64 (BLAS) and checked to stay below 2^53,
    so the int64 result is exact."""
    lhs_spec, rhs_spec, out_spec = specs
    integer = np.issubdtype(np.asarray(lhs).dtype, np.integer) and np.issubdtype(np.asarray(rhs).dtype, np.integer)
    x = np.transpose(np.asarray(lhs, np.float64), lhs_spec)  # (N, C, spatial...)
    w = np.transpose(np.asarray(rhs, np.float64), rhs_spec)  # (O, I, spatial...)
    if integer:
        assert np.abs(x).max(initial=0) * np.abs(w).max(initial=0) * w[0].size < 2.0 ** 53
    nsp = x.ndim - 2
    dilated = np.zeros(x.shape[:2] + tuple((s - 1) * d + 1 for s, d in zip(x.shape[2:], lhs_dilation)))
    dilated[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in lhs_dilation)] = x
    pads = [(max(lo, 0), max(hi, 0)) for lo, hi in padding]
    x = np.pad(dilated, [(0, 0), (0, 0)] + pads)
    x = x[(slice(None), slice(None)) + tuple(slice(max(-lo, 0), x.shape[2 + i] - max(-hi, 0))
                                             for i, (lo, hi) in enumerate(padding))]
    n, c = x.shape[:2]
    o, i = w.shape[:2]
    g = feature_group_count
    span = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], rhs_dilation)]
    out_sp = [max((s - k) // st + 1, 0) for s, k, st in zip(x.shape[2:], span, window_strides)]
    out = np.zeros((n, g, o // g) + tuple(out_sp))
    for tap in np.ndindex(*w.shape[2:]) if min(out_sp, default=1) > 0 else ():
        window = x[(slice(None), slice(None)) + tuple(
            slice(t * d, t * d + st * (m - 1) + 1, st) for t, d, st, m in zip(tap, rhs_dilation, window_strides, out_sp))]
        window = window.reshape((n, g, i) + tuple(out_sp))
        taps = w[(slice(None), slice(None)) + tap].reshape(g, o // g, i)
        out += np.einsum("ngi...,goi->ngo...", window, taps, optimize=True)
    out = out.reshape((n, o) + tuple(out_sp))
    assert out.ndim == nsp + 2
    out = np.transpose(out, np.argsort(out_spec))
    return np.rint(out).astype(np.int64) if integer else out


# --- floating-point element formats (FP8, MXFP8/MXFP4, NVFP4) ---------------------------------
# Written from `jquant._src.formats.floating`'s docstring: elements are the round-to-nearest-even,
# saturating cast of x / s to the element format (ml_dtypes' casts), x̂ = s · element; FP8
# s = amax / largest per group; MX s = 2^(floor(log2 amax) − emax) per block of 32 (E8M0,
# exponent clipped to [-127, 127]; jquant takes 2s where that lowers the block's squared error);
# NVFP4 s = t · E4M3(amax_block / 6 / t), t = amax / (448 · 6).

def _float_dtypes():
    return {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2,
            "mxfp8": ml_dtypes.float8_e4m3fn, "mxfp4": ml_dtypes.float4_e2m1fn, "nvfp4": ml_dtypes.float4_e2m1fn}


def float_round(v, dtype) -> np.ndarray:
    """v rounded to the element format `dtype` (an ml_dtypes type): clipped to ±largest, then
    ml_dtypes' round-to-nearest-even cast; returned in v's float dtype."""
    largest = float(ml_dtypes.finfo(dtype).max)
    v = np.asarray(v)
    return np.clip(v, -largest, largest).astype(dtype).astype(v.dtype)


def float_quantize(x, spec, refine: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """(per-element scale, x̂) of the floating-point format `spec.method.name` in float64. MX:
    `refine=False` is the OCP rule alone; True (jquant's) takes 2s instead where that gives the
    block a strictly smaller Σ(x − x̂)²."""
    x = np.asarray(x, np.float64)
    name = spec.method.name
    dtype = _float_dtypes()[name]
    largest = float(ml_dtypes.finfo(dtype).max)
    _, member_of = np.unique(group_ids(x.shape, spec), return_inverse=True)
    member_of = member_of.ravel()
    amax = np.zeros(member_of.max() + 1)
    np.maximum.at(amax, member_of, np.abs(x.ravel()))
    if name.startswith("fp8"):
        s = amax / largest
    elif name.startswith("mx"):
        emax = int(np.floor(np.log2(largest)))
        with np.errstate(divide="ignore"):
            exponent = np.clip(np.floor(np.log2(amax)) - emax, -127, 127)
        s = np.where(amax > 0, 2.0 ** exponent, 0.0)
        if refine:  # the exponent one up where that gives a strictly smaller squared error
            def error(scale):
                scale = scale[member_of]
                x_hat = scale * float_round(x.ravel() / np.where(scale == 0, 1.0, scale), dtype)
                return np.bincount(member_of, (x.ravel() - x_hat) ** 2, len(amax))
            s = np.where((error(2 * s) < error(s)) & (exponent < 127), 2 * s, s)
    else:  # nvfp4
        t = amax.max() / (448 * 6)
        s = t * float_round(amax / 6 / (t if t > 0 else 1.0), ml_dtypes.float8_e4m3fn)
    s = s[member_of].reshape(x.shape)
    return s, s * float_round(x / np.where(s == 0, 1.0, s), dtype)


def float_quantize_f32(x, spec) -> np.ndarray:
    """x̂ of an FP8 spec computed as documented in float32: s = amax · fl(1/largest),
    element = cast(x · fl(1/s)), x̂ = s · element (all float32; for bit-exact comparisons)."""
    x = np.asarray(x, np.float32)
    dtype = _float_dtypes()[spec.method.name]
    _, member_of = np.unique(group_ids(x.shape, spec), return_inverse=True)
    member_of = member_of.ravel()
    amax = np.zeros(member_of.max() + 1, np.float32)
    np.maximum.at(amax, member_of, np.abs(x.ravel()))
    s = amax * (np.float32(1) / np.float32(ml_dtypes.finfo(dtype).max))
    s = s[member_of].reshape(x.shape)
    return s * float_round(x * (np.float32(1) / np.where(s == 0, np.float32(1), s)), dtype)
