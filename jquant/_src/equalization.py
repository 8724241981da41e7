"""Weight-norm equalization: the `Equalize` config of `QuantSpec.equalization`, a data-free
per-input-channel scale taken from the weight's own norms.

An equalized spec stores W' = W / r quantized, r > 0 one scale per index k of the contraction
axis (`numerics.Layout.transform_axis`, the axis a rotation would rotate), and dequantizes to
r·Q(W / r) ≈ W. Since x·W = (x·r)·(W / r), a dot can instead scale the activation along its
contracted axis (`jquant.dot_general` does; with a rotation too, the activation is scaled
first, then rotated: x·diag(r)·R, the weight stored as Q(Rᵀ·W/r)).

    r_k = (m_k / G)^α,   m_k = sqrt(mean of W² over the other axes at index k),
    G = the geometric mean of the finite nonzero m_k (so those r_k have geometric mean 1),

r_k = 1 where m_k = 0 (an all-zero slice: 0 / 1 is stored exactly) and everywhere when every
m_k is 0. The "other axes" are every axis except the contraction axis and the channel axes
that lead up to it from axis 0 (a stack's layer axes, `Rule(stacked=k)`: each layer gets its
own r); r is the QArray's `eq_scale`, x's shape with 1 on the averaged axes, computed in
float32 (float64 for float64 input) and rounded to bfloat16, which is what is stored and what
the weight is divided by (16 bits per row: 0.004 bits per weight of a 4096-wide output; on
all-MiniLM-L6-v2 int3/int4 RTN a bfloat16 r measured within 0.1 dB of a float32 one, where a
power-of-two r, 8 bits, lost 0.7–0.9 dB without a rotation). NaN and Inf stay visible: a row
with a NaN gets r = 1 and its group dequantizes to NaN, as without equalization
(`jquant._src.numerics`); a row with an Inf gets r = Inf and dequantizes to NaN/Inf along its
whole length (its group too); G is taken over the finite rows, so no other row's r changes.

Why: rounding to nearest gives every element of a group about the same absolute error, while a
trained layer's small input rows (small m_k) often meet its largest activations (a model learns
to damp channels that carry outlier activations: in all-MiniLM-L6-v2 the value projections' rows
for the [CLS] token's outlier channel are 5–10× smaller than the median, `python
examples/minilm_check.py --attention-sink`). Dividing by r makes the stored rows comparable,
and multiplying back scales each row's error by r_k: small rows keep a small error. It is a data-free stand-in for AWQ's activation-aware scales (α as AWQ's exponent),
and it is what makes a Hadamard rotation pay off where the smallest rows matter most (a rotation
alone gives every row the same error). Measured (`examples/minilm_check.py`,
`examples/char_lm.py`, whose tables have the rows): see the README.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jquant._src import numerics


@dataclasses.dataclass(frozen=True)
class Equalize:
    """Weight-norm equalization along the contraction axis (`QuantSpec(equalization=Equalize())`;
    module docstring for r).

    Args:
      alpha: the exponent α in (0, 1] (default 0.5): 1 divides each row by its own RMS (relative
        to the others), smaller values move part of the way.

    Raises:
      TypeError: alpha is not a real number. ValueError: alpha outside (0, 1].
    """

    alpha: float = 0.5

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise TypeError(f"Equalize.alpha must be a number in (0, 1], got {self.alpha!r}")
        if not (0 < self.alpha <= 1 and math.isfinite(self.alpha)):
            raise ValueError(f"Equalize.alpha={self.alpha} must be in (0, 1]")
        object.__setattr__(self, "alpha", float(self.alpha))


def scales(x, equalization: Equalize, lay: numerics.Layout):
    """r for x (module docstring), x's shape with 1 on the averaged axes, in bfloat16; a constant
    to differentiation (like a scale: `fake_quant`'s STE and QAT hold r fixed)."""
    x = jax.lax.stop_gradient(jnp.asarray(x, numerics.compute_dtype(x.dtype)))
    m = jnp.sqrt(jnp.mean(jnp.square(x), axis=lay.averaged_axes, keepdims=True))
    nonzero = m > 0  # False for NaN
    log_m = jnp.log(jnp.where(nonzero, m, 1))  # +inf for an Inf row
    counted = nonzero & jnp.isfinite(m)  # G from the finite rows only: one Inf changes no other r
    count = jnp.sum(counted, axis=lay.transform_axis, keepdims=True)
    log_g = jnp.sum(jnp.where(counted, log_m, 0), axis=lay.transform_axis, keepdims=True) / jnp.maximum(count, 1)
    return jnp.where(nonzero, jnp.exp(equalization.alpha * (log_m - log_g)), jnp.ones_like(m)).astype(jnp.bfloat16)
