"""Non-uniform codebooks: Lloyd's k-means levels per group, and the fixed NormalFloat-4 table.

Both work on the "rows" view of a tensor: the grouped view (`numerics.Layout`) transposed so that
every axis that keeps its own codebook/scale comes first and every shared axis last, reshaped to
(G, n): G groups of n values each.

k-means (`method="kmeans"`): K = 2^bits sorted levels per group, found by Lloyd's algorithm —
initialised at the quantiles (i + ½)/K of the group's values, then alternately assigning each
value to its nearest level (by the midpoints between sorted levels) and moving each level to the
mean of its values, until no level moves by more than `tol`·(max|x| of the group) or `max_iter`
iterations. An empty cluster keeps its level. The codebook is stored (float32, K per group) and
each value as its b-bit index.

NF4 (`method="nf4"`, bits=4): x̂ = s · NF4[i] with s = absmax of the group and NF4 the 16
NormalFloat levels of QLoRA (Dettmers et al. 2023): quantiles of N(0, 1) normalised to [-1, 1],
with an exact zero. Only the scale is stored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jquant.numerics import Layout, compute_dtype, divide, reduce_groups

NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)
"""The 16 NormalFloat-4 levels (QLoRA, Appendix E), sorted."""


def to_rows(xg, lay: Layout):
    """Grouped view (`lay.grouped_shape`) → (G, n): kept axes first (flattened), shared axes last."""
    kept = [a for a in range(len(lay.grouped_shape)) if a not in lay.reduce_axes]
    xt = jnp.transpose(xg, kept + list(lay.reduce_axes))
    groups = int(np.prod([lay.grouped_shape[a] for a in kept]))
    n = int(np.prod([lay.grouped_shape[a] for a in lay.reduce_axes]))  # not -1: size-0 tensors
    return jnp.reshape(xt, (groups, n))


def from_rows(rows, lay: Layout):
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
    absmax = jnp.max(jnp.abs(rows), axis=1, keepdims=True)
    rows = divide(rows, absmax)
    ordered = jnp.sort(rows, axis=1)
    positions = jnp.clip(((jnp.arange(k) + 0.5) / k * n).astype(jnp.int32), 0, n - 1)
    init = ordered[:, positions]
    threshold = tol * jnp.max(jnp.abs(rows), axis=1, keepdims=True)

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


def quantize_codebook(x, spec, lay: Layout, scale=None):
    """Codes (uint8, x's shape) and `scale` for a codebook method.

    `scale`: kmeans → the levels, shape `lay.scale_shape + (2^bits,)`, sorted (fitted by `lloyd`,
    or the fixed codebook given); nf4 → the group absmax, shape `lay.scale_shape` (or the fixed
    `scale` given).
    """
    xg = lay.to_grouped(x.astype(compute_dtype(x.dtype)))
    if spec.method == "kmeans":
        rows = to_rows(xg, lay)
        if scale is None:
            levels = lloyd(rows, spec.bits)
        else:
            want = lay.scale_shape + (2 ** spec.bits,)
            if tuple(jnp.shape(scale)) != want:
                raise ValueError(f"fixed codebook for {spec!r} must have shape {want} (scale shape + 2^bits levels, "
                                 f"sorted), got {tuple(jnp.shape(scale))}")
            levels = jnp.reshape(jnp.asarray(scale, xg.dtype), (-1, want[-1]))
        codes = nearest_level(rows, levels)
        scale = jnp.reshape(levels, lay.scale_shape + (levels.shape[1],))
    else:
        if scale is None:
            scale = reduce_groups(jnp.max, jnp.abs(xg), lay)
        scale = jnp.broadcast_to(jnp.asarray(scale, xg.dtype), lay.scale_shape)
        rows = to_rows(divide(xg, scale), lay)
        codes = nearest_level(rows, jnp.asarray(NF4_LEVELS)[None, :])
    return lay.from_grouped(from_rows(codes, lay)), scale


def dequantize_codebook(codes, scale, spec, lay: Layout):
    """x̂ (in the scale's dtype, x's shape) from codes and `scale` (see `quantize_codebook`)."""
    rows = to_rows(lay.to_grouped(codes), lay).astype(jnp.int32)
    if spec.method == "kmeans":
        levels = jnp.reshape(scale, (-1, scale.shape[-1]))
        values = jnp.take_along_axis(levels, rows, axis=1)
        return lay.from_grouped(from_rows(values, lay))
    values = jnp.asarray(NF4_LEVELS, scale.dtype)[rows]
    return lay.from_grouped(from_rows(values, lay) * scale)
