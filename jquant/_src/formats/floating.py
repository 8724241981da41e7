"""Floating-point element formats: FP8 (`"fp8_e4m3"`, `"fp8_e5m2"`) with float32 scales, and the
microscaled block formats MXFP8, MXFP4 (OCP Microscaling Formats v1.0) and NVFP4.

Element formats (the grids of `jnp.float8_e4m3fn`, `jnp.float8_e5m2`, `jnp.float4_e2m1fn`):

* E4M3: largest 448, smallest subnormal 2^-9; E5M2: largest 57344, smallest subnormal 2^-16;
  E2M1 (FP4): the levels 0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6.
* An element is the round-to-nearest-even cast of v = x / s (computed as x · (1/s),
  `numerics.divide`), saturating: v is clipped to ±largest first (a plain cast of an
  out-of-range v gives NaN in E4M3, Inf in E5M2). x̂ = s · element (`numerics.saturating_product`).

Scales (x̂ = s · element; every x is computed in float32, float64 for float64 input):

* FP8 (`bits=8`, any granularity of the spec: per tensor, channel or group): a float32 scale
  s = amax / largest (amax = max|x| over the group, `numerics.extrema`: a NaN propagates).
* MXFP8 / MXFP4 (`bits=8` / `bits=4`, `group_size=32`): blocks of 32 consecutive elements along the
  group axis (the contraction axis of a Dense kernel), every other axis a channel axis; one E8M0
  scale per block. The OCP rule is s = 2^(floor(log2 amax) − emax_elem), emax_elem = 8 for E4M3
  and 2 for E2M1: the block's largest value lands in [2^emax, 2^(emax+1)), so above 448 resp. 6
  it saturates. jquant takes that exponent, or the one above it (2s, nothing saturates) where
  that gives the block a strictly smaller Σ(x − x̂)² (ties keep the OCP scale). Any MX decoder
  reads the result (the scale is the encoder's choice). Measured on (4096, 1024) tensors
  (`examples/schemes.py`): MXFP4 +0.26 dB (N(0, 1)) / +0.29 dB (Student-t, 3 dof) over the OCP
  rule, MXFP8 +0.9 / +2.1 dB (13–15% of the blocks go up); always rounding the exponent up
  (Qwix's rule, s = 2^ceil(log2(amax / largest))) loses 0.03 / 0.5 dB against OCP on MXFP4. The
  exponent is clipped to E8M0's range [-127, 127].
* NVFP4 (`bits=4`, `group_size=16`): blocks of 16, E2M1 elements; a per-tensor float32 scale
  t = amax_tensor / (448 · 6) and one E4M3 scale per block, e = E4M3(amax_block / 6 / t) (RNE,
  saturating), so s = t · e. (A stack of layers, `Rule(stacked=k)`, has one t per layer.)
* All-zero blocks: s = 0 (MX: the smallest E8M0 scale 2^-127), elements 0, x̂ = 0 exactly. A scale
  below the smallest normal float32 divides by 1 instead (`numerics.safe_divisor`), so its
  block comes back as 0 (XLA:CPU flushes such numbers anyway).
* NaN/Inf: a NaN (or Inf) in a group makes its scale NaN (E8M0 and E4M3 have a NaN code), and the
  group dequantizes to NaN — never hidden. With a fixed scale a NaN element becomes NaN in FP8
  storage, but E2M1 has no NaN code (it stores 0); `fake_quant` keeps it NaN.

Storage, at its true size, as raw bit patterns (integer dtypes every checkpoint and safetensors
reader takes; `lax.bitcast_convert_type` to the `jnp` float8 dtype views them):

* FP8 elements: int8, the E4M3/E5M2 byte (`value` in the tensor's shape);
* FP4 elements: the 4-bit E2M1 code (sign bit 3, exponent bits 2..1, mantissa bit 0) packed two
  per byte along the last axis (`jquant._src.packing`);
* scales: FP8 float32; MX uint8 E8M0 (the biased exponent, 127 = 2^0, 255 = NaN); NVFP4 uint8 E4M3
  bytes, and its float32 tensor scale in the QArray's `zero_point` slot, shape (1, …, 1) (per
  layer of a stack: (L, 1, …, 1)); the format has no zero-point.

So bits per weight: FP8 per channel 8 + 32/rows, MXFP8 8.25, MXFP4 4.25, NVFP4 4.5 + 32/size.

Straight-through gradient (`inside`): 1 where the element was not saturated — |v| at most the
largest element plus half its top step (E4M3 464, E5M2 61440, E2M1 7: those still round to the
largest) — 0 beyond. A computed FP8 scale never saturates; MX and NVFP4 scales can.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jquant._src import numerics
from jquant._src.formats.base import Format, broadcast_fixed, check_no_range_options, no_zero_point


@dataclasses.dataclass(frozen=True)
class _Element:
    """One floating-point element format: its `jnp` dtype and storage width."""

    dtype: object
    bits: int

    @property
    def largest(self) -> float:
        return float(jnp.finfo(self.dtype).max)

    @property
    def emax(self) -> int:
        """Exponent of the largest power of two the format holds (E4M3 8, E5M2 15, E2M1 2)."""
        return int(math.floor(math.log2(self.largest)))

    @property
    def saturation(self) -> float:
        """|v| beyond which the clip changes the result: largest + half its step (ties go to it)."""
        return self.largest + 2.0 ** (self.emax - jnp.finfo(self.dtype).nmant - 1)

    def round(self, v):
        """The element value of v (RNE, saturating), as v's dtype."""
        if self.bits == 4:
            return jnp.where(jnp.signbit(v), -1, 1).astype(v.dtype) * _e2m1_level(_e2m1_index(jnp.abs(v)))
        return jnp.clip(v, -self.largest, self.largest).astype(self.dtype).astype(v.dtype)

    def encode(self, v):
        """Stored codes of v (RNE, saturating): int8 bytes (8-bit) or E2M1 codes 0..15 (int8)."""
        if self.bits == 8:
            return jax.lax.bitcast_convert_type(jnp.clip(v, -self.largest, self.largest).astype(self.dtype), jnp.int8)
        return (_e2m1_index(jnp.abs(v)) + 8 * jnp.signbit(v)).astype(jnp.int8)

    def decode(self, q, dtype):
        """Element values (`dtype`) of stored codes `q`."""
        if self.bits == 8:
            return _fp8_value(q, self, dtype)
        # float32 bits of the E2M1 code: sign, exponent e rebased (e + 126), mantissa bit at the
        # top of float32's; e = 0 is 0 or 0.5 (0.5 = 2^-1: exponent 126, mantissa 0). Integer ops
        # and one select, cheaper than float arithmetic per element in the weight-only dot.
        code = q.astype(jnp.int32)
        exponent, mantissa = (code >> 1) & 3, code & 1
        bits = jnp.where(exponent == 0, mantissa * (126 << 23), ((exponent + 126) << 23) | (mantissa << 22))
        value = jax.lax.bitcast_convert_type(bits | ((code & 8) << 28), jnp.float32)
        return value.astype(dtype)


