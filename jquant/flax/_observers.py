"""Activation observers: an EMA of each batch's per-tensor range, turned into a static scale.

State per observed activation: `act_lo`, `act_hi` (float32 scalars) and `count` (int32, batches
seen). Each batch's range [lo_b, hi_b] is what the activation spec's `calibration` picks for that
batch: min/max (`MinMax`, default; ±absmax when symmetric), percentiles (`Percentile(p)`), the
MSE-searched clip (`MSE()`), HQQ's fitted grid (`HQQ()`). The first batch sets lo/hi; later
ones move them by lo ← m·lo + (1 − m)·lo_b (same for hi) with momentum m. Static ranges are per-tensor: a
per-feature activation scale would vary along the contraction and rule out the integer path, and
a per-token one depends on the batch. The format turns the range into its grid
(`Format.range_params`): a uniform one as `scale_from_range` says, FP8 (e4m3, e5m2) with
s = max(−lo, hi) / largest.
"""

from __future__ import annotations

import jax.numpy as jnp

from jquant._src.calibration import MinMax, Percentile
from jquant._src.formats.uniform import calibrated_range
from jquant._src.numerics import layout
from jquant._src.spec import QuantSpec


def initial_stats():
    """(name, initializer) of the observer state, in a fixed order."""
    return (("act_lo", lambda: jnp.zeros((), jnp.float32)), ("act_hi", lambda: jnp.zeros((), jnp.float32)),
            ("count", lambda: jnp.zeros((), jnp.int32)))


def require_static(act: QuantSpec, momentum: float, where: str) -> None:
    """Check, before a calibration pass runs the layer, that `act` can have a static range.

    Raises:
      ValueError: `act` is not a per-tensor uniform spec, or momentum is outside [0, 1).
    """
    if act.channel_axes or act.group_size is not None or not act.method.static_range:
        raise ValueError(f"{where}: static activation ranges are per-tensor uniform or FP8; {act!r} has channels, "
                         "groups or another method — use it dynamically (no calibration) instead")
    if not 0 <= momentum < 1:
        raise ValueError(f"calibration momentum={momentum} must be in [0, 1)")


def observe(stats, x, act: QuantSpec, momentum: float, where: str):
    """New (act_lo, act_hi, count) after seeing the activation batch `x`.

    Raises:
      ValueError: as `require_static`.
    """
    require_static(act, momentum, where)
    lo, hi, count = stats
    x = jnp.asarray(x, jnp.float32)
    batch_lo, batch_hi = (jnp.reshape(r, ()) for r in _batch_range(x, act))
    first = count == 0
    lo = jnp.where(first, batch_lo, momentum * lo + (1 - momentum) * batch_lo)
    hi = jnp.where(first, batch_hi, momentum * hi + (1 - momentum) * batch_hi)
    return lo, hi, count + 1


def observe_all(stats, activations, act: QuantSpec, momentum: float, where: str):
    """New (act_lo, act_hi, count) after `observe` of each activation batch in turn."""
    for x in activations:
        stats = observe(stats, x, act, momentum, where)
    return stats


def _batch_range(x, act: QuantSpec):
    # Min/max and percentiles observe both tails (a symmetric spec takes max(|lo|, |hi|) at the
    # end); a range fitted to the grid (MSE's clip, HQQ's fit) is searched on the spec's own grid.
    if isinstance(act.calibration, (MinMax, Percentile)):
        return act.calibration.group_range(x, tuple(range(x.ndim)), symmetric=False)
    return calibrated_range(x, act, layout(x.shape, act))


def static_scale(stats, act: QuantSpec):
    """(scale, zero_point) for `act` from observed (act_lo, act_hi, count)."""
    lo, hi, _ = stats
    return act.method.range_params(lo, hi, act)
