"""`Format`: everything one family of quantization grids knows about itself.

A `QuantSpec` says how wide (`bits`), how symmetric and how fine-grained (channels, groups) a
tensor's quantization is; its `method` is a Format object, which owns the rest: which bit widths
and options it accepts, its integer range, how its scales (or levels) are found from data or
checked when given, how values become stored integers and back, what fake quantization computes
and where its straight-through gradient is cut, what the integer dot multiplies, and what GPTQ's
per-column quantizer does. Every other module asks the format and never compares its name.

Shapes: `x` is a tensor of `lay.shape` (`numerics.Layout`); scales and zero-points have
`lay.scale_shape` (a codebook adds one trailing axis of levels); stored integers `q` are int8 of
`lay.shape`. Formats are stateless frozen dataclasses (hashable: specs are `jit` static args).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar, Optional, Tuple

import jax.numpy as jnp

from jquant._src import numerics
from jquant._src.calibration import MinMax


@dataclasses.dataclass(frozen=True)
class Format(abc.ABC):
    """The interface every format implements (see the module docstring); the abstract methods are
    what a new format must define, the others have defaults that fit most grids."""

    name: ClassVar[str]
    """The alias `QuantSpec(method=...)` accepts for this format."""
    integer_grid: ClassVar[bool] = False
    """Whether x̂ = s·(q − z) with integers q that an int8 × int8 → int32 dot can multiply."""
    ranged: ClassVar[bool] = False
    """Whether the grid is set by a clip range [lo, hi] (calibration, learned steps and clips apply)."""
    static_range: ClassVar[bool] = False
    """Whether one per-tensor grid can be set from an observed range [lo, hi] (`range_params`: the
    Flax wrappers' static activation ranges)."""

    # --- the spec ------------------------------------------------------------------------
    @abc.abstractmethod
    def validate(self, spec) -> None:
        """ValueError naming the field, the value and what is allowed, if `spec` does not fit."""

    @abc.abstractmethod
    def qrange(self, spec) -> Tuple[int, int]:
        """(Qmin, Qmax): the smallest and largest stored integer."""

    def offset(self, spec) -> float:
        """The grid's half-step shift: x̂ = s·(q − z + offset)."""
        return 0.0

    def integer_magnitude(self, spec) -> int:
        """Bound on |integer| the integer dot multiplies (for int32 overflow checks)."""
        qmin, qmax = self.qrange(spec)
        return max(-qmin, qmax)

    # --- scales --------------------------------------------------------------------------
    @abc.abstractmethod
    def params(self, x, spec, lay: numerics.Layout, scale=None, zero_point=None):
        """(scale, zero_point) for `x`: computed from its values when `scale` is None, else the
        given ones checked and broadcast to the scale shape. zero_point is None without one."""

    def range_params(self, lo, hi, spec):
        """(scale, zero_point) of the grid that covers [lo, hi] (lo ≤ hi, scalars or arrays of the
        scale's shape); only called where `static_range`."""
        raise NotImplementedError(f"{self.name} has no static range")

    # --- values --------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, x, spec, lay: numerics.Layout, scale, zero_point, *, fixed: bool):
        """The stored integers of `x` (int8, x's shape). `fixed`: the scale was given, not
        computed from `x` (some formats skip guards a computed scale cannot need)."""

    @abc.abstractmethod
    def decode(self, q, scale, zero_point, spec, lay: numerics.Layout):
        """x̂ from stored integers, in the scale's dtype, x's shape. A format that overrides
        `saturates` also takes `saturate=False`: skip clipping products beyond the float range."""

    def saturates(self, scale, zero_point, spec):
        """None if `decode` never clips (the default); otherwise a scalar bool array, False when
        no product of these scales (and zero-points) and the grid's integers can leave the float range, so that
        `decode(..., saturate=False)` equals `decode` — a per-element clip the caller may skip
        (the weight-only dot does, decoding a weight chunk by chunk)."""
        return None

    def to_codes(self, q, spec):
        """Unsigned codes in [0, 2^bits) of the integers `q`, for packed storage."""
        return q - jnp.int8(self.qrange(spec)[0])

    def from_codes(self, codes, spec):
        """Inverse of `to_codes` (int8)."""
        return codes.astype(jnp.int8) + jnp.int8(self.qrange(spec)[0])

    def fake_quantize(self, x, spec, lay: numerics.Layout, scale, zero_point, *, fixed: bool):
        """`decode(encode(x))` in the scale's dtype (x's shape): fake quantization's forward."""
        return self.decode(self.encode(x, spec, lay, scale, zero_point, fixed=fixed), scale, zero_point, spec, lay)

    def inside(self, x, spec, lay: numerics.Layout, scale, zero_point, *, fixed: bool) -> Optional[object]:
        """Where the straight-through gradient passes (bool, x's shape), or None where it passes
        everywhere (no clip: every value is represented within the grid's span)."""
        return None

    # --- the integer dot -----------------------------------------------------------------
    def integer_problem(self, spec) -> Optional[str]:
        """Why an int8 × int8 → int32 dot cannot multiply this spec's integers, or None."""
        if self.integer_grid:
            return None
        return f"uses method={self.name!r}, which has no integer grid; integer formats: uniform, sign"

    def integer_operand(self, q, scale, spec):
        """(integers, scale) that an integer dot multiplies for stored `q`: x̂ = scale·integers
        (after the zero-point); only called where `integer_problem` is None."""
        return q, scale

    # --- GPTQ ----------------------------------------------------------------------------
    def element_params(self, scale, zero_point, spec, lay: numerics.Layout):
        """The grid's parameters broadcast to one per element of `lay.shape` (a codebook adds a
        trailing axis of levels): what `quantize_elements` takes, one row at a time."""
        scale = lay.from_grouped(jnp.broadcast_to(scale, lay.grouped_shape))
        if zero_point is not None:
            zero_point = lay.from_grouped(jnp.broadcast_to(zero_point, lay.grouped_shape))
        return scale, zero_point

    @abc.abstractmethod
    def quantize_elements(self, w, scale, zero_point, spec):
        """Grid values of `w` with per-element parameters (`element_params`, indexed like w)."""


def check_no_range_options(spec, fmt: Format) -> None:
    """The options only a ranged grid has (calibration, mid-rise, zero-point) are left at default."""
    if not spec.symmetric:
        raise ValueError(f"QuantSpec.symmetric=False with method={fmt.name!r}; {fmt.name} quantization has no "
                         "zero-point (leave symmetric=True)")
    if not isinstance(spec.calibration, MinMax):
        raise ValueError(f"QuantSpec.calibration={spec.calibration!r} with method={fmt.name!r}; calibration chooses "
                         "a uniform grid's range (method='uniform')")
    if spec.midrise:
        raise ValueError(f"QuantSpec.midrise=True with method={fmt.name!r}; a mid-rise grid is symmetric uniform "
                         "(method='uniform', symmetric=True)")


def no_zero_point(zero_point, spec) -> None:
    """ValueError if a zero-point was given to a format that has none."""
    if zero_point is not None:
        raise ValueError(f"{spec!r} has no zero-point; zero_point= is not accepted")


def broadcast_fixed(name: str, value, spec, lay: numerics.Layout):
    """A given scale/zero-point/step broadcast to the scale shape, or a ValueError saying so."""
    try:
        return jnp.broadcast_to(value, lay.scale_shape)
    except ValueError:
        raise ValueError(f"{name} of shape {tuple(jnp.shape(value))} does not broadcast to the scale shape "
                         f"{lay.scale_shape} of {spec!r} on a tensor of shape {lay.shape}") from None