def _fp8_value(q, element, dtype):
    """The value of FP8 bytes `q` (int8) as `dtype`, by integer arithmetic: the byte's exponent and
    mantissa bits moved into float32's places and its exponent rebased (normals), mantissa·2^(1−bias−m)
    (subnormals), NaN/Inf codes as such (tested against ml_dtypes on all 256 bytes). XLA:CPU
    converts float8 → float32 element by element; this vectorises: the fp8 weight-only dot of a
    4096² kernel at M = 1 took 5.6 ms instead of 7.4 (2 shared cores)."""
    finfo = jnp.finfo(element.dtype)
    m, e = finfo.nmant, finfo.nexp
    bias = 2 ** (e - 1) - 1
    b = q.astype(jnp.int32)
    magnitude = b & 0x7F
    normal = jax.lax.bitcast_convert_type((magnitude << (23 - m)) + ((127 - bias) << 23), jnp.float32)
    value = jnp.where(magnitude < (1 << m), magnitude.astype(jnp.float32) * 2.0 ** (1 - bias - m), normal)
    if element.dtype == jnp.float8_e4m3fn:
        value = jnp.where(magnitude == 0x7F, jnp.nan, value)
    else:  # E5M2: exponent all ones is Inf (mantissa 0) or NaN
        value = jnp.where(magnitude >= 0x7C, jnp.where(magnitude == 0x7C, jnp.inf, jnp.nan), value)
    return jnp.where(b < 0, -value, value).astype(dtype)


def _e2m1_index(a):
    """The E2M1 magnitude code 0..7 (a float of a's dtype) nearest to a = |v|, ties to even,
    saturating at 6. Levels are 0.5 apart below 2, 1 apart below 4 and 2 apart up to 6, so the
    index is round(2a), round(a) + 2 or round(a/2) + 4; its lowest bit is the mantissa bit, so
    `jnp.round`'s ties to an even integer are E2M1's ties to an even mantissa (this arithmetic is
    several times faster than XLA:CPU's float → float4 conversion; tested against ml_dtypes)."""
    a = jnp.minimum(a, 6)
    return jnp.where(a < 2, jnp.round(2 * a), jnp.where(a < 4, jnp.round(a) + 2, jnp.round(a / 2) + 4))


