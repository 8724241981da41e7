"""`QuantSpec`: what a tensor is quantized to (bit width, symmetry, granularity, method)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

from jquant._src import formats
from jquant._src.calibration import CALIBRATIONS, Calibration, MinMax
from jquant._src.equalization import Equalize
from jquant._src.formats import Format
from jquant._src.rotation import Hadamard


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. Frozen and hashable, so it can be a `jit` static argument.

    Args:
      bits: bit width, 1..8. `method="uniform"` needs 2..8 (a symmetric 1-bit grid would hold
        only 0); `method="sign"` needs exactly 1.
      symmetric: True → zero-point 0, integers in [-(2^(b-1)-1), 2^(b-1)-1]; False → a zero-point
        is stored and integers use the full signed range [-2^(b-1), 2^(b-1)-1].
      midrise: symmetric uniform only. False (default, "mid-tread"): 0.0 is a level, 2^b - 1
        levels. True ("mid-rise"): the 2^b levels s·(q + 1/2), q in [-2^(b-1), 2^(b-1)-1]
        (2-bit: ±s/2, ±3s/2), s = absmax / 2^(b-1); one more level, symmetric, but 0.0 is not a
        level. The grid of the optimal uniform quantizer of symmetric data (Max 1960).
      channel_axes: axes that keep their own scale (per-channel); every other axis shares one.
        `()` is per-tensor. Negative axes count from the end, as in NumPy.
      group_size: if set, `group_size` consecutive elements along `group_axis` share a scale
        (per-group). Must divide that axis.
      group_axis: the axis split into groups; must not be a channel axis. Default (None with a
        group size): the largest axis that is not a channel axis (the last of equal ones) — the
        contraction axis of a Dense kernel `(in, out)` with `channel_axes=(1,)`, of a conv kernel
        `HWIO` with `channel_axes=(3,)` (I is larger than H and W), of attention kernels
        `(in, heads, head_dim)`, and the feature axis of a per-token activation.
      method: the format, an object (`jquant.Uniform()`, `Sign()`, `KMeans()`, `NF4()`) or its
        name: "uniform" (affine integer grid), "sign" (1-bit XNOR-Net: q ∈ {-1, +1},
        scale = mean|x| per group), "kmeans" (2^bits Lloyd levels per group, bits 1..4), "nf4"
        (the fixed NormalFloat-4 levels times the group's absmax; bits=4), or a floating-point
        format: "fp8_e4m3", "fp8_e5m2" (bits=8, float32 scales at any granularity), "mxfp8",
        "mxfp4" (bits=8/4, group_size=32, E8M0 block scales), "nvfp4" (bits=4, group_size=16,
        E4M3 block scales and a tensor scale). Stored as the object; each format's module
        documents its numerics.
      calibration: how a uniform grid's range is chosen from the data when no fixed scale is
        given: `MinMax()` (default: absmax / min-max), `Percentile(p)`, `MSE()` (searched clip
        ratio) or `HQQ()` (scale and integer zero-point fitted to min Σ|x − x̂|^p, p < 1). See
        `jquant._src.calibration`.
      rotation: None (default), or `jquant.Hadamard(seed=..., block=...)`: the tensor is stored as
        Q(Rᵀ·x) with R orthogonal along its contraction axis and dequantizes to R·Q(Rᵀ·x)
        (`jquant._src.rotation`). The rotated axis is the group axis, or without a group the axis
        a group would default to (see `group_axis`) — for a per-tensor spec on a 2-D kernel that
        is the larger axis (the last of a square one), which need not be the contraction: give
        `channel_axes` (or a group) to pin it. Its size n must have a Hadamard matrix (`Hadamard`
        says which; else a ValueError names n and what is allowed). A dot with a rotated weight
        rotates the activation instead (`dot_general`); one rotated along a free axis dequantizes.
      equalization: None (default), or `jquant.Equalize(alpha=...)`: the tensor is stored as
        Q(x / r) with r one data-free scale per index of the same axis a rotation rotates, from
        the tensor's own norms, and dequantizes to r·Q(x / r) (`jquant._src.equalization`); with
        a rotation, R acts after the division: stored Q(Rᵀ·(x / r)), dequantized r·R·Q(…). A
        dot with an equalized weight scales the activation by r instead (then rotates it).

    Raises:
      TypeError: a field of the wrong type. ValueError: a value the format does not allow; both
        name the field, the value given and what is allowed.
    """

    bits: int = 8
    symmetric: bool = True
    midrise: bool = False
    channel_axes: Union[int, Tuple[int, ...]] = ()
    group_size: Optional[int] = None
    group_axis: Optional[int] = None
    method: Format = formats.FORMATS["uniform"]
    calibration: Calibration = MinMax()
    rotation: Optional[Hadamard] = None
    equalization: Optional[Equalize] = None

    def __post_init__(self):
        axes = self.channel_axes
        if isinstance(axes, int) and not isinstance(axes, bool):
            axes = (axes,)
        try:
            axes = tuple(axes)
        except TypeError:
            raise TypeError(
                f"QuantSpec.channel_axes must be an int or a tuple of ints, got {self.channel_axes!r}") from None
        if not all(_is_int(a) for a in axes):
            raise TypeError(f"QuantSpec.channel_axes must hold ints, got {self.channel_axes!r}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"QuantSpec.channel_axes has a repeated axis: {axes}")
        object.__setattr__(self, "channel_axes", axes)
        object.__setattr__(self, "method", formats.resolve(self.method))

        if not _is_int(self.bits):
            raise TypeError(f"QuantSpec.bits must be an int, got {self.bits!r}")
        for flag in ("symmetric", "midrise"):  # a truthy string like "False" must not pass
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"QuantSpec.{flag} must be True or False, got {getattr(self, flag)!r}")
        if not isinstance(self.calibration, CALIBRATIONS):
            raise TypeError(f"QuantSpec.calibration={self.calibration!r} is not a calibration; allowed: "
                            "jquant.MinMax(), Percentile(p), MSE(...), HQQ(...)")
        if self.rotation is not None and not isinstance(self.rotation, Hadamard):
            raise TypeError(f"QuantSpec.rotation={self.rotation!r} is not a rotation; allowed: None, "
                            "jquant.Hadamard(seed=..., block=...)")
        if self.equalization is not None and not isinstance(self.equalization, Equalize):
            raise TypeError(f"QuantSpec.equalization={self.equalization!r} is not an equalization; allowed: None, "
                            "jquant.Equalize(alpha=...)")
        self.method.validate(self)

        if self.group_size is not None:
            if not _is_int(self.group_size):
                raise TypeError(f"QuantSpec.group_size must be a positive int or None, got {self.group_size!r}")
            if self.group_size < 1:
                raise ValueError(f"QuantSpec.group_size must be a positive int or None, got {self.group_size!r}")
        if self.group_axis is not None:
            if self.group_size is None:
                raise ValueError(f"QuantSpec.group_axis={self.group_axis} needs a group_size")
            if not _is_int(self.group_axis):
                raise TypeError(f"QuantSpec.group_axis must be an int or None, got {self.group_axis!r}")
            if self.group_axis in axes:
                raise ValueError(f"QuantSpec.group_axis={self.group_axis} is also a channel axis {axes}; "
                                 "groups split an axis that is otherwise shared")

    @property
    def qmin(self) -> int:
        """Smallest stored integer: -(2^(b-1)-1) symmetric, -2^(b-1) asymmetric or mid-rise, -1 for
        sign, 0 for codebook indices (the format's `qrange`)."""
        return self.method.qrange(self)[0]

    @property
    def qmax(self) -> int:
        """Largest stored integer: 2^(b-1) - 1 (1 for sign, 2^b - 1 for codebook indices)."""
        return self.method.qrange(self)[1]

    @property
    def offset(self) -> float:
        """The grid's half-step shift: x̂ = s·(q - z + offset); 1/2 for mid-rise, else 0."""
        return self.method.offset(self)

    @property
    def integer_magnitude(self) -> int:
        """Bound on the integer an integer dot multiplies: |q - z| (Qmax symmetric, Qmax - Qmin
        asymmetric), or |2q + 1| = 2^b - 1 for mid-rise (s·(q + 1/2) = (s/2)·(2q + 1)). Used for
        int32 overflow checks."""
        return self.method.integer_magnitude(self)

    def __repr__(self) -> str:
        parts = [f"bits={self.bits}"]
        if not self.symmetric:
            parts.append("symmetric=False")
        if self.midrise:
            parts.append("midrise=True")
        if self.channel_axes:
            parts.append(f"channel_axes={self.channel_axes}")
        if self.group_size is not None:
            parts.append(f"group_size={self.group_size}")
        if self.group_axis is not None:
            parts.append(f"group_axis={self.group_axis}")
        if self.method != formats.FORMATS["uniform"]:
            parts.append(f"method={self.method.name!r}" if self.method == formats.FORMATS.get(self.method.name)
                         else f"method={self.method!r}")
        if not isinstance(self.calibration, MinMax):
            parts.append(f"calibration={self.calibration!r}")
        if self.rotation is not None:
            parts.append(f"rotation={self.rotation!r}")
        if self.equalization is not None:
            parts.append(f"equalization={self.equalization!r}")
        return f"QuantSpec({', '.join(parts)})"


