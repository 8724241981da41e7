"""The quantized `dot_general`: int8 × int8 → int32 with scales applied once, and its path choice.

Math. For operands x̂ = s_l (q_l - z_l) and ŵ = s_r (q_r - z_r) whose scales are constant along the
contracted dimensions k,

    Σ_k x̂ ŵ = s_l s_r [ Σ q_l q_r − z_r Σ_k q_l − z_l Σ_k q_r + K z_l z_r ],

so the bracket is computed exactly in int32 (one integer dot plus row/column-sum corrections) and
multiplied once by s_l·s_r. A contracted axis split into groups (per-group scales) becomes an extra
batch axis of the integer dot; the per-group partial results are scaled and summed in float32.

Exactness: int32 arithmetic wraps modulo 2^32, so intermediate terms may wrap as long as the final
bracket fits; that is guaranteed when K · max|q_l − z_l| · max|q_r − z_r| < 2^31, which is checked
at trace time (ValueError otherwise).

Path choice, measured on XLA:CPU (jax 0.10.2, 2 cores; see benchmarks/ for the script):
* int8 × int8 → int32 is 1.3–1.7× faster than f32 for M ≥ 2 with operands in the standard layout
  (lhs `(B, M, K)`, rhs `(B, K, N)`), so both operands are transposed to that layout first: XLA
  falls off its fast int8 kernel when, e.g., dimension 0 of both operands is contracted.
* With M = 1 (one token, a GEMV) XLA:CPU's int8 kernel is ~10× slower than f32 (23 ms vs 2.4 ms at
  K = N = 4096); padded to M = 2 it runs the int8 GEMM but still takes 1.5–2× the f32 time, and
  converting the int8 weight to f32 or bf16 costs ~20 ms (the conversion alone). What does beat
  f32: cutting K into chunks of 128–512 that become a batch axis (a free reshape of the `(K, N)`
  weight), the row padded to two in each chunk, then summing the chunks' int32 results — about
  0.6–1.2× f32 on a loaded 2-core machine (benchmarks/RESULTS.md; K = 11008 fares worst), on par
  with an int8 weight stored `(N, K)`, which would need a transposed QArray storage.
  `_gemv_chunks` picks the fewest chunks of ≤ 512; a K with no divisor in 128..512 keeps the plain
  padded dot.
* Operands whose scales vary along a contracted axis (other than one shared group split) cannot
  take the integer path; that is a configuration error, reported, never a silent float fallback.

Weight-only (a QArray weight, a float activation), measured the same way. Dequantizing the whole
weight and then running the float dot costs 11–12× the float time at K = N = 4096 and M = 1,
5–6× at M = 16, 2× at M = 256: XLA:CPU materialises the float weight and converts it at a
fraction of memory speed (and inside a generation loop it hoists that conversion out of the
loop, keeping a float copy of every weight alive). So on CPU the weight is taken a few rows at a
time inside a `lax.scan`, each chunk converted while it is in cache and multiplied at once, the
partial products summed in float32: the weight stays quantized in memory (temporaries: one float
chunk) and no float copy can be hoisted, since every chunk's conversion depends on the scan.
* Any Dense-like layout is viewed as x `(..., K)` · w `(K, N)` (`_dense_view`: contracted axes
  merged into K, free axes into N, scales broadcast along N, a group along the contraction a group
  of K) — Flax attention's 3-D `(in, heads, head_dim)` and `(heads, head_dim, out)` kernels too.
* Sub-byte codes are packed along N (8/b per byte for b = 1, 2, 4); unpacking a chunk interleaves
  them (a shuffle: 4–6× float at M = 1). Each bit plane of the bytes (the columns ≡ i mod 8/b) is
  decoded with its columns' scales and multiplied on its own — shifts and masks on whole bytes —
  and the planes' outputs are interleaved at the end (3-bit codes straddle bytes and are unpacked).
  The planes' scales and zero-points are gathered contiguous once, before the loop (read with a
  stride inside the decode they cost a gather per element), and an asymmetric grid's zero-point
  is subtracted from the codes in int8 (code − (z − Qmin), exact) before the conversion to float.
  Together: int4 g128 at M = 1 from 1.20× to 1.10× int8's time on 4096² and from 1.27× to
  0.87–1.0× float on the LM decode (512-wide layers, where the stride cost the most).
* Each chunk (512, 256 or 128 rows, `_WEIGHT_CHUNKS`: the largest that cuts K at least in two;
  at most 256 for more than 64 rows of x) is dequantized as `QArray.dequantize` would, its float-limit clip only where a scale needs it
  (`Format.saturates`, chosen by `lax.cond`: the clip is a third of an int4 chunk's decode).
  Multiplying the stored integers as they are and scaling after the dot (s·(Σ x q − z Σ x), no
  per-element scale) looked faster on a loaded machine but measured 1.0–1.5× the dequantized
  chunks on an idle one, and needs centring against cancellation: not used.
* Temporaries: the float chunk (chunk × N × 4 bytes), the f32 accumulator (rows of x × N) and
  the output; x's chunks are read in place (`dynamic_slice`, not a split copy of x). For a
  4096² layer at 256 rows, 512-row chunks held 17.3 MB (over a quarter of the 67 MB float
  weight) and 256-row chunks 12.9 MB at the same speed (1.08× vs 1.11× the float dot, alternating),
  hence the cap; at up to 64 rows 512-row chunks were as fast or faster (int4 g128 at 64 rows:
  0.88× vs 0.97×).
Taken for at most `_WEIGHT_ONLY_MAX_ROWS` rows (the largest measured) and K a multiple of 128;
anything else (GPU/TPU, which fuse the dequantization into the dot themselves; batch axes;
other layouts) dequantizes whole. Measured ratios: benchmarks/RESULTS.md ("Weight-only
inference", "LM decoding").

Rotated and equalized operands (`QuantSpec(rotation=...)`: a QArray storing Q(Rᵀ·W), dequantizing to
R·Q(Rᵀ·W); `jquant._src.rotation`), decided in one place, `transformed_operands`, before anything
above: since x·(R·W') = (x·R)·W' (R along a contracted axis, x·R = Rᵀ applied to x along the
paired axis), a float operand is rotated online and the QArray taken in its stored basis
(`qarray.in_stored_basis`) — the rotated weight never becomes a float matrix, and its dot is any
of the paths above (the weight-only chunks, or, with an activation spec, the integer path on
the quantized *rotated* activation). Two QArrays rotated alike along a contracted pair multiply
their stored integers (Σ (R q_x)(R q_w) = Σ q_x q_w). A rotation along a free axis, or a
rotated QArray met by a differently rotated one, is dequantized (R·Q, then the float dot).
An equalized operand (`QuantSpec(equalization=...)`, dequantizing to r·Q(W / r), or r·R·Q(Rᵀ·W / r)
with a rotation) moves the same way: the float operand is scaled by r along the paired axis
(then rotated), x·(r·W') = (x·r)·W'; two QArrays of which one is equalized are dequantized.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from jquant._src import float_dot, numerics, packing, rotation
from jquant._src.qarray import QArray, decode, in_stored_basis, quantize
from jquant._src.spec import QuantSpec, transformed

_INT32_LIMIT = 2 ** 31
# Chunk lengths for splitting a single row's contraction (module docstring, "M = 1").
_GEMV_CHUNK_MIN, _GEMV_CHUNK_MAX = 128, 512
# Weight-only dot on XLA:CPU (module docstring, "Weight-only"): rows of the weight per scan step,
# and the most rows of the other operand for which the chunked path is taken.
_WEIGHT_CHUNKS = (512, 256, 128)
_WEIGHT_ONLY_MAX_ROWS = 256
# Above this many rows of the other operand, chunks of at most this many weight rows (the float
# chunk is a temporary beside the rows' accumulator: module docstring, "Weight-only").
_WEIGHT_ONLY_WIDE_ROWS, _WEIGHT_WIDE_CHUNK = 64, 256


@jax.tree_util.register_pytree_with_keys_class
class Accumulator:
    """An exact int32 dot result and the float scale that turns it into real numbers.

    Attributes:
      value: int32 array; the output of `lax.dot_general` (batch, lhs free, rhs free dims), with
        one extra axis at `group_axis` when the contraction was split into groups.
      scale: float32 array broadcastable to `value`: s_lhs · s_rhs.
      group_axis: static; the axis summed over after scaling, or None.
    """

    def __init__(self, value, scale, group_axis: Optional[int] = None):
        self.value = value
        self.scale = scale
        self.group_axis = group_axis

    def tree_flatten_with_keys(self):
        keys = jax.tree_util.GetAttrKey
        return ((keys("value"), self.value), (keys("scale"), self.scale)), self.group_axis

    @classmethod
    def tree_unflatten(cls, group_axis, children):
        return cls(*children, group_axis=group_axis)

    def dequantize(self, dtype=jnp.float32):
        """y = value · scale (summed over the group axis), as `dtype`."""
        y = self.value.astype(self.scale.dtype) * self.scale
        if self.group_axis is not None:
            y = jnp.sum(y, axis=self.group_axis)
        return y.astype(dtype)


def requantize(acc: Accumulator, spec: QuantSpec, *, scale=None, zero_point=None) -> QArray:
    """Quantize an integer dot's result for the next integer layer: q_y = round(y / s_y) + z_y.

    y = acc.value · (s_l s_r) is formed in float32 (one multiply), then quantized with `spec`
    by a fixed (calibrated) `scale`/`zero_point`, or dynamically from y's own range.
    """
    return quantize(acc.dequantize(jnp.float32), spec, scale=scale, zero_point=zero_point)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                lhs_spec: Optional[QuantSpec] = None, rhs_spec: Optional[QuantSpec] = None):
    """`lax.dot_general` for quantized operands; a drop-in for `nn.Dense(dot_general=...)`.

    Operands may be QArrays or float arrays. A float operand with a spec is quantized on the fly
    (dynamic quantization: its scale comes from this call's values). A rotated or equalized
    QArray (`QuantSpec(rotation=..., equalization=...)`) rotates and scales the other operand
    online (module docstring, "Rotated and equalized operands"); the other's spec then quantizes
    that operand (W4A8, W4A4 with rotation).
    * QArray × QArray → the exact integer path (`int_dot_general`), then one multiply by s_l·s_r.
      With floating-point elements (FP8, MX, NVFP4) → `jquant._src.float_dot` instead.
    * QArray × float (no spec) → weight-only: the QArray is dequantized and a float dot runs.
    * float × float → plain `lax.dot_general`.

    Args:
      lhs, rhs: QArray or float arrays.
      dimension_numbers: `((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))` as in lax.
      precision: passed to the float dot (unused by the integer dot, which is exact).
      preferred_element_type: float output dtype; default the operands' float result type.
      lhs_spec, rhs_spec: specs to quantize float operands with.

    Returns:
      float array shaped like `lax.dot_general`'s output.
    """
    # A rotated or equalized spec quantizes first (its QArray is resolved with the others); a
    # plain spec quantizes what `transformed_operands` leaves, i.e. the scaled, rotated activation.
    first = lambda x, spec: spec is not None and (transformed(spec) or isinstance(x, QArray))  # noqa: E731
    lhs, lhs_spec = (quantize_operand(lhs, lhs_spec, "lhs"), None) if first(lhs, lhs_spec) else (lhs, lhs_spec)
    rhs, rhs_spec = (quantize_operand(rhs, rhs_spec, "rhs"), None) if first(rhs, rhs_spec) else (rhs, rhs_spec)
    lhs, rhs = transformed_operands(lhs, rhs, dimension_numbers)
    lhs = quantize_operand(lhs, lhs_spec, "lhs")
    rhs = quantize_operand(rhs, rhs_spec, "rhs")
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise ValueError(f"preferred_element_type={jnp.dtype(out_dtype).name} must be a float dtype; "
                         "for the raw int32 accumulator use jquant.int_dot_general")
    if isinstance(lhs, QArray) and isinstance(rhs, QArray):
        if float_dot.takes(lhs, rhs):  # floating-point elements (FP8, MX, NVFP4): float_dot's docstring
            return float_dot.dot_general(lhs, rhs, dimension_numbers, precision, out_dtype)
        return int_dot_general(lhs, rhs, dimension_numbers).dequantize(out_dtype)
    if isinstance(rhs, QArray) and not isinstance(lhs, QArray):
        return _weight_only(lhs, rhs, dimension_numbers, precision, preferred_element_type, out_dtype)
    lhs = lhs.dequantize() if isinstance(lhs, QArray) else lhs
    rhs = rhs.dequantize() if isinstance(rhs, QArray) else rhs
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)


def transformed_operands(lhs, rhs, dimension_numbers):
    """(lhs, rhs) for the same product with no rotated or equalized QArray left (module
    docstring, "Rotated and equalized operands"): such a QArray whose transform axis is contracted moves its
    transform onto the other operand — a float one is scaled by r and rotated (`onto_other`),
    one rotated alike (neither equalized) loses its rotation too — and is taken in its stored
    basis; any other is dequantized."""
    (lc, rc), _ = dimension_numbers
    rhs, lhs = _move_transform(rhs, lhs, rc, lc)
    lhs, rhs = _move_transform(lhs, rhs, lc, rc)
    return lhs, rhs


def transformed_pair(a_shape, spec: QuantSpec, a_contract, b_contract):
    """(a's transform axis, the paired axis of the other operand) for an operand of `a_shape`
    quantized with the rotated or equalized `spec`, or None when that axis is not contracted."""
    axis = numerics.layout(tuple(a_shape), spec).transform_axis
    contract = [c % len(a_shape) for c in a_contract]
    return (axis, b_contract[contract.index(axis)]) if axis in contract else None


def onto_other(b, spec: QuantSpec, eq_scale, axis: int):
    """The other operand's side of a·b with a stored as Rᵀ·(a / r): b·r along `axis` (r from
    `eq_scale`, a vector of b.shape[axis] values), then Rᵀ along `axis`; in float32, cast back
    to b's dtype."""
    dtype = jnp.result_type(b)
    if eq_scale is not None:
        r = jnp.reshape(eq_scale, (-1,) + (1,) * (jnp.ndim(b) - axis - 1))
        compute = numerics.compute_dtype(dtype)
        b = jnp.asarray(b, compute) * r.astype(compute)
    if spec.rotation is not None:
        b = rotation.to_rotated(b, spec.rotation, axis)
    return jnp.asarray(b).astype(dtype)


def _move_transform(a, b, a_contract, b_contract):
    if not isinstance(a, QArray) or not transformed(a.spec):
        return a, b
    pair = transformed_pair(a.shape, a.spec, a_contract, b_contract)
    if pair is None or (a.eq_scale is not None and a.eq_scale.size != a.shape[pair[0]]):
        return a.dequantize(), b  # not contracted, or r varies along more (a stack not sliced)
    paired = pair[1] % b.ndim
    if not isinstance(b, QArray):
        return in_stored_basis(a), onto_other(b, a.spec, a.eq_scale, paired)
    if (a.spec.equalization is None and b.spec.equalization is None and b.spec.rotation == a.spec.rotation
            and b.layout.transform_axis == paired):
        return in_stored_basis(a), in_stored_basis(b)
    return a.dequantize(), b


def _weight_only(x, w: QArray, dimension_numbers, precision, preferred_element_type, out_dtype):
    """x · ŵ for a float x and a QArray weight w (module docstring, "Weight-only"): chunked on
    XLA:CPU where `_dense_view` applies, otherwise w dequantized whole next to the dot."""
    view = _dense_view(x, w, dimension_numbers)
    if view is not None and (chunk := _weight_chunk(*view[:2])):
        x2, w2, out_shape = view
        return jnp.reshape(_chunked_weight_only(x2, w2, chunk, precision, out_dtype), out_shape)
    return lax.dot_general(x, w.dequantize(), dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)


def _dense_view(x, w: QArray, dimension_numbers):
    """(x2, w2, output shape): the dot as x2 `(..., K)` · w2 `(K, N)`, with w2 a 2-D QArray over
    the same storage (contracted axes merged into K, free axes into N; scales broadcast along N,
    a group along the contraction becomes a group of K), or None where that is no free reshape:
    batch axes, w's contracted axes not its leading ones in x's trailing order, scales that vary
    along the contraction other than by one group axis, or sub-byte codes padded at the end of a
    row of a weight with several free axes."""
    (contract, batch) = dimension_numbers
    c = len(contract[1])
    if (tuple(batch[0]) or tuple(batch[1]) or not 0 < c < w.ndim or tuple(contract[1]) != tuple(range(c))
            or tuple(a % x.ndim for a in contract[0]) != tuple(range(x.ndim - c, x.ndim))):
        return None
    lay, spec = w.layout, w.spec
    if any(a < c for a in lay.channel_axes) or (lay.group_axis is not None and lay.group_axis >= c):
        return None
    k, free = math.prod(w.shape[:c]), w.shape[c:]
    n = math.prod(free)
    per_byte = 8 // spec.bits if packing.is_packed(spec.bits) else 1
    if w.ndim - c > 1 and free[-1] % per_byte:
        return None
    levels = tuple(w.scale.shape[len(lay.scale_shape):])  # a codebook's levels per group (k-means)
    if lay.group_axis is None:
        group, scale_shape = None, (1,) * c + free
    else:
        a, g = lay.group_axis, spec.group_size
        group = g * math.prod(w.shape[a + 1:c])
        scale_shape = w.shape[:a] + (w.shape[a] // g, 1) + (1,) * (c - a - 1) + free
    flat = lambda s: None if s is None else jnp.reshape(
        jnp.broadcast_to(s, scale_shape + levels[:s.ndim - len(scale_shape)]),
        ((1, n) if group is None else (k // group, 1, n)) + levels[:s.ndim - len(scale_shape)])
    spec2 = dataclasses.replace(spec, channel_axes=(1,), group_axis=None if group is None else 0, group_size=group)
    value = jnp.reshape(w.value, (k, w.value.size // k))
    w2 = QArray(value, flat(w.scale), flat(w.zero_point), spec=spec2, shape=(k, n), dtype=w.dtype)
    return jnp.reshape(x, x.shape[:x.ndim - c] + (k,)), w2, x.shape[:x.ndim - c] + free


def _weight_chunk(x, w: QArray) -> int:
    """Rows of the 2-D weight per step of the chunked weight-only dot, or 0 to dequantize it whole
    (module docstring, "Weight-only"): XLA:CPU, at most `_WEIGHT_ONLY_MAX_ROWS` rows of x, and
    the largest of `_WEIGHT_CHUNKS` (each a multiple of the weight's group size) that cuts K into
    two or more chunks."""
    rows = x.size // max(x.shape[-1], 1)
    if jax.default_backend() != "cpu" or rows > _WEIGHT_ONLY_MAX_ROWS:
        return 0
    k = w.shape[0]
    chunks = [math.lcm(c, w.spec.group_size or 1) for c in _WEIGHT_CHUNKS
              if rows <= _WEIGHT_ONLY_WIDE_ROWS or c <= _WEIGHT_WIDE_CHUNK]
    return next((c for c in chunks if k % c == 0 and k > c), 0)


def _zeros(shape, *operands):
    """float32 zeros of `shape` that vary over every manual mesh axis some operand varies over:
    inside `jax.shard_map` a scan's initial carry must have its body's output type, which the
    operands make it (`zeros_like` keeps an operand's axes; adding its zero scalar is exact)."""
    zeros = jnp.zeros(shape, jnp.float32)
    for a in operands:
        zeros = zeros + jnp.zeros_like(a, jnp.float32, shape=())
    return zeros


def _chunked_weight_only(x, w: QArray, chunk: int, precision, out_dtype):
    """x · ŵ for x `(..., K)` and a 2-D QArray w `(K, N)`, ŵ dequantized `chunk` rows at a time
    inside a `lax.scan` (each chunk converted while it is in cache and multiplied at once), the
    partial products summed in float32 (module docstring, "Weight-only")."""
    k, n = w.shape
    bits = w.spec.bits
    # Codes packed b bits apiece along N (b = 1, 2, 4): plane i of the bytes holds the columns
    # ≡ i mod 8/b. Each plane is decoded with its columns' scales and multiplied on its own, and
    # the planes' outputs are interleaved at the end — shifting and masking whole bytes, where
    # unpacking the weight first would interleave (shuffle) every chunk.
    planes = 8 // bits if packing.is_packed(bits) and 8 % bits == 0 and n % (8 // bits) == 0 else 1
    mask = jnp.uint8((1 << bits) - 1)

    n_axis = len(w.layout.scale_shape) - 1  # of the scales (a k-means codebook's levels follow it)
    # The scales and zero-points of plane i (columns i, i + planes, ...), gathered once here into
    # (planes, ...) — read with a stride inside the chunk's decode they cost it a gather per element.
    by_plane = lambda a: None if a is None else (
        jnp.broadcast_to(a, (planes,) + a.shape) if a.shape[n_axis] == 1 else jnp.moveaxis(jnp.reshape(
            a, a.shape[:n_axis] + (a.shape[n_axis] // planes, planes) + a.shape[n_axis + 1:]), n_axis + 1, 0))
    steps = k // chunk
    split = lambda a, axis: None if a is None else jnp.moveaxis(
        jnp.reshape(a, a.shape[:axis] + (steps, a.shape[axis] // steps) + a.shape[axis + 1:]), axis, 0)
    grouped = w.spec.group_size is not None  # scales vary along K: they are cut with the rows
    scale, zero_point = by_plane(w.scale), by_plane(w.zero_point)
    asymmetric = planes > 1 and not w.spec.symmetric
    if asymmetric:
        # An asymmetric grid is the uniform one: q = code + Qmin, so q − z = code − (z − Qmin),
        # exact in int8 for b ≤ 4 and subtracted before the conversion (one float subtraction
        # and conversion per element fewer); the chunk is then decoded with no zero-point.
        zero_point = zero_point - w.spec.method.from_codes(jnp.uint8(0), w.spec)
    xs = (jnp.arange(steps) * chunk, split(w.value, 0),
          split(scale, 1) if grouped else None, split(zero_point, 1) if grouped else None)

    def step(saturate, acc, chunk_xs):
        start, value, chunk_scale, chunk_zero_point = chunk_xs
        xc = lax.dynamic_slice_in_dim(x, start, chunk, axis=x.ndim - 1)
        s, z = (scale, zero_point) if chunk_scale is None else (chunk_scale, chunk_zero_point)
        if planes == 1:  # int8 storage, or 3-bit codes that straddle bytes: the chunk's integers
            qs = [QArray(value, s[0], None if z is None else z[0], spec=w.spec, shape=(chunk, n), dtype=w.dtype).q]
        else:
            codes = [(value >> jnp.uint8(bits * i)) & mask for i in range(planes)]
            if asymmetric:  # q − z (see `zero_point` above), on the chunk's grouped view
                lay = numerics.layout((chunk, n // planes), w.spec)
                qs = [lay.from_grouped(lay.to_grouped(c.astype(jnp.int8)) - z[i]) for i, c in enumerate(codes)]
            else:
                qs = [w.spec.method.from_codes(c, w.spec) for c in codes]
        dims = (((xc.ndim - 1,), (0,)), ((), ()))
        return acc + jnp.stack([
            lax.dot_general(xc, decode(q, s[i], None if z is None or asymmetric else z[i], w.spec, (chunk, n // planes),
                                       w.dtype, saturate=saturate), dims, precision=precision,
                            preferred_element_type=jnp.float32)
            for i, q in enumerate(qs)]), None

    acc = _zeros((planes,) + x.shape[:-1] + (n // planes,), x, w.value, w.scale)
    run = lambda saturate: lax.scan(functools.partial(step, saturate), acc, xs)[0]
    # Dequantizing clips each product s·(q − z) at the float range's edge, a per-element select
    # that costs a third of an int4 chunk's decode; it is skipped unless some scale is large
    # enough for it to matter (`Format.saturates`), so the result is always dequantize-then-dot's.
    saturates = w.spec.method.saturates(w.scale, w.zero_point, w.spec)  # None: its decode never clips
    acc = run(True) if saturates is None else lax.cond(saturates, lambda: run(True), lambda: run(False))
    # plane i holds the columns i, i + planes, ...: interleave them back (a small output array)
    return jnp.reshape(jnp.moveaxis(acc, 0, -1), x.shape[:-1] + (n,)).astype(out_dtype)


def quantize_operand(x, spec: Optional[QuantSpec], name: str, op: str = "dot_general"):
    """`x` quantized with `spec` (dynamic quantization of a float operand of `op`), or `x` itself
    when `spec` is None; errors name the op and the operand (`name`: "lhs" / "rhs")."""
    if spec is None:
        return x
    if isinstance(x, QArray):
        raise ValueError(f"{op}: {name}_spec given but {name} is already a QArray ({x.spec!r})")
    try:
        return quantize(x, spec)
    except (TypeError, ValueError) as err:  # say which operand
        raise type(err)(f"{op}: {name} of shape {jnp.shape(x)} with {name}_spec={spec!r}: {err}") from None


def int_dot_general(lhs: QArray, rhs: QArray, dimension_numbers) -> Accumulator:
    """The exact integer dot of two QArrays: int32 bracket (see module docstring) and s_l·s_r.

    Two operands rotated alike along a contracted pair multiply their stored integers (module
    docstring, "Rotated and equalized operands"); another rotated or an equalized operand is an
    error (`jquant.dot_general` rotates and scales a float operand online instead).

    Raises:
      TypeError: an operand is not a QArray.
      ValueError: what `integer_dot_problem` says.
    """
    require_qarrays("int_dot_general", lhs, rhs)
    if lhs.spec.rotation is not None and rhs.spec.rotation == lhs.spec.rotation:
        alike = transformed_operands(lhs, rhs, dimension_numbers)
        lhs, rhs = alike if all(isinstance(a, QArray) for a in alike) else (lhs, rhs)
    problem, plan = _plan(lhs, rhs, dimension_numbers)
    if problem is not None:
        raise ValueError(problem)
    (lc, lb), (rc, rb), split, k = plan
    left = _Operand(lhs, lc, lb, split[0] if split else None, split[2] if split else None, "lhs")
    right = _Operand(rhs, rc, rb, split[1] if split else None, split[2] if split else None, "rhs")

    acc = _canonical_int_dot(left, right)
    n_free_r = len(right.free)
    n_free_l = len(left.free)
    # Zero-point corrections, each aligned to the output layout (batch, lhs free, rhs free).
    if right.zero_point is not None:
        acc = acc - right.aligned(right.zero_point, n_free_l) * left.contract_sum(n_free_r)
    if left.zero_point is not None:
        acc = acc - left.aligned(left.zero_point, n_free_r) * right.contract_sum(n_free_l)
    if left.zero_point is not None and right.zero_point is not None:
        acc = acc + k * left.aligned(left.zero_point, n_free_r) * right.aligned(right.zero_point, n_free_l)
    scale = left.aligned(left.scale, n_free_r) * right.aligned(right.scale, n_free_l)
    return Accumulator(acc, scale.astype(jnp.float32), len(lb) if split else None)


def require_qarrays(op: str, lhs, rhs) -> None:
    """TypeError naming `op` and the operand unless both operands are QArrays (the integer ops)."""
    for name, operand in (("lhs", lhs), ("rhs", rhs)):
        if not isinstance(operand, QArray):
            raise TypeError(f"{op}: {name} must be a QArray, got {type(operand).__name__}")


def integer_dot_problem(lhs, rhs, dimension_numbers) -> Optional[str]:
    """Why `int_dot_general` cannot multiply these operands (None: it can), from their shapes and
    specs alone (`lhs`, `rhs`: anything with `.shape` and `.spec`, e.g. QArrays or `Operand`s of
    float operands about to be quantized): a format without an integer grid, axes out of range or
    unpaired, a scale that varies along a contracted axis, groups along a non-contracted axis or
    on two different contracted axes, mismatched group sizes, or an int32 overflow risk."""
    return _plan(lhs, rhs, dimension_numbers)[0]


class Operand(NamedTuple):
    """The shape and spec of an operand that is not quantized yet (for `integer_dot_problem`)."""
    shape: Tuple[int, ...]
    spec: QuantSpec


def _plan(lhs, rhs, dimension_numbers):
    """(problem, None), or (None, ((lc, lb), (rc, rb), group split or None, K)) in normalized axes."""
    for name, op in (("lhs", lhs), ("rhs", rhs)):
        problem = op.spec.method.integer_problem(op.spec)
        if problem is not None:
            return f"int_dot_general: {name} {problem}", None
        if op.spec.equalization is not None:
            return (f"int_dot_general: {name} is equalized ({op.spec!r}); its integers are those of x / r, so they "
                    "multiply no integers of the other operand; jquant.dot_general scales a float operand online"), None
        if op.spec.rotation is not None:
            return (f"int_dot_general: {name} is rotated ({op.spec!r}) and the other operand is not rotated alike "
                    "along the paired contracted axis; jquant.dot_general rotates a float operand online"), None
    (lc, rc), (lb, rb) = dimension_numbers
    for name, op, given in (("lhs", lhs, tuple(lc) + tuple(lb)), ("rhs", rhs, tuple(rc) + tuple(rb))):
        ndim = len(op.shape)
        bad = [a for a in given if not -ndim <= a < ndim]
        if bad:
            return (f"dimension_numbers: {name} axis {bad[0]} out of range for rank {ndim}; "
                    f"allowed: {-ndim}..{ndim - 1}"), None
    lc, lb = (tuple(a % len(lhs.shape) for a in axes) for axes in (lc, lb))
    rc, rb = (tuple(a % len(rhs.shape) for a in axes) for axes in (rc, rb))
    if len(lc) != len(rc) or len(lb) != len(rb):
        return f"dimension_numbers {dimension_numbers}: lhs and rhs name different numbers of axes", None
    for name, named in (("lhs", lc + lb), ("rhs", rc + rb)):
        if len(set(named)) != len(named):
            return (f"dimension_numbers {dimension_numbers}: {name} names an axis twice (contracting and batch "
                    "axes must be distinct)"), None
    for a, b in zip(lc + lb, rc + rb):
        if lhs.shape[a] != rhs.shape[b]:
            return (f"lhs axis {a} (size {lhs.shape[a]}) and rhs axis {b} (size {rhs.shape[b]}) are paired by "
                    f"dimension_numbers but differ in size; shapes {lhs.shape} × {rhs.shape}"), None

    splits = set()
    for name, op, mine, theirs in (("lhs", lhs, lc, rc), ("rhs", rhs, rc, lc)):
        lay = numerics.layout(op.shape, op.spec)
        varying = [a for a in mine if a in lay.channel_axes]
        if varying:
            return (f"int_dot_general: {name} scale varies along a contracted axis ({op.spec!r} on shape "
                    f"{tuple(op.shape)}); an integer dot needs scales constant along contracted axes (per-channel "
                    "on a free axis, or groups along the contraction)"), None
        if lay.group_axis is None:
            continue
        if lay.group_axis not in mine:
            return (f"int_dot_general: {name} is grouped along axis {lay.group_axis}, which is not contracted "
                    f"(contracting axes {mine}); integer dots support groups along a contracting axis"), None
        i = mine.index(lay.group_axis)
        pair = (lay.group_axis, theirs[i]) if name == "lhs" else (theirs[i], lay.group_axis)
        splits.add(pair + (op.spec.group_size,))
    if len(splits) > 1:
        return (f"int_dot_general: lhs and rhs groups do not line up ({sorted(splits)} as (lhs axis, rhs axis, "
                "group size)); use the same group size on the same contracted axis pair"), None
    split = splits.pop() if splits else None

    k = math.prod(lhs.shape[a] for a in lc) // (lhs.shape[split[0]] // split[2] if split else 1)
    magnitude = lhs.spec.integer_magnitude * rhs.spec.integer_magnitude
    if k * magnitude >= _INT32_LIMIT:
        return (f"int32 accumulator could overflow: K={k} × {lhs.spec.integer_magnitude} × "
                f"{rhs.spec.integer_magnitude} = {k * magnitude} ≥ 2^31; allowed: K ≤ "
                f"{(_INT32_LIMIT - 1) // magnitude} for these specs — split the contraction with group_size or use "
                "fewer bits"), None
    return None, ((lc, lb), (rc, rb), split, k)


class _Operand:
    """One operand in "split" coordinates: the group axis (if any) is (outer, inner); the outer part
    is a batch axis of the integer dot, the inner part is contracted."""

    def __init__(self, qa: QArray, contract, batch, split_axis, group_size, name):
        shape = qa.shape
        q, scale, zero_point = qa.q, qa.scale, qa.zero_point
        q, scale = qa.spec.method.integer_operand(q, scale, qa.spec)
        if split_axis is not None:
            own_split = qa.layout.group_axis == split_axis

            def split(a, sizes):
                return jnp.reshape(a, a.shape[:split_axis] + sizes + a.shape[split_axis + 1:])

            q = split(q, (shape[split_axis] // group_size, group_size))
            if not own_split:  # the scale is constant along this axis: insert its size-1 inner axis
                scale = split(scale, (1, 1))
                zero_point = None if zero_point is None else split(zero_point, (1, 1))

            def mapped(a):
                return a + 1 if a > split_axis else a

            contract = tuple(split_axis + 1 if a == split_axis else mapped(a) for a in contract)
            batch = tuple(mapped(a) for a in batch) + (split_axis,)
        free = tuple(a for a in range(q.ndim) if a not in contract and a not in batch)
        self.q, self.scale, self.zero_point = q, scale, zero_point
        self.contract, self.batch, self.free = contract, batch, free
        self.is_lhs = name == "lhs"

    def canonical(self):
        """q transposed to (batch, free, contract) for lhs or (batch, contract, free) for rhs, as 3-D."""
        order = self.batch + (self.free + self.contract if self.is_lhs else self.contract + self.free)
        q = jnp.transpose(self.q, order)
        sizes = [math.prod(self.q.shape[a] for a in axes) for axes in (self.batch, self.free, self.contract)]
        b, f, c = sizes
        return jnp.reshape(q, (b, f, c) if self.is_lhs else (b, c, f))

    def aligned(self, a, n_other_free):
        """A scale-shaped array (size 1 on contracted axes) laid out as the output: the lhs's free
        axes before the rhs's, with size-1 axes standing for the other operand's free axes."""
        a = jnp.transpose(a, self.batch + self.free + self.contract)
        a = jnp.reshape(a, a.shape[:len(self.batch) + len(self.free)])
        ones = (1,) * n_other_free
        nb = len(self.batch)
        shape = a.shape[:nb] + (a.shape[nb:] + ones if self.is_lhs else ones + a.shape[nb:])
        return jnp.reshape(a, shape).astype(jnp.int32 if a.dtype == jnp.int8 else a.dtype)

    def contract_sum(self, n_other_free):
        """Σ over contracted axes of q (int32), aligned to the output layout."""
        s = jnp.sum(self.q, axis=self.contract, dtype=jnp.int32)  # axes left: batch + free, in order
        s = jnp.transpose(s, _rank_order(self.batch, self.free))
        nb = len(self.batch)
        ones = (1,) * n_other_free
        return jnp.reshape(s, s.shape[:nb] + (s.shape[nb:] + ones if self.is_lhs else ones + s.shape[nb:]))


def _rank_order(batch, free):
    """Permutation taking the remaining axes (sorted by position) to batch-then-free order."""
    remaining = sorted(batch + free)
    return tuple(remaining.index(a) for a in batch + free)


def _gemv_chunks(k: int) -> int:
    """How many chunks to split a single row's contraction of length `k` into (1 = no split).

    The fewest chunks c with k % c == 0 and _GEMV_CHUNK_MIN ≤ k / c ≤ _GEMV_CHUNK_MAX; 1 when k is
    already short or has no such divisor (the unsplit padded GEMM is exact too, only slower).
    """
    if k <= _GEMV_CHUNK_MAX:
        return 1
    for c in range(-(-k // _GEMV_CHUNK_MAX), k // _GEMV_CHUNK_MIN + 1):
        if k % c == 0:
            return c
    return 1


def _canonical_int_dot(left: _Operand, right: _Operand):
    """int32 dot of the canonical (B, M, K) × (B, K, N) forms, reshaped to (batch, lhs free, rhs free)."""
    l3, r3 = left.canonical(), right.canonical()
    b, m, k = l3.shape
    n = r3.shape[2]
    dims = (((2,), (1,)), ((0,), (0,)))
    if m == 1:
        # A single row (module docstring): K is cut into c chunks that become batch entries (both
        # reshapes are free: M = 1 and K is the rhs's major axis), the row is padded to two, and
        # the c partial int32 sums are added. Wrapping int32 addition is associative, so the total
        # is the same exact bracket (the overflow bound covers the final sum).
        c = _gemv_chunks(k)
        l3 = jnp.pad(jnp.reshape(l3, (b * c, 1, k // c)), ((0, 0), (0, 1), (0, 0)))
        r3 = jnp.reshape(r3, (b * c, k // c, n))
        acc = lax.dot_general(l3, r3, dims, preferred_element_type=jnp.int32)[:, :1]
        acc = jnp.sum(jnp.reshape(acc, (b, c, 1, n)), axis=1, dtype=jnp.int32) if c > 1 else acc
    else:
        acc = lax.dot_general(l3, r3, dims, preferred_element_type=jnp.int32)
    out_shape = (tuple(left.q.shape[a] for a in left.batch) + tuple(left.q.shape[a] for a in left.free)
                 + tuple(right.q.shape[a] for a in right.free))
    return jnp.reshape(acc, out_shape)