def _e2m1_level(index):
    """The E2M1 magnitude of code 0..7 (float): index/2 below 4, then 2, 3, 4, 6."""
    return jnp.where(index < 4, index / 2, jnp.where(index < 6, index - 2, 2 * index - 8))


E4M3 = _Element(jnp.float8_e4m3fn, 8)
E5M2 = _Element(jnp.float8_e5m2, 8)
E2M1 = _Element(jnp.float4_e2m1fn, 4)


class _Floating(Format):
    """What every floating-point element format shares: elements = RNE(x / s) saturating, x̂ = s·element."""

    element: ClassVar[_Element]

    def qrange(self, spec):
        """The range of the stored codes: int8 bytes for 8-bit elements, E2M1 codes 0..15."""
        return (-128, 127) if self.element.bits == 8 else (0, 15)

    def integer_problem(self, spec):
        return (f"uses method={self.name!r}, floating-point elements, which have no integer grid; "
                "integer formats: uniform, sign")

    def to_codes(self, q, spec):
        return q

    def from_codes(self, codes, spec):
        return codes.astype(jnp.int8)

    @staticmethod
    def _bounded(fixed: bool) -> bool:
        # A computed scale has a normal reciprocal (module docstring); a given one may not.
        return not fixed

    def element_scale(self, scale, zero_point, dtype):
        """The float scale s of each group (scale shape) from the stored scale."""
        return scale.astype(dtype)

    def encode(self, x, spec, lay, scale, zero_point, *, fixed: bool):
        s = self.element_scale(scale, zero_point, numerics.compute_dtype(x.dtype))
        v = numerics.divide(lay.to_grouped(x).astype(s.dtype), s, bounded=self._bounded(fixed))
        return lay.from_grouped(self.element.encode(v))

    def decode(self, q, scale, zero_point, spec, lay, *, saturate: bool = True):
        s = self.element_scale(scale, zero_point, jnp.float32 if scale.dtype == jnp.uint8 else scale.dtype)
        x = self.element.decode(lay.to_grouped(q), s.dtype)
        return lay.from_grouped(numerics.saturating_product(s, x) if saturate else s * x)

    def saturates(self, scale, zero_point, spec):
        # |s · element| ≤ s · largest: only a finite scale above max / largest can overflow (a
        # computed FP8 scale can, by rounding, at the float limit; an E8M0 one from 2^119 (E4M3);
        # NVFP4's s = t · e from a tensor scale t above max / (448 · 6))
        s = self.element_scale(scale, zero_point, jnp.float32 if scale.dtype == jnp.uint8 else scale.dtype)
        finite = jnp.isfinite(s)
        return jnp.any(finite & (jnp.where(finite, s, 0) > jnp.finfo(s.dtype).max / self.element.largest))

    def fake_quantize(self, x, spec, lay, scale, zero_point, *, fixed: bool):
        s = self.element_scale(scale, zero_point, numerics.compute_dtype(x.dtype))
        v = numerics.divide(lay.to_grouped(x).astype(s.dtype), s, bounded=self._bounded(fixed))
        return lay.from_grouped(numerics.saturating_product(s, self.element.round(v)))

    def inside(self, x, spec, lay, scale, zero_point, *, fixed: bool):
        s = self.element_scale(scale, zero_point, numerics.compute_dtype(x.dtype))
        v = numerics.divide(lay.to_grouped(x).astype(s.dtype), s, bounded=self._bounded(fixed))
        return lay.from_grouped(jnp.abs(v) <= self.element.saturation)

    def element_params(self, scale, zero_point, spec, lay):
        s = self.element_scale(scale, zero_point, jnp.float32 if scale.dtype == jnp.uint8 else scale.dtype)
        return lay.from_grouped(jnp.broadcast_to(s, lay.grouped_shape)), None

    def quantize_elements(self, w, scale, zero_point, spec):
        w = w.astype(scale.dtype)
        return numerics.saturating_product(scale, self.element.round(numerics.divide(w, scale)))


