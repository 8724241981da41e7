"""Quantize an NNX model by a `Policy`: walk its graph and switch matched layers to quantized ops.

`quantize_nnx(model, policy)` visits every `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Einsum` and
`nnx.Conv`; when a rule matches the layer's kernel path (`<graph path>/kernel`, as in
`nnx.state(model)`), it sets the layer's injectable op (`dot_general`, `einsum_op`,
`conv_general_dilated`) to a `QuantDot` / `QuantConv` built from the rule, and its
`promote_dtype` to one that hands the op the kernel as stored (a float kernel, or a QArray),
which the op quantizes and then casts to the layer's compute dtype (`jquant/flax/_dtypes.py`).
NNX modules are mutable Python objects, so this is done in place and the same model is returned.

* Float kernels → QAT (fake quantization, straight-through gradients).
* `nnx.update(model, quantize_params(nnx.state(model, nnx.Param), policy))` → serving with QArray
  kernels (integer path with `rule.act`, dequantize-on-the-fly without).
* `jquant.flax.calibrate(model, batches)` → static activation ranges: each quantized activation gets an
  observer (`QuantStat` variables: EMA of the per-tensor min/max), then keeps those ranges.
* LoRA (`Rule(..., lora=jquant.LoRA(r, alpha))`, Linear and LinearGeneral): the layer's op
  becomes a `LoRADot` holding the adapters as `nnx.LoRAParam` variables (`<layer>/dot_general/
  lora_a`, `.../lora_b`; A he-uniform from `rngs.params()`, B zero, `flax.nnx.LoRA`'s layout),
  which adds (α/r)·(x·A)·B to the layer's x·Ŵ. `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` and
  `nnx.grad(..., argnums=nnx.DiffState(0, nnx.LoRAParam))` train them alone; `LoRAParam` is a
  `Param`, so `nnx.state(model, nnx.Param)` holds them too (the presets' `kernel` rules do not
  match them). `adapters(model)` gives them keyed like the kernels, for `jquant.merge`.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from jquant.flax import _observers as observers
from jquant.flax._dtypes import promote_dtype_nnx
from jquant._src import lora as lora_lib
from jquant._src.ops import QuantConv, QuantDot, QuantEinsum, _QuantOp
from jquant._src.numerics import layout
from jquant._src.paths import nest
from jquant._src.policy import Policy, check_stack, walk


def quantize_nnx(model, policy: Policy, rngs=None):
    """Switch `model`'s matched layers to quantized ops, in place; returns `model`.

    The rules are matched by the policy walk over `nnx.state(model, nnx.Param)` (the paths that
    `nnx.state` and `Policy.explain` show, e.g. `kernel` for a top-level layer), so a rule that
    matches no parameter is reported, and a NaN/Inf kernel or a spec that does not fit one raises
    naming its path, as for `jquant.quantize_params`. Rules with a `LoRA` add adapters (module
    docstring), drawn from `rngs` (an `nnx.Rngs`).

    Raises:
      TypeError: a LoRA rule but no `rngs`.
      ValueError: a LoRA rule on a layer other than Linear / LinearGeneral without batch axes.
    """
    rules = {}

    def record(match):  # a spec that does not fit the kernel fails here, with its path (as Linen's init)
        if match.rule.spec is not None:  # (per layer of a stacked kernel: Rule.leaf_spec)
            layout(match.leaf.shape, match.rule.spec)
        rules[match.path] = policy.rules[match.index]  # the op quantizes one layer at a time
        return match.leaf

    walk(nnx.state(model, nnx.Param), policy, record, where="jquant.flax.quantize",
         selects=lambda rule: rule.spec is not None or rule.act is not None or rule.lora is not None)
    if rngs is None and any(rule.lora is not None for rule in rules.values()):
        raise TypeError("jquant.flax.quantize: the policy gives LoRA adapters; pass rngs=nnx.Rngs(...) to draw them")
    for path, node in nnx.iter_graph(model):
        rule = rules.get(kernel_path(path))
        if rule is None or not isinstance(node, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)):
            continue
        check_stack(kernel_path(path), node.kernel.get_value().ndim, _layer_rank(node), rule)
        node.promote_dtype = promote_dtype_nnx
        if isinstance(node, nnx.Conv):
            node.conv_general_dilated = QuantConv(rule.spec, rule.act, cast_weight=True)
        elif isinstance(node, nnx.Einsum):
            node.einsum_op = QuantEinsum(rule.spec, rule.act, cast_weight=True)
        else:
            node.dot_general = QuantDot(rule.spec, rule.act, cast_weight=True)
            if getattr(node, "dot_general_cls", None) is not None:
                node.dot_general_cls = None
        if rule.lora is not None:
            node.dot_general = nnx.data(LoRADot(node, kernel_path(path), rule.lora, rngs))
    return model


class LoRADot(nnx.Module):
    """A Linear/LinearGeneral's `dot_general` with LoRA adapters: op(x, Ŵ) + (α/r)·(x·A)·B, A and B
    `nnx.LoRAParam`s (`jquant._src.lora` for the layout; a stack's axes in front, as the kernel's)."""

    def __init__(self, layer, where: str, config, rngs):
        if isinstance(layer, nnx.LinearGeneral) and not layer.batch_axis:
            inputs = len(layer.in_features)
        elif isinstance(layer, nnx.Linear):
            inputs = 1
        else:
            raise ValueError(f"{where}: LoRA adapters are for Linear and LinearGeneral (without batch_axis) kernels, "
                             f"not {type(layer).__name__}; give this layer a rule without lora")
        kernel = layer.kernel.get_value()
        adapters = lora_lib.init(rngs.params(), kernel.shape, inputs, config, kernel.dtype,
                                 stacked=kernel.ndim - _layer_rank(layer))
        self.op = layer.dot_general
        self.scale = config.scale
        self.lora_a = nnx.LoRAParam(adapters[lora_lib.A])
        self.lora_b = nnx.LoRAParam(adapters[lora_lib.B])

    def __call__(self, *args, **kwargs):
        return lora_lib.WithAdapters(self.op, self.lora_a[...], self.lora_b[...], self.scale)(*args, **kwargs)


def adapters(model) -> dict:
    """The model's LoRA adapters keyed like its kernels (`<layer>/kernel/lora_a`, `.../lora_b`, the
    layout `jquant.merge` reads): {layer path: {"kernel": {"lora_a": A, "lora_b": B}}} nested."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LoRADot):
            nest(out, kernel_path(path[:-1]) + "/" + lora_lib.A, node.lora_a.get_value())
            nest(out, kernel_path(path[:-1]) + "/" + lora_lib.B, node.lora_b.get_value())
    return out


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


