"""Drop-in quantized ops for explicit use in models: `QuantDot` and `QuantConv`.

One object serves both phases of a weight's life:
* training (QAT) — the weight is a float array: weight and activation are fake-quantized (STE
  gradients, `jquant.fake_quant`). `QuantDot` with integer-grid specs for both (W8A8, W4A8, …)
  and a dot of at least `INTEGER_QAT_MIN_MACS` multiply-adds (8× that for a packed ≤ 4-bit
  weight) runs the forward on the exact integer path — the very numbers serving computes — and
  takes its derivatives (forward and reverse mode) from the fake-quantized float dot, i.e. the
  same STE; other combinations, and small dots, where the int8 GEMM saves less than the extra
  quantize pass costs, run the float op on the fake-quantized operands. Measured on a 2-core CPU
  (train steps): W8A8 on the integer path is 0.9× the fake-quant step on a transformer block at
  64 tokens (4·10^6-multiply-add dots) but 1.2× on the digits NNX MLP (10^6); a W4A8 MLP at batch
  1024 is 0.9×, while 1-bit weights on the digits MLP (4·10^6) are 1.4× slower there (their
  storage is packed and unpacked every step);
* serving — the weight is a `QArray` (from `quantize_params`): with an activation spec the
  activation is quantized per call and the exact integer path runs (`jquant.dot_general`); without
  one the weight is dequantized on the fly (weight-only).
Both phases compute the same x̂·ŵ, so served outputs equal QAT outputs up to float rounding.
A rotated weight spec (`QuantSpec(rotation=...)`, R along a contracted axis) works in the
rotated basis in both phases — y = fq_act(x·R)·fq(Rᵀ·W) in QAT, the rotated QArray with the
activation rotated online when served (`dot.transformed_operands`) — so the activation spec
quantizes x·R in both, and a static activation range is a range of x·R. An equalized weight
spec (`QuantSpec(equalization=...)`) likewise scales the activation by r first (x·r·R).
`QuantConv` has no online rotation: a rotated or equalized kernel is dequantized (r·R·Q) when
served and fake-quantized as r·R·fq(Rᵀ·(W / r)) in QAT.

Calibration (`jquant.flax.calibrate`): an op with `observe` set calls it with every activation
it quantizes — after any rotation, in the compute dtype, just before quantizing it — so the
observers record the range of the very tensor a static scale will quantize.

    dense = nn.Dense(128, dot_general=QuantDot(weight=QuantSpec(8, channel_axes=(1,)), act=QuantSpec(8)))
    y = jnp.einsum("bi,io->bo", x, w, _dot_general=QuantDot(weight=QuantSpec(4, channel_axes=(1,))))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from jquant._src import float_dot, numerics
from jquant._src.conv import conv_general_dilated, integer_conv_problem, runs_on_integers
from jquant._src.dot import (Operand, dot_general, integer_dot_problem, onto_other, transformed_operands,
                             transformed_pair)
from jquant._src.packing import is_packed
from jquant._src.qarray import QArray, quantize, to_stored_basis
from jquant._src.spec import QuantSpec, transformed, untransformed
from jquant._src.ste import fake_quant


INTEGER_QAT_MIN_MACS = 1 << 22
"""Smallest dot (M·K·N multiply-adds) whose QAT forward runs on the integer path (module docstring)."""
PACKED_WEIGHT_MACS_FACTOR = 8
"""A weight of ≤ 4 bits (packed storage: packed and unpacked again each step) takes the integer
path from `PACKED_WEIGHT_MACS_FACTOR × INTEGER_QAT_MIN_MACS` multiply-adds."""


@dataclasses.dataclass(frozen=True, eq=False)
class _QuantOp:
    """What the three ops share: the weight and activation specs, and an optional static
    (calibrated) activation scale/zero-point; without one the activation is quantized per call.
    `observe` (calibration only): called with each activation the op quantizes (module docstring).
    `cast_weight` (what `jquant.flax` sets): the weight arrives in its stored dtype and the op casts
    it, once quantized (fake-quantized, or a QArray's dequantization dtype), to the activation's
    dtype — a Flax layer's compute dtype — so a bfloat16 layer quantizes its float32 kernel in QAT
    as `quantize_params` does for serving (`jquant/flax/_dtypes.py`)."""

    weight: Optional[QuantSpec] = None
    act: Optional[QuantSpec] = None
    act_scale: Optional[object] = None
    act_zero_point: Optional[object] = None
    observe: Optional[Callable] = None
    cast_weight: bool = False

    def observed(self, lhs):
        """`lhs`, after handing it to `observe` (if set, and if this op quantizes activations)."""
        if self.observe is not None and self.act is not None:
            self.observe(lhs)
        return lhs

    def fake_quant_inputs(self, lhs, rhs):
        """QAT: fake-quantized activation and (float) weight."""
        if self.act is not None:
            lhs = fake_quant(lhs, self.act, scale=self.act_scale, zero_point=self.act_zero_point)
        if self.weight is not None and not isinstance(rhs, QArray):
            rhs = fake_quant(rhs, self.weight)
        return lhs, self.in_compute_dtype(lhs, rhs)

    def in_compute_dtype(self, lhs, weight):
        """The quantized `weight` (an array or a QArray) in the activation's dtype under
        `cast_weight`; as it is otherwise."""
        return weight.astype(jnp.result_type(lhs)) if self.cast_weight else weight

    def served_operands(self, lhs, rhs: QArray, dimension_numbers):
        """Serving: (activation, weight) for `jquant.dot_general`, the weight dequantizing to the
        compute dtype under `cast_weight`. A rotated weight first rotates the activation
        (`dot.transformed_operands`). With an integer-grid weight the activation
        becomes a QArray (the integer path); a codebook weight has no integer grid, so the
        activation is fake-quantized and the weight dequantized (the same numbers as QAT).
        Floating-point formats (FP8, MX, NVFP4) quantize the activation for their own dot
        (`jquant._src.float_dot`)."""
        lhs, rhs = transformed_operands(lhs, self.in_compute_dtype(lhs, rhs), dimension_numbers)
        if self.act is None:
            return lhs, rhs
        lhs = self.observed(lhs)
        if not isinstance(rhs, QArray) or (rhs.spec.method.integer_problem(rhs.spec) is not None
                                           and not float_dot.takes(self.act, rhs)):
            return self.fake_quant_inputs(lhs, rhs)[0], rhs if not isinstance(rhs, QArray) else rhs.dequantize()
        return quantize(lhs, self.act, scale=self.act_scale, zero_point=self.act_zero_point), rhs

    def in_transformed_basis(self, lhs, rhs, dimension_numbers):
        """QAT with a rotated or equalized weight spec whose transform axis is contracted: (this op
        with the transforms taken off its weight spec, x·r·R, Rᵀ·(W / r)) — the served numbers'
        basis (module docstring), r from W and given no gradient (as `fake_quant`); None otherwise
        (a transform on a free axis fake-quantizes as r·R·fq(Rᵀ·(W / r)))."""
        if self.weight is None or not transformed(self.weight) or isinstance(rhs, QArray):
            return None
        (lc, rc), _ = dimension_numbers
        pair = transformed_pair(jnp.shape(rhs), self.weight, rc, lc)
        if pair is None:
            return None
        stored, eq_scale = to_stored_basis(rhs, self.weight, numerics.layout(tuple(jnp.shape(rhs)), self.weight))
        if eq_scale is not None and eq_scale.size != jnp.shape(rhs)[pair[0]]:
            return None  # r varies along more than the contracted axis (a stack): fake-quantized whole
        op = dataclasses.replace(self, weight=untransformed(self.weight))
        return op, onto_other(lhs, self.weight, eq_scale, pair[1]), stored.astype(jnp.result_type(rhs))


@dataclasses.dataclass(frozen=True, eq=False)
class QuantDot(_QuantOp):
    """A `lax.dot_general` replacement: lhs is the activation, rhs the weight.

    Attributes:
      weight: spec the float weight is fake-quantized with (None: keep it float).
      act: spec the activation is quantized with (None: keep it float).
      act_scale, act_zero_point: a static activation scale/zero-point (from calibration);
        None: computed from each call's activation (dynamic quantization).
    """

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **unused):
        if isinstance(rhs, QArray):
            return dot_general(*self.served_operands(lhs, rhs, dimension_numbers), dimension_numbers, precision,
                               preferred_element_type)
        rotated = self.in_transformed_basis(lhs, rhs, dimension_numbers)
        if rotated is not None:
            op, lhs, rhs = rotated
            return op(lhs, rhs, dimension_numbers, precision, preferred_element_type)
        lhs = self.observed(lhs)
        if self._integer_forward(lhs, rhs, dimension_numbers):
            return _integer_qat_dot(self, dimension_numbers, precision, preferred_element_type, lhs, rhs,
                                    self.act_scale, self.act_zero_point)
        return self._fake_quant_dot(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                                    self.act_scale, self.act_zero_point)

    def _fake_quant_dot(self, lhs, rhs, dimension_numbers, precision, preferred_element_type, act_scale,
                        act_zero_point):
        op = dataclasses.replace(self, act_scale=act_scale, act_zero_point=act_zero_point)
        lhs, rhs = op.fake_quant_inputs(lhs, rhs)
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)

    def _integer_forward(self, lhs, rhs, dimension_numbers) -> bool:
        """Whether the QAT forward can run on the integer path: both specs have an integer grid
        and `int_dot_general` accepts the operands (checked on shapes only, at trace time)."""
        if self.act is None or self.weight is None:
            return False
        contracted = math.prod(jnp.shape(rhs)[a] for a in dimension_numbers[0][1])
        smallest = INTEGER_QAT_MIN_MACS * (PACKED_WEIGHT_MACS_FACTOR if is_packed(self.weight.bits) else 1)
        if jnp.size(lhs) * jnp.size(rhs) // max(contracted, 1) < smallest:
            return False
        # Otherwise (e.g. scales varying along the contraction) the float STE path computes it.
        return integer_dot_problem(Operand(jnp.shape(lhs), self.act), Operand(jnp.shape(rhs), self.weight),
                                   dimension_numbers) is None


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _integer_qat_dot(op, dimension_numbers, precision, preferred_element_type, lhs, rhs, act_scale, act_zero_point):
    served = (quantize(lhs, op.act, scale=act_scale, zero_point=act_zero_point),
              op.in_compute_dtype(lhs, quantize(rhs, op.weight)))
    return dot_general(*served, dimension_numbers, precision, preferred_element_type)


@_integer_qat_dot.defjvp
def _integer_qat_dot_jvp(op, dimension_numbers, precision, preferred_element_type, primals, tangents):
    lhs, rhs, act_scale, act_zero_point = primals
    out = _integer_qat_dot(op, dimension_numbers, precision, preferred_element_type, *primals)

    def float_path(a, b):  # the STE derivative: that of the fake-quantized float dot
        return op._fake_quant_dot(a, b, dimension_numbers, precision, preferred_element_type, act_scale,
                                  act_zero_point)

    _, tangent = jax.jvp(float_path, (lhs, rhs), tangents[:2])
    return out, tangent.astype(out.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantEinsum(_QuantOp):
    """A `jnp.einsum` replacement for two operands (`nnx.Einsum(einsum_op=...)`): lhs is the
    activation, rhs the weight. QAT fake-quantizes both and runs `jnp.einsum`; a QArray weight runs
    `jquant.dot_general` on the equivalent dimension numbers (explicit `->`, no ellipsis)."""

    def __call__(self, subscripts, lhs, rhs, precision=None, preferred_element_type=None, **unused):
        if not isinstance(rhs, QArray):
            rotated = self.in_transformed_basis(lhs, rhs, einsum_dimension_numbers(subscripts)[0]) \
                if self.weight is not None and transformed(self.weight) else None
            op, lhs, rhs = (self, lhs, rhs) if rotated is None else rotated
            lhs, rhs = op.fake_quant_inputs(op.observed(lhs), rhs)
            return jnp.einsum(subscripts, lhs, rhs, precision=precision, preferred_element_type=preferred_element_type)
        dimension_numbers, out_order = einsum_dimension_numbers(subscripts)
        y = dot_general(*self.served_operands(lhs, rhs, dimension_numbers), dimension_numbers, precision,
                        preferred_element_type)
        return jnp.transpose(y, out_order)


def einsum_dimension_numbers(subscripts: str):
    """`"bi,io->bo"` → (dot_general dimension numbers, permutation from dot_general's output order
    (batch, lhs free, rhs free) to the einsum's output order).

    Raises:
      ValueError: not two operands with an explicit output, an ellipsis, a repeated index within
        one operand, or an index summed out of only one operand.
    """
    spec = subscripts.replace(" ", "")
    if "..." in spec or "->" not in spec or spec.count(",") != 1:
        raise ValueError(f"einsum {subscripts!r}: quantized einsum needs two operands, an explicit '->' and no '...'")
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    for term in (lhs, rhs, out):
        if len(set(term)) != len(term):
            raise ValueError(f"einsum {subscripts!r}: repeated index in {term!r} is not supported")
    for letter in set(lhs) ^ set(rhs):
        if letter not in out:
            raise ValueError(f"einsum {subscripts!r}: index {letter!r} is summed out of one operand only")
    contract = [c for c in lhs if c in rhs and c not in out]
    batch = [c for c in lhs if c in rhs and c in out]
    lhs_free = [c for c in lhs if c not in rhs]
    rhs_free = [c for c in rhs if c not in lhs]
    dimension_numbers = (
        (tuple(lhs.index(c) for c in contract), tuple(rhs.index(c) for c in contract)),
        (tuple(lhs.index(c) for c in batch), tuple(rhs.index(c) for c in batch)))
    produced = batch + lhs_free + rhs_free
    return dimension_numbers, tuple(produced.index(c) for c in out)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantConv(_QuantOp):
    """A `lax.conv_general_dilated` replacement (`nn.Conv(conv_general_dilated=...)`,
    `nnx.Conv(conv_general_dilated=...)`): lhs is the activation, rhs the kernel.

    * Serving (a QArray kernel) with an activation spec: the activation is quantized per call and
      the exact integer convolution runs (`jquant.conv_general_dilated`). A kernel or activation
      spec the integer convolution cannot take (a codebook, grouped scales, a scale varying along
      the window or the input features: `integer_conv_problem` says which) serves the dequantized
      kernel on the fake-quantized activation instead — the QAT numbers; without an activation
      spec the kernel is dequantized (weight-only).
    * QAT (a float kernel): both operands fake-quantized and a float conv, or — both specs with an
      integer grid, the integer convolution accepting them and running this shape on the int8
      kernel (`jquant/_src/conv.py`, "Routes"; elsewhere serving convolves x̂ and ŵ in float, which
      is the fake-quantized conv itself), and at least `INTEGER_QAT_MIN_MACS` multiply-adds (8×
      that for a packed ≤ 4-bit kernel) — the forward on the integer convolution with the
      fake-quantized float conv's derivatives (STE).
    Served outputs equal QAT outputs up to float rounding.

    The threshold is `QuantDot`'s, kept after measuring the conv's own (train steps: gradients of
    both operands, W8A8 3×3 channels-last convs from 6·10^5 to 9·10^8 multiply-adds, the two
    forwards timed in alternating rounds on a shared 2-core CPU): the integer forward's step is
    0.94–1.03× the fake-quantized one from 4.7·10^6 multiply-adds up — the forward conv is about a
    third of a step, and what the int8 kernel saves there the extra quantize pass spends — while
    the sub-0.3 ms steps below that swing 0.6–1.4× from run to run. No size favours either forward
    beyond that noise, so one rule for both ops rather than a number fitted to noise.
    """

    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                 preferred_element_type=None, **unused):
        # `unused`: keyword arguments newer Flax passes (out_sharding), ignored as QuantDot does
        args = (tuple(window_strides), _hashable(padding), _hashable(lhs_dilation), _hashable(rhs_dilation),
                _hashable(dimension_numbers), feature_group_count, batch_group_count, precision,
                preferred_element_type)
        lhs = self.observed(lhs)
        if isinstance(rhs, QArray):
            rhs = self.in_compute_dtype(lhs, rhs)
            if self.act is not None and self._integer_operands(lhs, rhs, args):
                lhs = quantize(lhs, self.act, scale=self.act_scale, zero_point=self.act_zero_point)
            else:
                lhs = self.fake_quant_inputs(lhs, rhs)[0]
            return conv_general_dilated(lhs, rhs, *args)
        if self._integer_forward(lhs, rhs, args):
            return _integer_qat_conv(self, args, lhs, rhs, self.act_scale, self.act_zero_point)
        return self._fake_quant_conv(lhs, rhs, args, self.act_scale, self.act_zero_point)

    def _fake_quant_conv(self, lhs, rhs, args, act_scale, act_zero_point):
        op = dataclasses.replace(self, act_scale=act_scale, act_zero_point=act_zero_point)
        lhs, rhs = op.fake_quant_inputs(lhs, rhs)
        return lax.conv_general_dilated(lhs, rhs.dequantize() if isinstance(rhs, QArray) else rhs, *args)

    def _integer_operands(self, lhs, rhs, args) -> bool:
        """Whether the activation (quantized by `act`) and the kernel (a QArray, or a float one
        quantized by `weight`) can meet on the integer convolution (shapes and specs only)."""
        weight = rhs.spec if isinstance(rhs, QArray) else self.weight
        if self.act is None or weight is None or args[6] != 1:
            return False
        return integer_conv_problem(Operand(jnp.shape(lhs), self.act), Operand(jnp.shape(rhs), weight),
                                    args[4], args[5]) is None

    def _integer_forward(self, lhs, rhs, args) -> bool:
        """Whether the QAT forward runs on the integer convolution (class docstring): integer
        operands whose float result takes the int8 kernel, at least the `QuantDot` threshold of
        multiply-adds (output size × taps per output)."""
        if self.weight is None or not self._integer_operands(lhs, rhs, args):
            return False
        if not runs_on_integers(Operand(jnp.shape(lhs), self.act), Operand(jnp.shape(rhs), self.weight), args[4], args[5]):
            return False  # served as the float conv of x̂ and ŵ: the fake-quantized conv itself
        out = jax.eval_shape(lambda a, b: lax.conv_general_dilated(a, b, *args[:7]),
                             jax.ShapeDtypeStruct(jnp.shape(lhs), jnp.float32),
                             jax.ShapeDtypeStruct(jnp.shape(rhs), jnp.float32))
        dn = lax.conv_dimension_numbers(jnp.shape(lhs), jnp.shape(rhs), args[4])
        taps = jnp.size(rhs) // jnp.shape(rhs)[dn.rhs_spec[0]]
        smallest = INTEGER_QAT_MIN_MACS * (PACKED_WEIGHT_MACS_FACTOR if is_packed(self.weight.bits) else 1)
        return math.prod(out.shape) * taps >= smallest


def _hashable(a):
    """Sequences (padding pairs, dilations, dimension numbers) as tuples, so they can be static."""
    if isinstance(a, (list, tuple)) and not hasattr(a, "_fields"):  # a ConvDimensionNumbers stays one
        return tuple(_hashable(b) for b in a)
    return a


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _integer_qat_conv(op, args, lhs, rhs, act_scale, act_zero_point):
    served = (quantize(lhs, op.act, scale=act_scale, zero_point=act_zero_point),
              op.in_compute_dtype(lhs, quantize(rhs, op.weight)))
    return conv_general_dilated(*served, *args)


@_integer_qat_conv.defjvp
def _integer_qat_conv_jvp(op, args, primals, tangents):
    lhs, rhs, act_scale, act_zero_point = primals
    out = _integer_qat_conv(op, args, *primals)

    def float_path(a, b):  # the STE derivative: that of the fake-quantized float conv
        return op._fake_quant_conv(a, b, args, act_scale, act_zero_point)

    _, tangent = jax.jvp(float_path, (lhs, rhs), tangents[:2])
    return out, tangent.astype(out.dtype)
