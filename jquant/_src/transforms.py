"""Transforms over parameter trees: quantize, dequantize and fake-quantize by a `Policy`.

Each is a pure function from a pytree to a pytree of the same structure, so it works on a Flax
Linen `params` dict, an NNX `State`, a plain dict or any other pytree, eagerly or under `jit`.

Eagerly, each matched leaf is quantized by one compiled program per (shape, dtype, spec), one leaf
at a time, so peak memory is about one leaf above the input and output trees and the work is a
memory-bound pass, never a Python loop over elements. Every matched leaf is checked for NaN/Inf
by the policy walk (`jquant._src.policy.walk`): eagerly it raises a ValueError naming the path;
under `jit` a `checkify.debug_check` that plain `jit` drops (no cost; NaN then propagates into
its group as documented in `jquant._src.numerics`) and a function run through `checked` (or
`jax.experimental.checkify.checkify` with `checkify.user_checks`) raises with the same message.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import checkify

from jquant._src.paths import is_qarray
from jquant._src.policy import Policy, walk
from jquant._src.qarray import quantize
from jquant._src.ste import fake_quant

_quantize_jit = jax.jit(quantize, static_argnums=1)


def quantize_params(params, policy: Policy, *, warn_unused: bool = True):
    """Replace every float leaf that a rule with a spec matches by its `QArray`.

    Args:
      params: any pytree of arrays.
      policy: the Policy; the first matching rule wins; `spec=None` keeps the leaf in float.
      warn_unused: warn when a rule matched no float leaf (a typo in a pattern must not pass
        silently).

    Returns:
      The same tree structure with QArray leaves where a rule matched.

    Raises:
      ValueError: naming the leaf path and the rule, when the spec does not fit the leaf (axis out
        of range, group size that does not divide its axis) or, eagerly, the leaf holds NaN/Inf
        (under `jit`: only through `checked`, see the module docstring).
    """
    def quantize_leaf(match):
        if isinstance(match.leaf, jax.core.Tracer):
            return quantize(match.leaf, match.rule.spec)
        return _quantize_jit(match.leaf, match.rule.spec)

    return walk(params, policy, quantize_leaf, where="quantize_params", warn_unused=warn_unused)


def fake_quant_params(params, policy: Policy, *, warn_unused: bool = True):
    """Fake-quantize (quantize→dequantize, straight-through gradients) every matched float leaf.

    Same numbers as `dequantize_params(quantize_params(params, policy))`; differentiable, so
    `jax.grad(lambda p: loss(fake_quant_params(p, policy)))` is weight QAT for any model.
    """
    return walk(params, policy, lambda match: fake_quant(match.leaf, match.rule.spec), where="fake_quant_params",
                warn_unused=warn_unused)


def dequantize_params(tree):
    """Replace every QArray leaf by its dequantized float array (original shape and dtype)."""
    return jax.tree_util.tree_map(lambda x: x.dequantize() if is_qarray(x) else x, tree, is_leaf=is_qarray)


def checked(fn):
    """`fn` compiled with its checks on: `jax.jit(checkify.checkify(fn, errors=checkify.user_checks))`,
    raising the first failed check as a ValueError.

    `quantize_params` under a trace checks every matched leaf for NaN/Inf this way, so
    `checked(lambda p: jquant.quantize_params(p, policy))(params)` raises the eager error message
    (naming the leaf path) from a compiled program. Plain `jit` ignores these checks.

    Args:
      fn: a function of arrays (pytrees of arrays); close over everything else (policy, specs).

    Returns:
      A function with `fn`'s arguments and outputs, compiled once per input shape.

    Raises (when called):
      ValueError: a check failed; the message is the failed check's, e.g. "dense/kernel: 1
        non-finite value(s) (NaN/Inf) in the weight; ...".
    """
    run = jax.jit(checkify.checkify(fn, errors=checkify.user_checks))

    @functools.wraps(fn)
    def checked_fn(*args, **kwargs):
        error, out = run(*args, **kwargs)
        message = error.get()
        if message is not None:
            raise ValueError(message)
        return out

    return checked_fn