_OP_ATTRIBUTES = ("dot_general", "einsum_op", "conv_general_dilated")


class ObservedOp(nnx.Module):
    """A quantized op with an activation observer. While `observing`, each call updates the
    observer with the activations the op quantizes (after any rotation: `_QuantOp.observe`) and
    quantizes dynamically; afterwards the observed range is the static one."""

    def __init__(self, op: _QuantOp, where: str):
        self.op = op
        self.where = where
        self.observing = True
        self.momentum = 0.9
        self.act_lo, self.act_hi, self.count = (QuantStat(init()) for _, init in observers.initial_stats())

    def __call__(self, *args, **kwargs):
        stats = (self.act_lo, self.act_hi, self.count)
        if self.observing:
            observers.require_static(self.op.act, self.momentum, self.where)
            seen = []
            out = dataclasses.replace(self.op, observe=seen.append)(*args, **kwargs)
            new = observers.observe_all([v.get_value() for v in stats], seen, self.op.act, self.momentum, self.where)
            for variable, value in zip(stats, new):
                variable.set_value(value)
            return out
        scale, zero_point = observers.static_scale([v.get_value() for v in stats], self.op.act)
        return dataclasses.replace(self.op, act_scale=scale, act_zero_point=zero_point)(*args, **kwargs)


def calibrate_nnx(model, batches, momentum: float = 0.9):
    """Observe the activations of every quantized op with an activation spec over `batches`
    (iterable of argument tuples for `model(*batch)`), then freeze them as static ranges.

    Run it on a model already passed through `quantize`. Calibrating again continues the EMA.
    Returns `model` (changed in place).
    """
    targets = []
    for path, node in nnx.iter_graph(model):
        lora = isinstance(node, LoRADot)  # its quantized op: `op` (the layer's `dot_general` is the LoRADot)
        for attribute in ("op",) if lora else _OP_ATTRIBUTES:
            op = getattr(node, attribute, None) if isinstance(node, nnx.Module) else None
            if isinstance(op, _QuantOp) and op.act is not None:
                where = kernel_path(path[:-1] if lora else path)
                targets.append((node, attribute, ObservedOp(op, where)))
            elif isinstance(op, ObservedOp):
                targets.append((node, attribute, op))
    for node, attribute, observed in targets:
        observed.observing, observed.momentum = True, momentum
        setattr(node, attribute, nnx.data(observed))  # a module holding state, not a static attribute
    step = nnx.jit(lambda m, *batch: m(*batch))  # one compiled program per batch shape, not op by op
    for batch in batches:
        step(model, *batch)
    for _, _, observed in targets:
        observed.observing = False
    return model


def kernel_path(module_path) -> str:
    """The path of a layer's kernel in `nnx.state(model)`: its graph path, then `kernel`."""
    return "/".join([str(p) for p in module_path] + ["kernel"])
