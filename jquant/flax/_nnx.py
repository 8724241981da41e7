"""Quantize an NNX model by a `Policy`: walk its graph and switch matched layers to quantized ops.

`quantize_nnx(model, policy)` visits every `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum` and
`nnx.Conv`; when a rule matches the layer's kernel path (`<graph path>/kernel`, as in
`nnx.state(model)`), it sets the layer's injectable op (`dot_general`, `einsum_op`,
`conv_general_dilated`) to a `QuantDot` / `QuantConv` built from the rule, and its
`promote_dtype` to one that passes QArrays through. NNX modules are mutable Python objects, so
this is done in place and the same model is returned.

* Float kernels → QAT (fake quantization, straight-through gradients).
* `nnx.update(model, quantize_params(nnx.state(model, nnx.Param), policy))` → serving with QArray
  kernels (integer path with `rule.act`, dequantize-on-the-fly without).
* `jquant.flax.calibrate(model, batches)` → static activation ranges: each quantized activation gets an
  observer (`QuantStat` variables: EMA of the per-tensor min/max), then keeps those ranges.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from jquant.flax import _observers as observers
from jquant.flax._dtypes import promote_dtype_nnx
from jquant._src.ops import QuantConv, QuantDot, QuantEinsum, _QuantOp
from jquant._src.numerics import layout
from jquant._src.policy import Policy, check_stack, walk


def quantize_nnx(model, policy: Policy):
    """Switch `model`'s matched layers to quantized ops, in place; returns `model`.

    The rules are matched by the policy walk over `nnx.state(model, nnx.Param)` (the paths that
    `nnx.state` and `Policy.explain` show, e.g. `kernel` for a top-level layer), so a rule that
    matches no parameter is reported, and a NaN/Inf kernel or a spec that does not fit one raises
    naming its path, as for `jquant.quantize_params`.
    """
    rules = {}

    def record(match):  # a spec that does not fit the kernel fails here, with its path (as Linen's init)
        if match.rule.spec is not None:  # (per layer of a stacked kernel: Rule.leaf_spec)
            layout(match.leaf.shape, match.rule.spec)
        rules[match.path] = policy.rules[match.index]  # the op quantizes one layer at a time
        return match.leaf

    walk(nnx.state(model, nnx.Param), policy, record, where="jquant.flax.quantize",
         selects=lambda rule: rule.spec is not None or rule.act is not None)
    for path, node in nnx.iter_graph(model):
        rule = rules.get(kernel_path(path))
        if rule is None or not isinstance(node, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)):
            continue
        check_stack(kernel_path(path), node.kernel.get_value().ndim, _layer_rank(node), rule)
        node.promote_dtype = promote_dtype_nnx
        if isinstance(node, nnx.Conv):
            node.conv_general_dilated = QuantConv(rule.spec, rule.act)
        elif isinstance(node, nnx.Einsum):
            node.einsum_op = QuantEinsum(rule.spec, rule.act)
        else:
            node.dot_general = QuantDot(rule.spec, rule.act)
            if getattr(node, "dot_general_cls", None) is not None:
                node.dot_general_cls = None
    return model


def _layer_rank(node) -> int:
    """The rank of the kernel the layer itself uses (inside `nnx.scan` over a stack of layers, the
    stored kernel has the stack's axes in front)."""
    if isinstance(node, nnx.Conv):
        return len(node.kernel_size) + 2
    if isinstance(node, nnx.Einsum):
        return len(node.kernel_shape)
    if isinstance(node, nnx.LinearGeneral):
        return len(node.in_features) + len(node.out_features)
    return 2


class QuantStat(nnx.Variable):
    """Activation observer state (EMA of min/max, batches seen): calibrated, never trained."""


_OP_ATTRIBUTES = (("dot_general", 0), ("einsum_op", 1), ("conv_general_dilated", 0))


class ObservedOp(nnx.Module):
    """A quantized op with an activation observer. While `observing`, each call updates the
    observer and quantizes dynamically; afterwards the observed range is the static one."""

    def __init__(self, op: _QuantOp, lhs_position: int, where: str):
        self.op = op
        self.lhs_position = lhs_position
        self.where = where
        self.observing = True
        self.momentum = 0.9
        self.act_lo, self.act_hi, self.count = (QuantStat(init()) for _, init in observers.initial_stats())

    def __call__(self, *args, **kwargs):
        stats = [v.get_value() for v in (self.act_lo, self.act_hi, self.count)]
        if self.observing:
            new = observers.observe(stats, args[self.lhs_position], self.op.act, self.momentum, self.where)
            for variable, value in zip((self.act_lo, self.act_hi, self.count), new):
                variable.set_value(value)
            return self.op(*args, **kwargs)
        scale, zero_point = observers.static_scale(stats, self.op.act)
        return dataclasses.replace(self.op, act_scale=scale, act_zero_point=zero_point)(*args, **kwargs)


def calibrate_nnx(model, batches, momentum: float = 0.9):
    """Observe the activations of every quantized op with an activation spec over `batches`
    (iterable of argument tuples for `model(*batch)`), then freeze them as static ranges.

    Run it on a model already passed through `quantize`. Calibrating again continues the EMA.
    Returns `model` (changed in place).
    """
    targets = []
    for path, node in nnx.iter_graph(model):
        for attribute, position in _OP_ATTRIBUTES:
            op = getattr(node, attribute, None) if isinstance(node, nnx.Module) else None
            if isinstance(op, _QuantOp) and op.act is not None:
                where = kernel_path(path)
                targets.append((node, attribute, ObservedOp(op, position, where)))
            elif isinstance(op, ObservedOp):
                targets.append((node, attribute, op))
    for node, attribute, observed in targets:
        observed.observing, observed.momentum = True, momentum
        setattr(node, attribute, nnx.data(observed))  # a module holding state, not a static attribute
    for batch in batches:
        model(*batch)
    for _, _, observed in targets:
        observed.observing = False
    return model


def kernel_path(module_path) -> str:
    """The path of a layer's kernel in `nnx.state(model)`: its graph path, then `kernel`."""
    return "/".join([str(p) for p in module_path] + ["kernel"])