@dataclasses.dataclass(frozen=True)
class _FP8(_Floating):
    """FP8 elements with one float32 scale per group of the spec's granularity (module docstring)."""

    static_range = True

    def validate(self, spec) -> None:
        if spec.bits != 8:
            raise ValueError(f"QuantSpec.bits={spec.bits} with method={self.name!r}; FP8 is 8-bit (bits=8)")
        check_no_range_options(spec, self)

    def params(self, x, spec, lay, scale=None, zero_point=None):
        no_zero_point(zero_point, spec)
        xg = lay.to_grouped(x.astype(numerics.compute_dtype(x.dtype)))
        if scale is not None:
            return broadcast_fixed("scale", jnp.asarray(scale, xg.dtype), spec, lay), None
        return numerics.divide_by_constant(numerics.extrema(xg, lay.reduce_axes, "absmax"), self.element.largest), None

    def range_params(self, lo, hi, spec):
        # amax = max(−lo, hi), s = amax / largest, as for a group's own amax
        amax = jnp.maximum(-jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32))
        return numerics.divide_by_constant(amax, self.element.largest), None

    def inside(self, x, spec, lay, scale, zero_point, *, fixed: bool):
        # amax · (1/(amax/largest)) stays within rounding of the largest element: nothing saturates.
        return super().inside(x, spec, lay, scale, zero_point, fixed=fixed) if fixed else None


@dataclasses.dataclass(frozen=True)
class FP8E4M3(_FP8):
    """FP8 E4M3 (`jnp.float8_e4m3fn`, largest 448) with float32 scales s = amax / 448."""

    name = "fp8_e4m3"
    element = E4M3


@dataclasses.dataclass(frozen=True)
class FP8E5M2(_FP8):
    """FP8 E5M2 (`jnp.float8_e5m2`, largest 57344) with float32 scales s = amax / 57344."""

    name = "fp8_e5m2"
    element = E5M2


class _Blocked(_Floating):
    """Blocks of `block` consecutive elements along the group axis, one scale each."""

    block: ClassVar[int]

    def validate(self, spec) -> None:
        if spec.bits != self.element.bits:
            raise ValueError(f"QuantSpec.bits={spec.bits} with method={self.name!r}; its elements are "
                             f"{self.element.bits}-bit (bits={self.element.bits})")
        if spec.group_size != self.block:
            raise ValueError(f"QuantSpec.group_size={spec.group_size} with method={self.name!r}, which scales blocks "
                             f"of {self.block} consecutive elements: set group_size={self.block} (and every other "
                             "axis a channel axis, e.g. channel_axes=(1,) for a Dense kernel (in, out))")
        check_no_range_options(spec, self)

    def check_blocks(self, spec, lay) -> None:
        """ValueError unless each scale covers exactly one block (every other axis a channel axis)."""
        if lay.group_axis is not None and tuple(lay.reduce_axes) != (lay.group_axis + 1,):
            shared = [a for a in range(len(lay.shape)) if a not in lay.channel_axes and a != lay.group_axis]
            raise ValueError(f"{spec!r} on shape {lay.shape}: {self.name} has one scale per block of {self.block}, "
                             f"but axes {shared} share it; make them channel axes "
                             f"(channel_axes={tuple(sorted(set(lay.channel_axes) | set(shared)))})")

    def _fixed_codes(self, scale, spec, lay, what):
        """A given block scale as stored (uint8 codes), or floats the scale format holds exactly."""
        scale = jnp.asarray(scale)
        if scale.dtype != jnp.uint8:
            if not jnp.issubdtype(scale.dtype, jnp.floating):
                raise TypeError(f"a fixed scale for {spec!r} must be uint8 {what} codes or floats, got {scale.dtype}")
            codes = self._codes_of(scale.astype(jnp.float32))
            if not isinstance(scale, jax.core.Tracer):
                back = np.asarray(self._scale_of(codes, jnp.float32))
                given = np.asarray(scale, np.float32)
                bad = (back != given) & ~(np.isnan(back) & np.isnan(given))
                if np.any(bad):
                    raise ValueError(f"fixed scale for {spec!r} must hold {what} values (or be given as uint8 {what} "
                                     f"codes); got {given[bad].ravel()[:4].tolist()}")
            scale = codes
        return broadcast_fixed("scale", scale, spec, lay)


