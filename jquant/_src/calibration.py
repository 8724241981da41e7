"""Calibration: how a uniform grid's clip range is chosen from the data it quantizes.

Each method is a small frozen (hashable) object set on `QuantSpec(calibration=...)`:

* `MinMax()` — the default: the range covers every value (each within half a step of the grid).
  Symmetric: [-absmax, absmax]; asymmetric: [min(x), max(x)] (widened to contain 0).
* `Percentile(p)` — clips outliers: symmetric: [-P_p(|x|), P_p(|x|)]; asymmetric:
  [P_(100-p)(x), P_p(x)], with P the linear-interpolation percentile of each group.
* `MSE(...)` — the clip ratio r that minimises the group's quantization error Σ|x - Q_r(x)|^norm,
  where Q_r quantizes with the min/max range shrunk to r·[lo, hi]; r is searched over
  `num_ratios` evenly spaced values in [min_ratio, 1], per channel/group, in one vectorized,
  jit-able pass (a `fori_loop` over candidates that keeps each group's best so far; ties keep
  the larger ratio).
* `HQQ(...)` — half-quadratic quantization (Badri & Shaji 2023): the scale and zero-point that
  minimise the sparsity-promoting error Σ|x - Q(x)|^p (p <= 1) by alternating a generalized
  soft-threshold of the error with a closed-form least-squares fit of the grid, from min/max.

Every method works per tensor, per channel and per group (the reduction runs over the grouped
view's shared axes, see `numerics.layout`). Calibration applies to `method="uniform"`;
sign and codebook methods have their own statistics.

The protocol (one for all methods, so the format never asks which method it has): the uniform
format calls `group_range(xg, axes, symmetric)` for the statistic, then `refine(xg, lo, hi, grid)`
with its grid (`formats.uniform.CalibrationGrid`: the `spec`, the reduced `axes`, `params(lo, hi)`
→ the stored (scale, zero-point), `fake_quantize(xg, scale, zero_point, bounded=...)` → x̂ as
`quantize`/`dequantize` return it, `levels(xg, scale, zero_point)` → the grid index k with
x̂ = s·k, `range_of(scale, zero_point)` → the [lo, hi] whose `params` are those, and `bounded`,
the division mode of the format's own quantize pass). Searching methods (MSE, HQQ) optimise on
that grid, which keeps this module below the formats; the others return [lo, hi] as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Tuple, Union

import jax
import jax.numpy as jnp

from jquant._src import numerics


# A searching `refine` compiled once per (calibration, grid, shapes): run eagerly, its loop would
# otherwise be traced and compiled again on every call (its body is a new closure each time).
_compiled = functools.partial(jax.jit, static_argnums=(0, 4))


class _Statistic:
    """A calibration whose range is its statistic alone: `refine` keeps it."""

    def refine(self, xg, lo, hi, grid):
        """(lo, hi) unchanged (the protocol is in the module docstring)."""
        del xg, grid
        return lo, hi


@dataclasses.dataclass(frozen=True)
class MinMax(_Statistic):
    """Range = the data's full range (absmax symmetric, min/max asymmetric). No value is more
    than half a step from the grid: an asymmetric grid's integer zero-point (0.0 exact) moves it
    from [lo, hi] by up to s/2, so a value at one end may round to the grid's edge, an error of at
    most s/2 like any rounding. (A grid widened to contain both ends exactly, measured on
    `examples/char_lm.py` g128: +1.0% vs +1.1% perplexity at 4 bits, +4.4% vs +3.6% at 3.)"""

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
class Percentile(_Statistic):
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
        """The min/max range that `refine` shrinks."""
        return MinMax().group_range(xg, axes, symmetric)

    def ratios(self):
        """The candidate ratios, ascending, ending at exactly 1."""
        if self.num_ratios == 1:
            return jnp.ones((1,), jnp.float32)
        return jnp.linspace(self.min_ratio, 1.0, self.num_ratios, dtype=jnp.float32)

    @_compiled
    def refine(self, xg, lo, hi, grid):
        """r·(lo, hi) with the candidate ratio r that minimises Σ|x - Q_r(x)|^norm per group.

        The search runs on each group divided by its absmax (the error's argmin is scale-invariant,
        and the powers cannot overflow for data near the float max). Candidates are visited from
        r = 1 downwards and only a strictly smaller error replaces the best, so ties keep the larger
        range. A NaN in a group makes every error NaN, so r stays 1 and the NaN reaches the scale.
        """
        unit = numerics.safe_divisor(jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
        xn, lo_n, hi_n = numerics.divide(xg, unit), lo / unit, hi / unit  # x·(1/unit): see `divide`
        ratios = self.ratios().astype(xg.dtype)

        def error(r):
            scale, zero_point = grid.params(lo_n * r, hi_n * r)
            diff = jnp.abs(grid.fake_quantize(xn, scale, zero_point, bounded=True) - xn)  # scales <= 1
            return jnp.sum(diff ** self.norm, axis=grid.axes, keepdims=True)

        def visit(i, best):
            best_error, best_ratio = best
            r = ratios[ratios.shape[0] - 1 - i]
            e = error(r)
            better = e < best_error
            return jnp.where(better, e, best_error), jnp.where(better, r, best_ratio)

        first = (error(ratios[-1]), jnp.ones_like(lo))
        _, ratio = jax.lax.fori_loop(1, ratios.shape[0], visit, first)
        return lo * ratio, hi * ratio

    def __repr__(self) -> str:
        return f"MSE(num_ratios={self.num_ratios}, min_ratio={self.min_ratio:g}, norm={self.norm:g})"


@dataclasses.dataclass(frozen=True)
class HQQ:
    """Range = the grid (scale s, integer zero-point z) that minimises Σ|x − x̂|^p per group, by
    half-quadratic splitting (Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine
    Learning Models"), data-free, from the min/max grid.

    The problem min_{s,z} Σ|x − x̂|^p, x̂ = s·(q − z), q = clip(round(x/s) + z, Qmin, Qmax), is
    split with an auxiliary error e: min ‖e‖_p^p + β/2·‖e − (x − x̂)‖², solved by alternating,
    `iters` times, on each group divided by its min/max step s0 (so β is in quantization steps:
    it acts alike at every bit width and data scale):

      e ← sign(r)·max(|r| − |r|^(p−1)/β, 0),  r = (x − x̂)/s0   (the generalized soft threshold)
      (s, z) ← the least-squares fit x/s0 − e ≈ (s/s0)·(q − z) for the current integers q
               (slope and intercept; symmetric grids fit the slope only, z = 0)
      z ← round(z), clipped to [Qmin, Qmax];  β ← κ·β

    Elements with a large residual keep it in e and drop out of the fit (the outliers that a
    p < 1 norm forgives); the rest are fitted in least squares.

    Integer zero-points (the storage convention): jquant stores z as an int8 integer so that 0.0
    is exact and the integer dot multiplies q − z. The paper's float zero-point would shift the
    grid by a fraction of a step, which an integer z cannot, and keeping the min/max scale while
    moving an integer z never beats the start (measured); so HQQ fits the scale too, rounds z
    every iteration (each iterate is a storable grid), and returns the range
    [s·(Qmin − z), s·(Qmax − z)] (symmetric: ±s·Qmax, mid-rise ±s·2^(b−1)), which the format turns
    back into that z and s (to its last bit). Each iterate is scored by the grid the format
    stores for its range, on the format's own quantize pass, and each group keeps its best (only
    a strictly smaller error replaces it, the min/max start first), so the result is never worse
    than min/max on Σ|x − x̂|^p (as float32 sums it). A group with a NaN keeps its min/max range
    (NaN scale); an all-zero group keeps scale 0.

    β sets how far the grid moves from min/max: residuals below β^(−1/(2−p)) steps get e = 0
    (fitted fully), larger ones are moved from x̂ towards x by |r|^(p−1)/β steps only. A small β
    fits the grid to (nearly) all of x at once, clipping the group's extremes as far as the
    p-norm likes; a large one takes small steps from min/max. (The paper's β = 10 is in the
    weights' own units, |x| ~ 0.01–0.3 in LLMs, and its scale stays fixed.) On
    `examples/char_lm.py` (g128 asymmetric) β = 10 had the best weight SQNR but +76% perplexity
    at 2 bits (min/max +31%) and +5.8% at 3 bits (min/max +3.6%); the default β = 100 beats
    min/max in weight SQNR (+1.2/+0.3/+0.1 dB at 2/3/4 bits) and in perplexity (+20.8% vs
    +30.7%, +3.4% vs +3.6%, +1.07% vs +1.11%). On that model, clipping weights by their own error
    alone costs perplexity where it goes further (`MSE()` lost to min/max at 2 and 3 bits).

    With `equalization=Equalize()` in the spec, HQQ fits the grid of W / r, so row k's error
    counts r_k^−p times: the rows that matter, which an unweighted weight error cannot tell
    (README, "Rotations (Hadamard), equalization and HQQ": +1.4 dB over min/max RTN on
    all-MiniLM-L6-v2 at int4 and int3, where HQQ alone gains 0.2 / 0.6 dB and the hqq package's
    own HQQ 0.3 / 0.1 dB).

    Args:
      p: the error's exponent, in (0, 1] (0.7, the paper's; 1 is the l1 norm's soft threshold).
      beta: the initial penalty β > 0 on e − (x − x̂), in min/max steps (see above).
      kappa: β's growth per iteration, >= 1 (the paper's 1.01).
      iters: the number of alternating updates, >= 1 (the paper's 20).
    """

    p: float = 0.7
    beta: float = 100.0
    kappa: float = 1.01
    iters: int = 20
    clips = True

    def __post_init__(self):
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not number(self.p) or not 0 < self.p <= 1:
            raise ValueError(f"HQQ.p={self.p!r} must be a number in (0, 1]")
        if not number(self.beta) or not self.beta > 0:
            raise ValueError(f"HQQ.beta={self.beta!r} must be a finite number > 0")
        if not number(self.kappa) or not self.kappa >= 1:
            raise ValueError(f"HQQ.kappa={self.kappa!r} must be a finite number >= 1")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"HQQ.iters={self.iters!r} must be a positive int")

    def group_range(self, xg, axes: Tuple[int, ...], symmetric: bool):
        """The min/max range that `refine` starts from."""
        return MinMax().group_range(xg, axes, symmetric)

    @_compiled
    def refine(self, xg, lo, hi, grid):
        """The best (lo, hi) of the min/max start and `iters` half-quadratic updates (class docstring)."""
        unit = numerics.safe_divisor(grid.params(lo, hi)[0])  # the min/max step s0
        xn = numerics.divide(xg, unit)
        sums = lambda v: jnp.sum(v, axis=grid.axes, keepdims=True)
        mean = lambda v: jnp.mean(v, axis=grid.axes, keepdims=True)

        def score(lo, hi, best):
            """The grid of [lo, hi], its residual r = (x − x̂)/s0, |r|, |r|^p, and `best` updated with
            Σ|r|^p (the objective over s0^p, one power per element for both steps)."""
            scale, zero_point = grid.params(lo, hi)
            r = numerics.divide(xg - grid.fake_quantize(xg, scale, zero_point, bounded=grid.bounded), unit)
            size = jnp.abs(r)
            powered = jnp.exp(self.p * jnp.log(size))  # |r|^p; 7x faster than XLA:CPU's pow, 0 at r = 0
            error = sums(powered)
            best_error, best_lo, best_hi = best
            better = error < best_error  # NaN never is: such a group keeps the min/max start
            keep = lambda new, old: jnp.where(better, new, old)
            return scale, zero_point, r, size, powered, (keep(error, best_error), keep(lo, best_lo), keep(hi, best_hi))

        def update(i, carry):
            lo, hi, beta, best = carry
            scale, zero_point, r, size, powered, best = score(lo, hi, best)
            # |r| − |r|^(p−1)/β, with |r|^(p−1) = |r|^p/|r| (0 where r = 0: e = 0 there)
            shrunk = size - jnp.where(size > 0, powered / jnp.where(size > 0, size, 1), 0) / beta
            target = xn - jnp.sign(r) * jnp.maximum(shrunk, 0)
            k = grid.levels(xg, scale, zero_point)
            if zero_point is None:
                slope = sums(k * target) / sums(k * k)
            else:
                dk = k - mean(k)
                slope = sums(dk * target) / sums(dk * dk)
                # target ≈ slope·k + c = slope·(q − z + c/slope): the new zero-point is z − c/slope
                shift = (mean(target) - slope * mean(k)) / slope
                zero_point = jnp.clip(jnp.round(zero_point.astype(xg.dtype) - shift), grid.spec.qmin, grid.spec.qmax)
            new_lo, new_hi = grid.range_of(slope * unit, zero_point)
            # a degenerate fit (constant k, zero or negative slope) keeps the current grid
            ok = jnp.isfinite(new_lo) & jnp.isfinite(new_hi) & (slope > 0)
            return jnp.where(ok, new_lo, lo), jnp.where(ok, new_hi, hi), beta * self.kappa, best

        start = (jnp.full_like(lo, jnp.inf), lo, hi)
        last_lo, last_hi, _, best = jax.lax.fori_loop(
            0, self.iters, update, (lo, hi, jnp.asarray(self.beta, xg.dtype), start))
        _, best_lo, best_hi = score(last_lo, last_hi, best)[-1]
        return best_lo, best_hi

    def __repr__(self) -> str:
        return f"HQQ(p={self.p:g}, beta={self.beta:g}, kappa={self.kappa:g}, iters={self.iters})"


Calibration = Union[MinMax, Percentile, MSE, HQQ]
CALIBRATIONS = (MinMax, Percentile, MSE, HQQ)
