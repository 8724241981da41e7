"""The quantized `conv_general_dilated`: integers in, an exact int32 bracket out, scales applied once.

Math. For an activation x̂ = s_x (q_x − z_x) whose scale and zero-point are constant over its
spatial and feature axes (per tensor, or per batch entry) and a kernel ŵ = s_w (q_w − z_w) whose
scale and zero-point are constant over its spatial and input-feature axes (per tensor, or per output
channel o), every output element y[n, p, o] sums over one window W(p) of K = (kernel spatial size) ·
(input features per group) taps:

    y = s_x s_w Σ_W (q_x − z_x)(q_w − z_w)
      = s_x s_w [ Σ_W q_x q_w − z_w Σ_W q_x − z_x Σ_W q_w + z_x z_w |W| ],

where the sums run over the taps that fall inside the input. Padding (and the holes of an
`lhs_dilation`) are real zeros, i.e. q_x = z_x there, so they contribute nothing to the left-hand
side; the convolution's implicit zero padding makes Σ_W q_x q_w and Σ_W q_x (a convolution of
Σ_features q_x with a kernel of ones) "inside taps only" by themselves, and the z_x terms combine
into z_x Σ_W (q_w − z_w): the kernel's input-feature sums added over the inside taps, which
differ from the full sum only near the border — a batch-free map built from a static 0/1 matrix per
spatial axis (`_inside_sums`; no convolution), one number per output channel without padding.
The corrections vanish for symmetric operands. The bracket is exact in int32 (wrapping
intermediate sums included) when K · max|q_x − z_x| · max|q_w − z_w| < 2^31, checked at trace
time (ValueError otherwise), as for the dot.

Routes (`_route`), measured on XLA:CPU (jax 0.10.2, 2 cores shared with other work; the conv table
in benchmarks/, `python benchmarks/conv_paths.py`; ratios are against the f32 conv of the same
shape, the candidates timed in alternating rounds, repeated):
* "int": `lax.conv_general_dilated(int8, int8, preferred_element_type=int32)` plus the corrections
  above. XLA:CPU runs it through YNNPACK when the layout is channels-last (lhs `(N, spatial…, C)`,
  rhs `(spatial…, I, O)`, output `(N, spatial…, O)`, as `nn.Conv` uses) and the input features per
  group I are a multiple of 4: 0.4–0.95× the f32 conv at ResNet-like shapes (56×56×64→64 3×3 batch
  8: 0.6×; 14×14×256→256: 0.5×; 4 groups of 32: 0.3×). With I = 2, 3, 5, 6 it takes 2.4–9× the f32
  time (a 7×7 stem on RGB: 7×), with I = 1 (depthwise, a grey-scale first layer) 1.05–1.15×, and in
  any other layout (NCHW/OIHW: 45–70×, transposing to channels-last inside the program does not
  help: XLA folds the transposes into the conv's layout and leaves YNNPACK) it falls to a slow
  generic int8 kernel. The padding stays inside the convolution: padding the input with z_x
  first (full windows, no border map) made YNNPACK's conv itself slower (56×56×64→64: 6.4 ms on the
  58×58 padded input vs 5.5 ms SAME), and the earlier border correction — a one-feature int32
  convolution of a ones image — cost 0.3 ms a call (batch 1 at 56×56×64→64: 1.34× f32, now 0.8×).
* "dot": a 1×1 kernel (channels-last, one group, a ResNet projection) is the strided input's rows
  times the (I, O) kernel, one int8 matrix product (0.3–0.6× the f32 conv at 56×56×64→256).
* "taps": one input feature per group and more than one group (a depthwise conv, with any channel
  multiplier). XLA:CPU convolves these in a generic loop, f32 and int8 alike: 56×56×64 3×3 batch 8
  took 34 ms in f32 (30–70× a dense conv's time per multiply-add). Written as a sum over the
  kernel's taps of the shifted centred input (q_x − z_x, the padding and holes real zeros) times
  that tap's centred kernel row (q_w − z_w per output channel), the same int32 bracket is a few
  elementwise multiply-adds XLA fuses into one loop: 0.01–0.05× the f32 conv (56×56×64 3×3
  batch 8: 0.67 vs 34 ms; 28×28×128 5×5: 0.74 vs 25 ms; 14×14×256 7×7: 0.80 vs 23 ms; stride
  2: 0.35 vs 8.6 ms), exact (the integers are summed in int32 under the same bound). With one
  group (a one-feature stem) XLA's conv is a fast matrix product and the taps lose (224×224 1→64
  7×7 stride 2: 12×), so they are for groups only. Kernels of up to `_TAPS_MAX` taps (the sum
  is unrolled into the program).
* The float result of the int8 kernel costs one more pass over the output than the f32 conv: the
  int32 accumulator is written, read back, corrected and scaled. That pays only where the int8
  kernel saves more than the pass, i.e. from enough taps K per output element. Served W8A8 (the
  activation quantized per call), int8 route vs float route, ratios to f32 (min over alternating
  rounds, three runs): K = 64 (1×1 64→256) 1.15–1.7 vs 0.9–1.45; K = 72 (3×3, 8 features)
  1.6 vs 1.1; K = 128 (1×1 128→512) 1.0 vs 1.15–1.25; K = 144 1.0–1.1 vs 1.1–1.15; K = 288
  0.9–1.0 vs 1.1; K ≥ 576 0.75–0.98 vs 1.1–1.35. So `conv_general_dilated` takes the int8 routes
  from `_INT_MIN_TAPS` = 128 taps; below, and wherever the int8 kernel is slow (I not a multiple
  of 4, other layouts, other backends), it takes
* "float" (a float result): the dequantized operands x̂, ŵ in one f32 conv (`Precision.HIGHEST`,
  no TF32) — the very numbers of the QAT forward, within float32 rounding of the float64 conv of
  x̂ and ŵ — at ~1.0× the f32 conv plus the dequantize pass (7×7 stem on RGB: 1.0–1.1× served,
  depthwise 56×56×64: 1.0–1.05×, NCHW 28×28×128→128: 1.0×; the old route of exact chunks cost
  1.3–1.85× there); "float dot" for a 1×1 kernel: XLA:CPU's f32 1×1 conv is slower than the same
  product as an f32 dot (0.55–0.9× the conv at 56×56×64→256).
* For the exact int32 accumulator (`int_conv_general_dilated`, never rounded) where the int8
  kernel is slow or off-CPU: the centred integers q − z as float32 in f32 convs, exact because
  every partial sum is an integer below 2^24 when K · max|q_x − z_x| · max|q_w − z_w| < 2^24 (the
  zero-points are subtracted first, so padding needs no correction). Where the bound does not
  hold for all I input features at once, they are cut into the fewest equal chunks for which it
  holds, one f32 conv per chunk, the exact chunk results summed in int32 (NCHW 28×28×128→128 3×3
  int8: 4 chunks); only a window too large for one feature (never for int8) leaves the int8
  route as the exact fallback. On GPU and TPU (not measured here; XLA's int8 convolutions there
  depend on cuDNN layouts and sizes) an f32 conv always compiles and is exact under the bound.
Scales that vary along a contracted axis (spatial or input feature) or grouped scales
(`group_size`) have no integer convolution: `integer_conv_problem` says so, and `jquant.QuantConv`
then serves the dequantized kernel (the QAT numbers), never silently.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from jquant._src import numerics
from jquant._src.dot import Accumulator, quantize_operand, require_qarrays
from jquant._src.qarray import QArray
from jquant._src.spec import transformed

_INT32_LIMIT = 2 ** 31
_FLOAT32_EXACT = 2 ** 24  # integers up to here are exact in float32, so are sums that stay below it
# XLA:CPU's fast int8 convolution (YNNPACK) needs input features per group in multiples of this.
_INT_FEATURE_MULTIPLE = 4
# Taps per output (K) from which the int8 kernel's saving beats its int32 output pass (a float result).
_INT_MIN_TAPS = 128
# The most kernel taps the "taps" route unrolls (a 9×9 window, or 4×4×4).
_TAPS_MAX = 81


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, *, lhs_spec=None, rhs_spec=None):
    """`lax.conv_general_dilated` for quantized operands; a drop-in for `nn.Conv(conv_general_dilated=...)`.

    lhs is the activation, rhs the kernel, as in lax. A float operand with a spec is quantized on
    the fly (dynamic quantization: its scale comes from this call's values).
    * QArray × QArray → the exact integer convolution (`int_conv_general_dilated`), then one
      multiply by s_x·s_w (per batch entry × per output channel), where the int8 kernel is fast
      and pays for its int32 output (module docstring, "Routes"); elsewhere the f32 conv (or, 1×1,
      dot) of the dequantized operands — the same x̂ ⊛ ŵ to float32 rounding.
    * float lhs × QArray rhs (no lhs spec) → weight-only: the kernel is dequantized, a float conv runs.
    * float × float → plain `lax.conv_general_dilated`.

    Args:
      lhs: activation, QArray or float array, `(N, C, spatial…)` up to `dimension_numbers`.
      rhs: kernel, QArray or float array, `(O, I, spatial…)` up to `dimension_numbers`, I = C / groups.
      window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
        batch_group_count, precision: as in `lax.conv_general_dilated` (`precision` reaches the float
        conv only; the integer conv is exact).
      preferred_element_type: float output dtype; default the operands' float result type.
      lhs_spec, rhs_spec: specs to quantize float operands with.

    Returns:
      float array shaped like `lax.conv_general_dilated`'s output.

    Raises:
      TypeError: a spec is not a QuantSpec, or an operand to quantize is not float.
      ValueError: a spec given for a QArray; an integer preferred_element_type; what
        `integer_conv_problem` says for two QArrays.
    """
    lhs = quantize_operand(lhs, lhs_spec, "lhs", "conv_general_dilated")
    rhs = quantize_operand(rhs, rhs_spec, "rhs", "conv_general_dilated")
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise ValueError(f"preferred_element_type={jnp.dtype(out_dtype).name} must be a float dtype; "
                         "for the raw int32 accumulator use jquant.int_conv_general_dilated")
    if isinstance(lhs, QArray) and isinstance(rhs, QArray):
        if batch_group_count != 1:
            raise ValueError(f"batch_group_count={batch_group_count}: the integer convolution supports only 1")
        problem = integer_conv_problem(lhs, rhs, dimension_numbers, feature_group_count)
        if problem is not None:
            raise ValueError(problem)
        dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        route = _route(lhs, rhs, dn, feature_group_count, exact=False)
        if route in _INTEGER_ROUTES:
            acc = int_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                           dimension_numbers, feature_group_count)
            return acc.dequantize(out_dtype)
        # The float route (module docstring): the dequantized operands in one f32 conv (or dot).
        x, w = lhs.dequantize().astype(jnp.float32), rhs.dequantize().astype(jnp.float32)
        if route == "float dot":
            pads = _explicit_padding(x.shape, w.shape, dn, window_strides, padding, lhs_dilation, rhs_dilation)
            xp = _zero_padded(x, dn, pads, lhs_dilation)
            return _one_by_one(xp, w, window_strides, jnp.float32, lax.Precision.HIGHEST).astype(out_dtype)
        return lax.conv_general_dilated(x, w, window_strides, padding, lhs_dilation, rhs_dilation, dn,
                                        feature_group_count, precision=lax.Precision.HIGHEST).astype(out_dtype)
    lhs = lhs.dequantize() if isinstance(lhs, QArray) else lhs
    rhs = rhs.dequantize() if isinstance(rhs, QArray) else rhs
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                    feature_group_count, batch_group_count, precision=precision,
                                    preferred_element_type=preferred_element_type)


def int_conv_general_dilated(lhs: QArray, rhs: QArray, window_strides, padding, lhs_dilation=None,
                             rhs_dilation=None, dimension_numbers=None, feature_group_count=1) -> Accumulator:
    """The exact integer convolution of two QArrays: the int32 bracket (module docstring) and s_x·s_w.

    Args:
      lhs: the activation QArray; its scale may vary along the batch axis only.
      rhs: the kernel QArray; its scale may vary along the output-feature axis only.
      the rest: as in `lax.conv_general_dilated`.

    Returns:
      `Accumulator` whose `value` (int32, shaped like `lax.conv_general_dilated`'s output) is
      Σ_W (q_x − z_x)(q_w − z_w) exactly, and whose `scale` (float32, 1 except on the output's batch
      and feature axes) is s_x·s_w.

    Raises:
      TypeError: an operand is not a QArray.
      ValueError: what `integer_conv_problem` says.
    """
    require_qarrays("int_conv_general_dilated", lhs, rhs)
    problem = integer_conv_problem(lhs, rhs, dimension_numbers, feature_group_count)
    if problem is not None:
        raise ValueError(problem)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    qx, sx = lhs.spec.method.integer_operand(lhs.q, lhs.scale, lhs.spec)
    qw, sw = rhs.spec.method.integer_operand(rhs.q, rhs.scale, rhs.spec)
    zx, zw = lhs.zero_point, rhs.zero_point

    def conv(a, b, groups=1, out_type=jnp.int32, precision=None):
        return lax.conv_general_dilated(a, b, window_strides, padding, lhs_dilation, rhs_dilation, dn, groups,
                                        precision=precision, preferred_element_type=out_type)

    route = _route(lhs, rhs, dn, feature_group_count)
    if isinstance(route, int):
        # The input features of every group cut into `route` chunks, each chunk's f32 conv exact
        # (below 2^24), the chunks' integer results summed in int32 (module docstring, "Routes": the
        # exact int32 accumulator).
        chunks = route
        centred = lambda q, z: q.astype(jnp.float32) - (0 if z is None else z.astype(jnp.float32))
        xf, wf = centred(qx, zx), centred(qw, zw)
        lf, ri, g = dn.lhs_spec[1], dn.rhs_spec[1], feature_group_count
        per = wf.shape[ri] // chunks
        value = jnp.int32(0)
        for j in range(chunks):
            xj = jnp.reshape(xf, xf.shape[:lf] + (g, chunks, per) + xf.shape[lf + 1:])
            xj = jnp.reshape(lax.index_in_dim(xj, j, lf + 1, keepdims=False), xf.shape[:lf] + (g * per,) + xf.shape[lf + 1:])
            wj = lax.slice_in_dim(wf, j * per, (j + 1) * per, axis=ri)
            value = value + conv(xj, wj, g, jnp.float32, lax.Precision.HIGHEST).astype(jnp.int32)
    elif route == "taps":
        pads = _explicit_padding(qx.shape, qw.shape, dn, window_strides, padding, lhs_dilation, rhs_dilation)
        value = _taps_bracket(qx, qw, zx, zw, dn, window_strides, pads, lhs_dilation, rhs_dilation)
    else:
        value = _integer_bracket(qx, qw, zx, zw, dn, window_strides, padding, lhs_dilation, rhs_dilation,
                                 feature_group_count, as_dot=route == "dot")
    out_ndim = value.ndim
    scale = _on_output(_per(sx, dn.lhs_spec[0]), _per(sw, dn.rhs_spec[0]), dn.out_spec, out_ndim)
    return Accumulator(value, scale.astype(jnp.float32))


def _integer_bracket(qx, qw, zx, zw, dn, strides, padding, lhs_dilation, rhs_dilation, groups, as_dot):
    """Σ_W (q_x − z_x)(q_w − z_w) in int32 on the int8 kernel (module docstring, "int"), W the taps
    inside the input: Σ_W q_x q_w − z_w[o] Σ_W q_x − z_x[n] Σ_W (q_w − z_w)[o]. The last sum
    depends on the output position only near the border, where taps fall on padding (or holes):
    a batch-free (1, spatial…, O) map from the kernel's tap sums and, per spatial axis, the static
    0/1 matrix of which taps of which output position are inside (NumPy, at trace time) — no
    convolution; without padding it is one number per output channel. The middle one
    (asymmetric kernels only) is a one-feature convolution of the input's feature sums.
    `as_dot`: a 1×1 kernel, channels-last, one group: the strided input times the (I, O) kernel
    as one int8 matrix product."""
    pads = _explicit_padding(qx.shape, qw.shape, dn, strides, padding, lhs_dilation, rhs_dilation)

    def conv(a, b, groups=1):
        return lax.conv_general_dilated(a, b, strides, pads, lhs_dilation, rhs_dilation, dn, groups,
                                        preferred_element_type=jnp.int32)

    if as_dot:
        value = _one_by_one(_zero_padded(qx, dn, pads, lhs_dilation), qw, strides, jnp.int32)
    else:
        value = conv(qx, qw, groups)
    lb, lf, ro, ri, of = dn.lhs_spec[0], dn.lhs_spec[1], dn.rhs_spec[0], dn.rhs_spec[1], dn.out_spec[1]
    if zx is not None:
        centred_w = qw.astype(jnp.int32) - (0 if zw is None else zw.astype(jnp.int32))
        inside = _inside_taps(qx.shape, qw.shape, value.shape, dn, strides, pads, lhs_dilation, rhs_dilation)
        sums = _inside_sums(jnp.sum(centred_w, axis=ri, keepdims=True), inside, dn, value.ndim)
        value = value - _on_output(_per(zx, lb), None, dn.out_spec, value.ndim) * sums
    if zw is not None:
        # Σ over each group's input features, then a window sum per group; repeated over the
        # group's output channels (contiguous in XLA's grouped convolution).
        c, n_out = qx.shape[lf], qw.shape[ro]
        grouped = jnp.reshape(qx, qx.shape[:lf] + (groups, c // groups) + qx.shape[lf + 1:])
        feature_sums = jnp.sum(grouped, axis=lf + 1, dtype=jnp.int32)
        ones = jnp.ones(tuple(groups if a == ro else 1 if a == ri else d for a, d in enumerate(qw.shape)), jnp.int32)
        window_sums = conv(feature_sums, ones, groups)
        window_sums = jnp.repeat(window_sums, n_out // groups, axis=of) if groups > 1 else window_sums
        value = value - _on_output(None, _per(zw, ro), dn.out_spec, value.ndim) * window_sums
    return value


def _taps_bracket(qx, qw, zx, zw, dn, strides, pads, lhs_dilation, rhs_dilation):
    """Σ_W (q_x − z_x)(q_w − z_w) in int32 for one input feature per group (module docstring,
    "taps"): channels-last, the centred input padded with zeros (and `lhs_dilation` holes), each
    output channel o reading input feature o // (O / C) (XLA's grouped convolution), summed over
    the kernel's taps of the strided, shifted input times that tap's centred kernel row."""
    nsp = qx.ndim - 2
    x = jnp.transpose(qx, (dn.lhs_spec[0],) + tuple(dn.lhs_spec[2:]) + (dn.lhs_spec[1],)).astype(jnp.int32)
    w = jnp.transpose(qw, tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[0], dn.rhs_spec[1]))[..., 0].astype(jnp.int32)
    if zx is not None:
        x = x - jnp.reshape(_per(zx, dn.lhs_spec[0]), (-1,) + (1,) * (nsp + 1))
    if zw is not None:
        w = w - _per(zw, dn.rhs_spec[0])
    n_out = w.shape[-1]
    if n_out > x.shape[-1]:
        x = jnp.repeat(x, n_out // x.shape[-1], axis=-1)
    lhs_dilation, rhs_dilation = lhs_dilation or (1,) * nsp, rhs_dilation or (1,) * nsp
    x = lax.pad(x, jnp.int32(0), [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, lhs_dilation)]
                + [(0, 0, 0)])
    out = [(x.shape[1 + d] - (w.shape[d] - 1) * rhs_dilation[d] - 1) // strides[d] + 1 for d in range(nsp)]
    value = None
    for tap in np.ndindex(*w.shape[:nsp]):
        start = [t * r for t, r in zip(tap, rhs_dilation)]
        shifted = lax.slice(x, (0, *start, 0), (x.shape[0], *[b + (o - 1) * st + 1 for b, o, st in zip(start, out, strides)],
                                                n_out), (1, *strides, 1))
        value = shifted * w[tap] if value is None else value + shifted * w[tap]
    return _from_channels_last(value, dn)


def _explicit_padding(lhs_shape, rhs_shape, dn, strides, padding, lhs_dilation, rhs_dilation):
    """`padding` as (low, high) pairs per spatial axis, string padding resolved as lax does."""
    if not isinstance(padding, str):
        return tuple((int(lo), int(hi)) for lo, hi in padding)
    nsp = len(lhs_shape) - 2
    if tuple(lhs_dilation or (1,) * nsp) != (1,) * nsp:
        raise ValueError(f"padding={padding!r} with lhs_dilation={tuple(lhs_dilation)}: string padding is not defined "
                         "for a transposed convolution (as in lax); give explicit (low, high) pairs")
    window = [(rhs_shape[a] - 1) * d + 1 for a, d in zip(dn.rhs_spec[2:], rhs_dilation or (1,) * nsp)]
    return tuple(lax.padtype_to_pads([lhs_shape[a] for a in dn.lhs_spec[2:]], window, strides, padding))


def _inside_taps(lhs_shape, rhs_shape, out_shape, dn, strides, pads, lhs_dilation, rhs_dilation):
    """Per spatial axis, the 0/1 NumPy matrix (output positions, kernel taps): 1 where the tap
    falls on an input element (not on padding, nor on a hole of `lhs_dilation`)."""
    nsp = len(lhs_shape) - 2
    lhs_dilation, rhs_dilation = lhs_dilation or (1,) * nsp, rhs_dilation or (1,) * nsp
    inside = []
    for d in range(nsp):
        size, taps = lhs_shape[dn.lhs_spec[2 + d]], rhs_shape[dn.rhs_spec[2 + d]]
        u = (np.arange(out_shape[dn.out_spec[2 + d]])[:, None] * strides[d]
             + np.arange(taps)[None, :] * rhs_dilation[d] - pads[d][0])  # position in the dilated input
        inside.append(((u >= 0) & (u <= (size - 1) * lhs_dilation[d]) & (u % lhs_dilation[d] == 0)).astype(np.int32))
    return inside


def _inside_sums(tap_sums, inside, dn, ndim):
    """Σ over the inside taps of `tap_sums` (the kernel summed over its input features, int32),
    broadcastable to the output: (1, spatial…, O) in the output's layout, or one number per
    output channel when every tap of every position is inside."""
    nsp = len(inside)
    ro, ri, spatial = dn.rhs_spec[0], dn.rhs_spec[1], tuple(dn.rhs_spec[2:])
    taps = jnp.transpose(tap_sums, spatial + (ro, ri))[..., 0]  # (k_1, …, k_nsp, O)
    if all(m.all() for m in inside):
        return _on_output(None, jnp.sum(taps, axis=tuple(range(nsp))), dn.out_spec, ndim)
    tap_letters, out_letters = "abcdefgh"[:nsp], "ABCDEFGH"[:nsp]
    expr = ",".join(p + t for p, t in zip(out_letters, tap_letters)) + f",{tap_letters}o->{out_letters}o"
    return _from_channels_last(jnp.einsum(expr, *(jnp.asarray(m) for m in inside), taps,
                                          preferred_element_type=jnp.int32)[None], dn)


def _from_channels_last(y, dn):
    """`y` laid out (batch, spatial…, features) transposed to the output layout `dn.out_spec`."""
    nsp = y.ndim - 2
    source = {dn.out_spec[0]: 0, dn.out_spec[1]: nsp + 1, **{a: 1 + d for d, a in enumerate(dn.out_spec[2:])}}
    return jnp.transpose(y, tuple(source[a] for a in range(y.ndim)))


def _one_by_one(xp, w, strides, out_type, precision=None):
    """A 1×1 kernel `(1…, I, O)` on a channels-last input already padded: the strided input's
    rows `(N·spatial, I)` times `(I, O)`, one matrix product."""
    rows = lax.slice(xp, (0,) * xp.ndim, xp.shape, (1,) + tuple(strides) + (1,))
    c, o = w.shape[-2], w.shape[-1]
    y = lax.dot_general(jnp.reshape(rows, (-1, c)), jnp.reshape(w, (c, o)), (((1,), (0,)), ((), ())),
                        precision=precision, preferred_element_type=out_type)
    return jnp.reshape(y, rows.shape[:-1] + (o,))


def _zero_padded(x, dn, pads, lhs_dilation):
    """`x` with the convolution's padding and `lhs_dilation` holes made explicit, as zeros."""
    nsp = x.ndim - 2
    config = [(0, 0, 0)] * x.ndim
    for a, (lo, hi), d in zip(dn.lhs_spec[2:], pads, lhs_dilation or (1,) * nsp):
        config[a] = (lo, hi, d - 1)
    if all(c == (0, 0, 0) for c in config):
        return x
    return lax.pad(x, jnp.zeros((), x.dtype), config)


def _with(shape, axis, size):
    return tuple(size if a == axis else d for a, d in enumerate(shape))


def _per(a, axis):
    """A scale-shaped array (1 on every axis but `axis`) as a vector along `axis` (int8 → int32)."""
    v = jnp.reshape(a, (a.shape[axis],))
    return v.astype(jnp.int32) if jnp.issubdtype(v.dtype, jnp.integer) else v


def _on_output(batch_vector, feature_vector, out_spec, ndim):
    """The product of a per-batch and a per-output-feature vector (either may be None) shaped to
    broadcast against the output: its batch axis `out_spec[0]`, feature axis `out_spec[1]`."""
    result = None
    for vector, axis in ((batch_vector, out_spec[0]), (feature_vector, out_spec[1])):
        if vector is None:
            continue
        v = jnp.reshape(vector, tuple(vector.shape[0] if a == axis else 1 for a in range(ndim)))
        result = v if result is None else result * v
    return result


def integer_conv_problem(lhs, rhs, dimension_numbers=None, feature_group_count=1) -> Optional[str]:
    """Why `int_conv_general_dilated` cannot convolve these operands (None: it can), from their
    shapes and specs alone (`lhs`, `rhs`: anything with `.shape` and `.spec`, e.g. QArrays or
    `jquant._src.dot.Operand`s): a format without an integer grid, grouped scales, a scale that
    varies along a contracted axis (the activation's spatial or feature axes, the kernel's spatial
    or input-feature axes), mismatched ranks or features, or an int32 overflow risk."""
    for name, op in (("lhs", lhs), ("rhs", rhs)):
        problem = op.spec.method.integer_problem(op.spec)
        if problem is not None:
            return f"int_conv_general_dilated: {name} {problem}"
        if transformed(op.spec):  # only r·R·Q convolves
            return (f"int_conv_general_dilated: {name} is rotated or equalized ({op.spec!r}); no integer convolution "
                    "rotates or scales its input")
    if len(lhs.shape) != len(rhs.shape) or len(lhs.shape) < 3:
        return (f"int_conv_general_dilated: lhs {tuple(lhs.shape)} and rhs {tuple(rhs.shape)} must have the same "
                "rank, at least 3 (batch, feature, one or more spatial axes)")
    dn = lax.conv_dimension_numbers(tuple(lhs.shape), tuple(rhs.shape), dimension_numbers)
    groups = feature_group_count
    if not isinstance(groups, int) or groups < 1 or lhs.shape[dn.lhs_spec[1]] != groups * rhs.shape[dn.rhs_spec[1]] \
            or rhs.shape[dn.rhs_spec[0]] % groups:
        return (f"int_conv_general_dilated: lhs features {lhs.shape[dn.lhs_spec[1]]} must equal feature_group_count "
                f"({groups}) × rhs input features {rhs.shape[dn.rhs_spec[1]]}, and rhs output features "
                f"{rhs.shape[dn.rhs_spec[0]]} be a multiple of it")
    for name, op, free, role in (("lhs", lhs, dn.lhs_spec[0], "batch"), ("rhs", rhs, dn.rhs_spec[0], "output-feature")):
        lay = numerics.layout(tuple(op.shape), op.spec)
        if lay.group_axis is not None:
            return (f"int_conv_general_dilated: {name} has grouped scales ({op.spec!r} on shape {tuple(op.shape)}); "
                    f"an integer convolution needs one scale per {role} entry (channel_axes=({free},)) or per tensor")
        varying = [a for a in lay.channel_axes if a != free]
        if varying:
            return (f"int_conv_general_dilated: {name} scale varies along axis {varying[0]}, which the convolution "
                    f"sums over ({op.spec!r} on shape {tuple(op.shape)}); allowed: per tensor or "
                    f"channel_axes=({free},) (its {role} axis)")
    k = _taps(rhs, dn)
    magnitude = lhs.spec.integer_magnitude * rhs.spec.integer_magnitude
    if k * magnitude >= _INT32_LIMIT:
        return (f"int32 accumulator could overflow: K={k} taps (kernel window × input features per group) × "
                f"{lhs.spec.integer_magnitude} × {rhs.spec.integer_magnitude} = {k * magnitude} ≥ 2^31; allowed: "
                f"K ≤ {(_INT32_LIMIT - 1) // magnitude} for these specs — use fewer bits or fewer input features")
    return None


def runs_on_integers(lhs, rhs, dimension_numbers=None, feature_group_count=1) -> bool:
    """Whether `conv_general_dilated` of these operands (anything with `.shape` and `.spec`, e.g.
    `jquant._src.dot.Operand`s; `integer_conv_problem` None) runs the int8 kernel for its float
    result, rather than the float route (module docstring, "Routes")."""
    dn = lax.conv_dimension_numbers(tuple(lhs.shape), tuple(rhs.shape), dimension_numbers)
    return _route(lhs, rhs, dn, feature_group_count, exact=False) in _INTEGER_ROUTES


def _taps(rhs, dn) -> int:
    """K: the kernel's window size times its input features (per group)."""
    return math.prod(rhs.shape[a] for a in dn.rhs_spec[1:])


_INTEGER_ROUTES = ("int", "dot", "taps")


def _route(lhs, rhs, dn, feature_group_count, exact=True):
    """How the convolution runs (module docstring, "Routes"): "int" (the int8 convolution), "dot"
    (a 1×1 kernel as one int8 matrix product), "taps" (one input feature per group, on CPU: an
    int32 sum over the kernel's taps), or, where the int8 kernel is slow, the number of
    chunks of the exact float route — the fewest chunks of the input features (a divisor of them)
    whose f32 convs stay exact. `exact=False` (a float result, not the int32 accumulator) returns
    "float" or "float dot" (1×1) instead of chunks — the dequantized operands in f32 — there and
    also where the int8 kernel saves less than its int32 output costs: under `_INT_MIN_TAPS` taps."""
    features = rhs.shape[dn.rhs_spec[1]]
    window = _taps(rhs, dn) // max(features, 1)
    magnitude = lhs.spec.integer_magnitude * rhs.spec.integer_magnitude
    chunks = next((c for c in range(1, features + 1)
                   if features % c == 0 and window * (features // c) * magnitude < _FLOAT32_EXACT), None)
    if chunks is None and exact:
        return "int"
    if jax.default_backend() != "cpu":
        return chunks if exact else "float"
    if features == 1 and feature_group_count > 1 and window <= _TAPS_MAX:
        return "taps"
    nd = len(rhs.shape)
    channels_last = (tuple(dn.lhs_spec) == (0, nd - 1) + tuple(range(1, nd - 1))
                     and tuple(dn.rhs_spec) == (nd - 1, nd - 2) + tuple(range(nd - 2))
                     and tuple(dn.out_spec) == tuple(dn.lhs_spec))
    one_by_one = window == 1 and feature_group_count == 1 and channels_last
    if not exact and (not channels_last or features % _INT_FEATURE_MULTIPLE or _taps(rhs, dn) < _INT_MIN_TAPS):
        return "float dot" if one_by_one else "float"
    if not channels_last or features % _INT_FEATURE_MULTIPLE:
        return chunks
    return "dot" if one_by_one else "int"