@dataclasses.dataclass(frozen=True)
class _MX(_Blocked):
    """OCP MX: blocks of 32 with one E8M0 power-of-two scale (module docstring)."""

    block = 32

    @staticmethod
    def _codes_of(s):
        """E8M0 codes (uint8) of power-of-two scales s (NaN/Inf → 255)."""
        return jax.lax.bitcast_convert_type(s.astype(jnp.float8_e8m0fnu), jnp.uint8)

    @staticmethod
    def _scale_of(codes, dtype):
        return jax.lax.bitcast_convert_type(codes, jnp.float8_e8m0fnu).astype(dtype)

    def params(self, x, spec, lay, scale=None, zero_point=None):
        no_zero_point(zero_point, spec)
        self.check_blocks(spec, lay)
        if scale is not None:
            return self._fixed_codes(scale, spec, lay, "E8M0"), None
        xg = lay.to_grouped(x.astype(numerics.compute_dtype(x.dtype)))
        amax = numerics.extrema(xg, lay.reduce_axes, "absmax")
        _, exponent = jnp.frexp(amax)  # amax = m · 2^exponent, m in [0.5, 1): floor(log2 amax) = exponent − 1
        biased = jnp.clip(exponent - 1 - self.element.emax, -127, 127) + 127
        codes = jnp.where(amax == 0, 0, jnp.where(jnp.isfinite(amax), biased, 255))
        # The exponent one up where that lowers the block's squared error (module docstring). Both
        # errors in units of the OCP scale s: v = x/s is exact (a power of two), |v| < 2^(emax+1).
        v = numerics.divide(xg, self._scale_of(codes.astype(jnp.uint8), xg.dtype), bounded=True)
        error = lambda r: jnp.sum(jnp.square(v - r), axis=lay.reduce_axes, keepdims=True)  # noqa: E731
        up = (error(2 * self.element.round(v / 2)) < error(self.element.round(v))) & (codes < 254)
        return jnp.where(up, codes + 1, codes).astype(jnp.uint8), None

    def element_scale(self, scale, zero_point, dtype):
        return self._scale_of(scale, dtype)


@dataclasses.dataclass(frozen=True)
class MXFP8(_MX):
    """MXFP8: E4M3 elements in blocks of 32 with an E8M0 scale each (8.25 bits/weight)."""

    name = "mxfp8"
    element = E4M3


@dataclasses.dataclass(frozen=True)
class MXFP4(_MX):
    """MXFP4: E2M1 elements in blocks of 32 with an E8M0 scale each (4.25 bits/weight)."""

    name = "mxfp4"
    element = E2M1


@dataclasses.dataclass(frozen=True)
class NVFP4(_Blocked):
    """NVFP4: E2M1 elements in blocks of 16, an E4M3 scale each relative to a float32 tensor scale
    (4.5 bits/weight + the tensor scale; module docstring)."""

    name = "nvfp4"
    element = E2M1
    block = 16

    @staticmethod
    def _codes_of(s):
        return jax.lax.bitcast_convert_type(E4M3.round(s).astype(jnp.float8_e4m3fn), jnp.uint8)

    @staticmethod
    def _scale_of(codes, dtype):
        return jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn).astype(dtype)

    @staticmethod
    def tensor_shape(lay):
        """Shape of the tensor scale: 1 on every axis of the scale shape but the channel axes in
        front of the group axis — a stack's layer axes (`Rule(stacked=k)`), each layer its own."""
        return tuple(d if a in lay.channel_axes and a < lay.group_axis else 1 for a, d in enumerate(lay.scale_shape))

    def params(self, x, spec, lay, scale=None, zero_point=None):
        self.check_blocks(spec, lay)
        shape = self.tensor_shape(lay)
        if scale is not None:
            if zero_point is None:
                raise ValueError(f"a fixed scale for {spec!r} needs its float32 tensor scale too (as zero_point=, "
                                 "the slot NVFP4 stores it in)")
            try:
                tensor = jnp.broadcast_to(jnp.asarray(zero_point, jnp.float32), shape)
            except ValueError:
                raise ValueError(f"the tensor scale (zero_point=) of {spec!r} on shape {lay.shape} must broadcast to "
                                 f"{shape}, got shape {tuple(jnp.shape(zero_point))}") from None
            return self._fixed_codes(scale, spec, lay, "E4M3"), tensor
        xg = lay.to_grouped(x.astype(numerics.compute_dtype(x.dtype)))
        amax = numerics.extrema(xg, lay.reduce_axes, "absmax")
        shared = tuple(a for a, d in enumerate(shape) if d == 1)
        tensor = numerics.divide_by_constant(numerics.extrema(amax, shared, "absmax"),
                                             E4M3.largest * E2M1.largest).astype(jnp.float32)
        relative = numerics.divide(numerics.divide_by_constant(amax, E2M1.largest), tensor.astype(amax.dtype))
        return self._codes_of(relative), tensor

    def element_scale(self, scale, zero_point, dtype):
        return zero_point.astype(dtype) * self._scale_of(scale, dtype)


FLOATING_FORMATS = (FP8E4M3(), FP8E5M2(), MXFP8(), MXFP4(), NVFP4())
