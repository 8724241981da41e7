"""One quantization scheme, said three ways: a jquant Policy, Qwix rules, an AQT config.

The schemes are the same math in all three libraries where the libraries allow it: symmetric
int8 or int4 weights (absmax) with one scale per output channel, or per group of `group` along the
contraction. Where a library fixes a choice, its own default stays (they are what its users get):
* activations (W8A8, dynamic int8): jquant `w8a8()` quantizes them per tensor; Qwix and AQT per
  token (one scale per row).
* AQT (`aqt.jax.v2`): `fully_quantized(fwd_bits=8, bwd_bits=None)` (float gradients) and
  `dot_general_make(rhs_bits=4)`; its tiling config needs per-layer axes, so its int4 is per
  channel without groups.
jquant's `int4_weights()` preset is asymmetric (min/max); `Scheme(..., symmetric=False)` gives it.
The Qwix/AQT builders return None when that library is not installed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

import jquant
from common import peer

# Linen layers that hold a kernel; Qwix would otherwise also quantize the attention's q·k einsum.
QWIX_LAYERS = r"(.*/)?(Dense_\d+|query|key|value|out)"


@dataclasses.dataclass(frozen=True)
class Scheme:
    """Weights of `bits` (groups of `group` along the contraction, or per channel); int8 dynamic
    activations when `act`. `symmetric=False` (jquant only) uses min/max instead of absmax."""

    name: str
    bits: int
    act: bool = False
    group: Optional[int] = None
    symmetric: bool = True

    def jquant_policy(self) -> jquant.Policy:
        weight = jquant.QuantSpec(self.bits, symmetric=self.symmetric, channel_axes=(-1,), group_size=self.group)
        act = jquant.QuantSpec(8) if self.act else None
        return jquant.Policy([jquant.Rule(r"(.*/)?kernel", weight, act=act)])

    def qwix_rule(self, qt: bool):
        qwix = peer("qwix")
        if qwix is None or not self.symmetric:
            return None
        cls = qwix.QtRule if qt else qwix.QuantizationRule
        return cls(module_path=QWIX_LAYERS, weight_qtype=jnp.int8 if self.bits == 8 else jnp.int4,
                   act_qtype=jnp.int8 if self.act else None, tile_size=self.group)

    def aqt_dot_general_cls(self):
        """`functools.partial(AqtDotGeneral, cfg)` for the models' `dot_general_cls`, or None."""
        if peer("aqt") is None or not self.symmetric:
            return None
        from aqt.jax.v2 import aqt_dot_general, config
        from aqt.jax.v2.flax import aqt_flax
        if self.act:
            cfg = config.fully_quantized(fwd_bits=self.bits, bwd_bits=None, use_stochastic_rounding=False)
        else:
            cfg = aqt_dot_general.dot_general_make(lhs_bits=None, rhs_bits=self.bits, bwd_bits=None)
        return functools.partial(aqt_flax.AqtDotGeneral, cfg)


def qwix_qat(model, scheme: Scheme):
    """`model` under Qwix's QAT provider (fake quantization with STE), or None."""
    rule = scheme.qwix_rule(qt=True)
    return None if rule is None else peer("qwix").quantize_model(model, peer("qwix").QtProvider([rule]))


def qwix_ptq(model, scheme: Scheme, x):
    """(Qwix PTQ model, function float params → Qwix quantized params), or None.

    The abstract quantized tree comes from `jax.eval_shape` of the PTQ model's init (no weights
    are materialized); `qwix.quantize_params` then quantizes a float tree into it.
    """
    qwix, rule = peer("qwix"), scheme.qwix_rule(qt=False)
    if rule is None:
        return None
    ptq = qwix.quantize_model(model, qwix.PtqProvider([rule]))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)
    return ptq, lambda params: qwix.quantize_params(params, abstract["params"])


def aqt_model(model, scheme: Scheme):
    """A copy of `model` whose layers run AQT's dot_general for `scheme`, or None."""
    cls = scheme.aqt_dot_general_cls()
    return None if cls is None else model.clone(dot_general_cls=cls)
