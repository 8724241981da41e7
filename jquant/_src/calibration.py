"""Calibration: how a uniform grid's clip range is chosen from the data it quantizes.

Each method is a small frozen (hashable) object set on `QuantSpec(calibration=...)`:

* `MinMax()` — the default: the range covers every value. Symmetric: [-absmax, absmax];
  asymmetric: [min(x), max(x)] (widened to contain 0).
* `Percentile(p)` — clips outliers: symmetric: [-P_p(|x|), P_p(|x|)]; asymmetric:
  [P_(100-p)(x), P_p(x)], with P the linear-interpolation percentile of each group.
* `MSE(...)` — the clip ratio r that minimises the group's quantization error Σ|x - Q_r(x)|^norm,
  where Q_r quantizes with the min/max range shrunk to r·[lo, hi]; r is searched over
  `num_ratios` evenly spaced values in [min_ratio, 1], per channel/group, in one vectorized,
  jit-able pass (a `fori_loop` over candidates that keeps each group's best so far; ties keep
  the larger ratio).

Every method works per tensor, per channel and per group (the reduction runs over the grouped
view's shared axes, see `numerics.layout`). Calibration applies to `method="uniform"`;
sign and codebook methods have their own statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple, Union

import jax.numpy as jnp

from jquant._src import numerics


@dataclasses.dataclass(frozen=True)
class MinMax:
    """Range = the data's full range (absmax symmetric, min/max asymmetric). Nothing is clipped."""

    clips = False

    def group_range(self, xg, axes: Tuple[int, ...], symmetric: bool):
        """(lo, hi) per group of the grouped view `xg`, reduced over `axes` with keepdims."""
        if symmetric:
            absmax = numerics.extrema(xg, axes, "absmax")
            return -absmax, absmax
        return numerics.extrema(xg, axes, "min"), numerics.extrema(xg, axes, "max")

    def __repr__(self) -> str:
        return "MinMax()"


@dataclasses.dataclass(frozen=True)
class Percentile:
    """Range = the p-th percentile of |x| (symmetric) or [P_(100-p), P_p] of x (asymmetric).

    Args:
      percentile: in (50, 100]; 100 is `MinMax`. Typical: 99.9–99.99 for activations with outliers.
    """

    percentile: float = 99.9
    clips = True

    def __post_init__(self):
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 50 < p <= 100:
            raise ValueError(f"Percentile.percentile={p!r} must be a number in (50, 100]")

    def group_range(self, xg, axes: Tuple[int, ...], symmetric: bool):
        """(lo, hi) per group of the grouped view `xg`, reduced over `axes` with keepdims."""
        # A percentile below 100 interpolates between order statistics that NaN (sorted last) may
        # not reach; a NaN anywhere in the group must still reach the range.
        nan = jnp.isnan(numerics.extrema(xg, axes, "absmax"))
        if symmetric:
            top = jnp.where(nan, jnp.nan, jnp.percentile(jnp.abs(xg), self.percentile, axis=axes, keepdims=True))
            return -top, top
        lo = jnp.percentile(xg, 100 - self.percentile, axis=axes, keepdims=True)
        hi = jnp.percentile(xg, self.percentile, axis=axes, keepdims=True)
        return jnp.where(nan, jnp.nan, lo), jnp.where(nan, jnp.nan, hi)

    def __repr__(self) -> str:
        return f"Percentile({self.percentile:g})"


@dataclasses.dataclass(frozen=True)
class MSE:
    """Range = r·[lo, hi] of the min/max range with the ratio r that minimises Σ|x - Q_r(x)|^norm.

    Args:
      num_ratios: candidate ratios, evenly spaced in [min_ratio, 1] (1 = min/max is always one).
      min_ratio: smallest ratio tried, in (0, 1].
      norm: the error exponent p > 0 (2 = mean squared error; 2.4 is what some PTQ work uses).
    """

    num_ratios: int = 100
    min_ratio: float = 0.2
    norm: float = 2.0
    clips = True

    def __post_init__(self):
        if isinstance(self.num_ratios, bool) or not isinstance(self.num_ratios, int) or self.num_ratios < 1:
            raise ValueError(f"MSE.num_ratios={self.num_ratios!r} must be a positive int")
        if not isinstance(self.min_ratio, (int, float)) or not 0 < self.min_ratio <= 1:
            raise ValueError(f"MSE.min_ratio={self.min_ratio!r} must be in (0, 1]")
        if not isinstance(self.norm, (int, float)) or not self.norm > 0:
            raise ValueError(f"MSE.norm={self.norm!r} must be > 0")

    def group_range(self, xg, axes: Tuple[int, ...], symmetric: bool):
        """The min/max range that the search shrinks (see the uniform format's `calibrated_range`)."""
        return MinMax().group_range(xg, axes, symmetric)

    def ratios(self):
        """The candidate ratios, ascending, ending at exactly 1."""
        if self.num_ratios == 1:
            return jnp.ones((1,), jnp.float32)
        return jnp.linspace(self.min_ratio, 1.0, self.num_ratios, dtype=jnp.float32)

    def __repr__(self) -> str:
        return f"MSE(num_ratios={self.num_ratios}, min_ratio={self.min_ratio:g}, norm={self.norm:g})"


Calibration = Union[MinMax, Percentile, MSE]
CALIBRATIONS = (MinMax, Percentile, MSE)
