"""Quantize an unmodified Flax Linen model by a `Policy`, through `nn.intercept_methods`.

`quantize_linen(model, policy)` returns a `QuantizedLinen` with the model's `init` and `apply`
and the very same params tree. While it runs, Flax's official method interceptor sees every
`nn.Dense`, `nn.DenseGeneral` and `nn.Conv` call; when the policy has a rule for that layer's
kernel (matched against `<module path>/kernel` and `params/<module path>/kernel`, the paths
`quantize_params` sees), the call runs on a clone of the layer whose `dot_general` (or
`conv_general_dilated`) is a `QuantDot` (`QuantConv`) built from the rule, reading the same
variables. Nothing in JAX or Flax is patched.

* Float params → QAT: kernel fake-quantized by `rule.spec`, input by `rule.act` (dynamic, per
  call), straight-through gradients; optax trains the float params as usual.
* `quantize_params(params, policy)` → serving: QArray kernels; with `rule.act` the integer
  int8×int8→int32 path runs, without it the kernel is dequantized on the fly.
`init` always runs the float layers (it only creates the params).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools

from flax import linen as nn

from jquant.flax.dtypes import promote_dtype_linen
from jquant.ops import QuantConv, QuantDot
from jquant.policy import Policy

_INSIDE = contextvars.ContextVar("jquant_linen_inside", default=False)


@dataclasses.dataclass(frozen=True)
class QuantizedLinen:
    """A Linen model run under a quantization policy; `init`/`apply` take what the model's take."""

    model: nn.Module
    policy: Policy

    def init(self, *args, **kwargs):
        with self._intercepting():
            return self.model.init(*args, **kwargs)

    def apply(self, variables, *args, **kwargs):
        with self._intercepting():
            return self.model.apply(variables, *args, **kwargs)

    def _intercepting(self):
        return nn.intercept_methods(functools.partial(_intercept, self.policy))


def quantize_linen(model: nn.Module, policy: Policy) -> QuantizedLinen:
    """Wrap `model` so that its Dense/DenseGeneral/Conv layers follow `policy`."""
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a jquant.Policy, got {type(policy).__name__}")
    return QuantizedLinen(model, policy)


def _hook(module):
    """(attribute to replace, op class, attributes to clear) for a supported layer, else None."""
    if isinstance(module, (nn.Dense, nn.DenseGeneral)):
        return "dot_general", QuantDot, ("dot_general_cls",)
    if isinstance(module, nn.Conv):
        return "conv_general_dilated", QuantConv, ("conv_general_dilated_cls",)
    return None


def _rule_for(policy: Policy, module):
    path = "/".join(str(p) for p in module.path)
    for candidate in (f"{path}/kernel", f"params/{path}/kernel"):
        hit = policy.rule_for(candidate)
        if hit is not None:
            return hit[1]
    return None


def _intercept(policy, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or _INSIDE.get():
        return next_fun(*args, **kwargs)
    hook = _hook(module)
    rule = _rule_for(policy, module) if hook is not None or isinstance(module, nn.Einsum) else None
    if rule is None or (rule.spec is None and rule.act is None) or module.is_initializing():
        return next_fun(*args, **kwargs)
    if hook is None:
        raise ValueError(f"{'/'.join(module.path)}/kernel: rule {rule!r} matches a Linen nn.Einsum, which has no "
                         "injectable op; use jnp.einsum(..., _dot_general=jquant.QuantDot(...)) in the model, or "
                         "an NNX model (nnx.Einsum is supported)")
    attribute, op, cleared = hook
    variant = module.clone(parent=None, promote_dtype=promote_dtype_linen, **{attribute: op(rule.spec, rule.act)},
                           **{name: None for name in cleared})
    token = _INSIDE.set(True)
    try:
        return variant.apply(module.variables, *args, **kwargs)
    finally:
        _INSIDE.reset(token)
