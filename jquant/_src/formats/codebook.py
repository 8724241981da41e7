"""Non-uniform codebooks: Lloyd's k-means levels per group (`method="kmeans"`), and the fixed
NormalFloat-4 table (`method="nf4"`).

Both work on the "rows" view of a tensor: the grouped view (`numerics.Layout`) transposed so that
every axis that keeps its own codebook/scale comes first and every shared axis last, reshaped to
(G, n): G groups of n values each. Values are stored as b-bit level indices (packed, codes = the
indices); the integer dot does not take them (no integer grid) and the straight-through gradient
is the identity (no clip: the levels span the group's values).

k-means (bits 1..4): K = 2^bits sorted levels per group, found by Lloyd's algorithm —
initialised at the quantiles (i + ½)/K of the group's values, then alternately assigning each
value to its nearest level (by the midpoints between sorted levels) and moving each level to the
mean of its values, until no level moves by more than `tol`·(max|x| of the group) or `max_iter`
iterations. An empty cluster keeps its level. The codebook is stored (float32, K per group, as the
QArray's `scale` of shape `scale_shape + (K,)`); a fixed codebook of that shape may be given.

NF4 (bits=4): x̂ = s · NF4[i] with s = absmax of the group and NF4 the 16 NormalFloat levels of
QLoRA (Dettmers et al. 2023): quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
Only the scale is stored. Ties between two levels go to the lower one (both formats).
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jquant._src import numerics
from jquant._src.formats.base import Format, broadcast_fixed, check_no_range_options, no_zero_point

MAX_CODEBOOK_BITS = 4


class _Codebook(Format):
    """What k-means and NF4 share: indices into sorted levels per group."""

    @abc.abstractmethod
    def levels(self, scale, lay):
        """The sorted levels (G, K) of each group, from the stored `scale`."""

    @abc.abstractmethod
    def _rows_and_levels(self, x, lay, scale):
        """(rows of `x` to match, levels (G or 1, K) to match them against)."""

    def qrange(self, spec):
        return 0, 2 ** spec.bits - 1

    def encode(self, x, spec, lay, scale, zero_point, *, fixed: bool):
        rows, levels = self._rows_and_levels(x, lay, scale)
        return lay.from_grouped(from_rows(nearest_level(rows, levels), lay)).astype(jnp.int8)

    def decode(self, q, scale, zero_point, spec, lay):
        rows = to_rows(lay.to_grouped(q), lay).astype(jnp.int32)
        levels = self.levels(scale, lay)
        return lay.from_grouped(from_rows(jnp.take_along_axis(levels, rows, axis=1), lay))

    def element_params(self, scale, zero_point, spec, lay):
        levels = self.levels(scale, lay)  # (G or 1, K)
        levels = jnp.reshape(jnp.broadcast_to(jnp.reshape(levels, lay.scale_shape + levels.shape[-1:]),
                                              lay.grouped_shape + levels.shape[-1:]),
                             lay.shape + levels.shape[-1:])
        return levels, None

    def quantize_elements(self, w, levels, zero_point, spec):
        index = jnp.argmin(jnp.abs(w[:, None] - levels), axis=-1)  # first of equals: the lower level
        return jnp.take_along_axis(levels, index[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class KMeans(_Codebook):
    """2^bits Lloyd levels per group, bits 1..4 (module docstring)."""

    name = "kmeans"

    def validate(self, spec) -> None:
        if not 1 <= spec.bits <= MAX_CODEBOOK_BITS:
            problem = "too large" if spec.bits > MAX_CODEBOOK_BITS else "out of range"
            raise ValueError(f"QuantSpec.bits={spec.bits} is {problem} for method='kmeans' (2^bits levels per "
                             f"group); allowed: 1..{MAX_CODEBOOK_BITS} — use method='uniform' for more bits")
        check_no_range_options(spec, self)

    def params(self, x, spec, lay, scale=None, zero_point=None):
        no_zero_point(zero_point, spec)
        xg = lay.to_grouped(x.astype(numerics.compute_dtype(x.dtype)))
        if scale is None:
            levels = lloyd(to_rows(xg, lay), spec.bits)
            return jnp.reshape(levels, lay.scale_shape + (levels.shape[1],)), None
        want = lay.scale_shape + (2 ** spec.bits,)
        if tuple(jnp.shape(scale)) != want:
            raise ValueError(f"fixed codebook for {spec!r} must have shape {want} (scale shape + 2^bits levels, "
                             f"sorted), got {tuple(jnp.shape(scale))}")
        return jnp.asarray(scale, xg.dtype), None

    def levels(self, scale, lay):
        """The sorted levels (G, K), one row per group."""
        return jnp.reshape(scale, (-1, scale.shape[-1]))

    def _rows_and_levels(self, x, lay, scale):
        xg = lay.to_grouped(x.astype(scale.dtype))
        return to_rows(xg, lay), self.levels(scale, lay)


@dataclasses.dataclass(frozen=True)
class NF4(_Codebook):
    """The 16 NormalFloat-4 levels times each group's absmax (module docstring)."""

    name = "nf4"

    def validate(self, spec) -> None:
        if spec.bits != 4:
            raise ValueError(f"QuantSpec.bits={spec.bits} with method='nf4'; NormalFloat-4 is 4-bit (bits=4)")
        check_no_range_options(spec, self)

    def params(self, x, spec, lay, scale=None, zero_point=None):
        no_zero_point(zero_point, spec)
        xg = lay.to_grouped(x.astype(numerics.compute_dtype(x.dtype)))
        if scale is None:
            return numerics.extrema(xg, lay.reduce_axes, "absmax"), None
        return broadcast_fixed("scale", jnp.asarray(scale, xg.dtype), spec, lay), None

    def levels(self, scale, lay):
        """The levels (G, 16) of each group: its scale times the NF4 table."""
        return jnp.reshape(scale, (-1, 1)) * jnp.asarray(NF4_LEVELS, scale.dtype)[None, :]

    def _rows_and_levels(self, x, lay, scale):
        xg = lay.to_grouped(x.astype(scale.dtype))
        return to_rows(numerics.divide(xg, scale), lay), jnp.asarray(NF4_LEVELS, scale.dtype)[None, :]


NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)
"""The 16 NormalFloat-4 levels (QLoRA, Appendix E), sorted."""


def to_rows(xg, lay: numerics.Layout):
    """Grouped view (`lay.grouped_shape`) → (G, n): kept axes first (flattened), shared axes last."""
    kept = [a for a in range(len(lay.grouped_shape)) if a not in lay.reduce_axes]
    xt = jnp.transpose(xg, kept + list(lay.reduce_axes))
    groups = int(np.prod([lay.grouped_shape[a] for a in kept]))
    n = int(np.prod([lay.grouped_shape[a] for a in lay.reduce_axes]))  # not -1: size-0 tensors
    return jnp.reshape(xt, (groups, n))


def from_rows(rows, lay: numerics.Layout):
    """Inverse of `to_rows`: (G, n) → grouped view."""
    kept = [a for a in range(len(lay.grouped_shape)) if a not in lay.reduce_axes]
    order = kept + list(lay.reduce_axes)
    xt = jnp.reshape(rows, [lay.grouped_shape[a] for a in order])
    return jnp.transpose(xt, np.argsort(order))


def nearest_level(rows, levels):
    """Index of the nearest of the sorted `levels` (G, K) for each value of `rows` (G, n), as uint8.
    Ties go to the lower level."""
    midpoints = levels[:, 1:] / 2 + levels[:, :-1] / 2  # (a + b) / 2 overflows near the float max
    return jnp.sum(rows[:, :, None] > midpoints[:, None, :], axis=-1).astype(jnp.uint8)


def lloyd(rows, bits: int, *, tol: float = 1e-6, max_iter: int = 300):
    """k-means levels (G, 2^bits), sorted, for each row of `rows` (G, n) float32.

    Returns:
      levels: float32 (G, K).
    """
    k = 2 ** bits
    n = rows.shape[1]
    if n == 0:
        return jnp.zeros((rows.shape[0], k), rows.dtype)
    # Lloyd runs on each row divided by its absmax (values in [-1, 1]): the cluster sums of values
    # near the float max would overflow to Inf. The levels are scaled back at the end.
    absmax = numerics.extrema(rows, (1,), "absmax")
    rows = numerics.divide(rows, absmax)
    ordered = jnp.sort(rows, axis=1)
    positions = jnp.clip(((jnp.arange(k) + 0.5) / k * n).astype(jnp.int32), 0, n - 1)
    init = ordered[:, positions]
    threshold = tol * numerics.extrema(rows, (1,), "absmax")

    def update(levels):
        # Compare-and-reduce (fused by XLA) rather than a materialised (G, n, K) one-hot.
        member = nearest_level(rows, levels)[:, :, None] == jnp.arange(k, dtype=jnp.uint8)
        counts = jnp.sum(member, axis=1, dtype=rows.dtype)
        sums = jnp.sum(jnp.where(member, rows[:, :, None], 0), axis=1)
        moved = jnp.where(counts > 0, sums / jnp.maximum(counts, 1), levels)
        return jnp.sort(moved, axis=1)

    def cond(state):
        i, levels, previous = state
        return (i < max_iter) & jnp.any(jnp.abs(levels - previous) > threshold)

    def body(state):
        i, levels, _ = state
        return i + 1, update(levels), levels

    _, levels, _ = jax.lax.while_loop(cond, body, (1, update(init), init))
    return levels * absmax