def transformed(spec: QuantSpec) -> bool:
    """Whether `spec` rotates or equalizes (stores its tensor in another basis)."""
    return spec.rotation is not None or spec.equalization is not None


def untransformed(spec: QuantSpec) -> QuantSpec:
    """The spec of a rotated or equalized spec's stored values, Q(Rᵀ·(x / r)): the same spec
    without its rotation and equalization."""
    return dataclasses.replace(spec, rotation=None, equalization=None)


def stacked(spec: QuantSpec, layers: int) -> QuantSpec:
    """`spec` for a stack of layers along `layers` new leading axes (`nn.scan`, `nnx.vmap`): each
    layer keeps its own scales (the leading axes become channel axes) and every axis `spec` names
    moves with its layer (non-negative axes shift by `layers`, negative ones count from the end
    already). `unstacked` undoes it."""
    if layers == 0:
        return spec
    shift = lambda a: a + layers if a >= 0 else a
    return dataclasses.replace(spec, channel_axes=tuple(range(layers)) + tuple(shift(a) for a in spec.channel_axes),
                               group_axis=None if spec.group_axis is None else shift(spec.group_axis))


def unstacked(spec: QuantSpec, layers: int, ndim: int) -> Optional[QuantSpec]:
    """The spec of one layer of a `stacked` spec on a stack of rank `ndim`, or None if its
    `layers` leading axes are not all channel axes (it was not made for a stack)."""
    own = [a % ndim for a in spec.channel_axes]
    if not set(range(layers)) <= set(own):
        return None
    shift = lambda a: a - layers if a >= 0 else a
    return dataclasses.replace(spec, channel_axes=tuple(shift(a) for a in spec.channel_axes if a % ndim >= layers),
                               group_axis=None if spec.group_axis is None else shift(spec.group_axis))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
