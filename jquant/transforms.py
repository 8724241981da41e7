"""Transforms over parameter trees: quantize, dequantize and fake-quantize by a `Policy`.

Each is a pure function from a pytree to a pytree of the same structure, so it works on a Flax
Linen `params` dict, an NNX `State`, a plain dict or any other pytree, eagerly or under `jit`.

Eagerly, each matched leaf is quantized by one compiled program per (shape, dtype, spec), one leaf
at a time, so peak memory is about one leaf above the input and output trees and the work is a
memory-bound pass, never a Python loop over elements. Eagerly, a NaN or Inf in a matched leaf
raises a ValueError naming the path. Under `jit` values are unknown when the program is built, so
`quantize_params` adds a `checkify.debug_check` per matched leaf instead: plain `jit` drops it (no
cost; NaN then propagates into its group as documented in `jquant.numerics`), while a function
run through `checked` (or `jax.experimental.checkify.checkify` with `checkify.user_checks`)
raises the same message.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jquant.policy import Policy, is_float_array, is_qarray, path_to_str
from jquant.qarray import quantize
from jquant.ste import fake_quant

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
    return _map_matched(params, policy, _quantize_leaf, warn_unused)


def fake_quant_params(params, policy: Policy, *, warn_unused: bool = True):
    """Fake-quantize (quantize→dequantize, straight-through gradients) every matched float leaf.

    Same numbers as `dequantize_params(quantize_params(params, policy))`; differentiable, so
    `jax.grad(lambda p: loss(fake_quant_params(p, policy)))` is weight QAT for any model.
    """
    return _map_matched(params, policy, lambda x, spec, path: fake_quant(x, spec), warn_unused)


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


def _non_finite(path: str, count: str) -> str:
    return f"{path}: {count} non-finite value(s) (NaN/Inf) in the weight; quantizing it would corrupt its whole group"


def _quantize_leaf(x, spec, path):
    if isinstance(x, jax.core.Tracer):
        # Values are unknown while tracing: a check that only checkify (`checked`) turns into an error.
        finite = jnp.isfinite(x)
        message = _non_finite(path.replace("{", "{{").replace("}", "}}"), "{count}")
        checkify.debug_check(jnp.all(finite), message, count=jnp.sum(~finite))
        return quantize(x, spec)
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(_non_finite(path, int(jnp.size(x) - jnp.sum(jnp.isfinite(x)))))
    return _quantize_jit(x, spec)


def _map_matched(params, policy: Policy, fn, warn_unused: bool):
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a jquant.Policy, got {type(policy).__name__}")
    used = set()

    def visit(path, leaf):
        if is_qarray(leaf) or not is_float_array(leaf):
            return leaf
        path = path_to_str(path)
        hit = policy.rule_for(path)
        if hit is None:
            return leaf
        index, rule = hit
        used.add(index)
        if rule.spec is None:
            return leaf
        try:
            return fn(leaf, rule.spec, path)
        except ValueError as err:
            if str(err).startswith(path):
                raise
            raise ValueError(f"{path}: rule {index} {rule!r} does not fit shape {tuple(leaf.shape)}: {err}") from None

    out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_qarray)
    unused = [rule for i, rule in enumerate(policy.rules) if i not in used]
    if warn_unused and unused:
        warnings.warn(f"jquant: {len(unused)} policy rule(s) matched no float leaf: {unused}", stacklevel=3)
    return out
