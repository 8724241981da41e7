"""Quantize an unmodified Flax Linen model by a `Policy`, through `nn.intercept_methods`.

`quantize_linen(model, policy)` returns a `QuantizedLinen` with the model's `init` and `apply`
and the very same params tree. While it runs, Flax's official method interceptor sees every
`nn.Dense`, `nn.DenseGeneral`, `nn.Conv` and `nn.Einsum` call; when the policy has a rule for that
layer's kernel (`params/<module path>/kernel`, its path in the variables that `init` returns, as
`quantize_params(variables, policy)` and `Policy.explain(variables)` see it), the call runs on a
clone of the layer whose `dot_general` (or `conv_general_dilated`) is a `QuantDot` (`QuantConv`) built from the rule — for `nn.Einsum`, which
calls `jnp.einsum` itself, its `promote_dtype` hook quantizes the operands — reading the same
variables. The clone's `promote_dtype` casts the input and bias only: the op quantizes the kernel
as stored and casts it to the compute dtype after (`jquant/flax/_dtypes.py`). Nothing in JAX or
Flax is patched.

* Float params → QAT: kernel fake-quantized by `rule.spec`, input by `rule.act` (dynamic, per
  call), straight-through gradients; optax trains the float params as usual.
* `quantize_params(params, policy)` → serving: QArray kernels; with `rule.act` the integer
  int8×int8→int32 path runs, without it the kernel is dequantized on the fly.
* Static activation ranges: `jquant.flax.calibrate(qmodel, batches, variables=...)` updates
  observers (EMA of the per-tensor range) in a `quant_stats` collection; layers that have them
  use those ranges.
* Learned quantizers (`jquant.learned`): `apply({"params": params, **learned}, x)` with the
  `lsq_step` / `pact_clip` collections from `jquant.learned.init` trains LSQ steps and PACT clips;
  serve with `jquant.learned.quantize_params` and `learned_stats` (static ranges in `quant_stats`).
* LoRA (`Rule(..., lora=jquant.LoRA(r, alpha))`, Dense and DenseGeneral): `init` also returns a
  `"lora"` collection, the adapters keyed like the kernels (`lora/<module path>/kernel/lora_a`,
  `.../lora_b`, `jquant._src.lora`); `apply({"params": ..., "lora": lora}, x)` adds
  (α/r)·(x·A)·B to each adapted layer's x·Ŵ (Ŵ: the QArray through `jquant.dot_general`, a
  fake-quantized float kernel, or the float kernel under `spec=None`). Train the adapters alone by
  differentiating with respect to the `"lora"` collection only (the params — QArrays, whose
  integer codes no optimizer can take and whose scales must not move — are constants);
  without a `"lora"` collection the layers run their base (e.g. after `jquant.merge`).
`init` always runs the float layers (it only creates the params, and the adapters).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import warnings

import flax.errors
import jax.numpy as jnp
from flax import linen as nn

from jquant._src import learned
from jquant._src import lora as lora_lib
from jquant.flax import _observers as observers
from jquant.flax._dtypes import promote_dtype_linen
from jquant._src.ops import QuantConv, QuantDot
from jquant._src.paths import at_path, leaves_with_paths, nest
from jquant._src.policy import Policy, check_policy, check_stack, matches
from jquant._src.qarray import QArray

STATS = "quant_stats"
"""The Linen collection holding activation observers (`act_lo`, `act_hi`, `count` per layer)."""
LORA = "lora"
"""The Linen collection holding LoRA adapters (`<module path>/kernel/lora_a`, `.../lora_b`)."""

_INSIDE = contextvars.ContextVar("jquant_linen_inside", default=False)
_CALIBRATION = contextvars.ContextVar("jquant_linen_calibration", default=None)  # momentum while calibrating
_LAYERS = contextvars.ContextVar("jquant_linen_layers", default=None)  # {kernel path: one layer's rank}, in init


@dataclasses.dataclass(frozen=True)
class QuantizedLinen:
    """A Linen model run under a quantization policy; `init`/`apply` take what the model's take."""

    model: nn.Module
    policy: Policy

    def init(self, *args, **kwargs):
        """The model's `init`. Afterwards the policy is checked against the new variables by the
        policy walk: a rule that matches no parameter, or a kernel that no supported layer
        (Dense, DenseGeneral, Conv, Einsum) uses — it would stay float — is reported in a warning;
        a stacked kernel (`nn.scan`) whose rule does not say so is an error (`check_stack`). Rules
        with a `LoRA` add the adapters (the `"lora"` collection; A drawn from the "params" rng).

        Raises:
          ValueError: a LoRA rule on a layer other than Dense/DenseGeneral, or on a DenseGeneral
            with batch dimensions (naming the kernel).
        """
        layers = {}
        token = _LAYERS.set(layers)
        try:
            with self._intercepting():
                variables = self.model.init(*args, **kwargs)
        finally:
            _LAYERS.reset(token)
        left = []
        for m in matches(variables, self.policy, where="jquant.flax.quantize (Linen init)",
                         selects=lambda rule: rule.spec is not None or rule.act is not None or rule.lora is not None):
            if m.path in layers:
                check_stack(m.path, m.leaf.ndim, layers[m.path], self.policy.rules[m.index])
            else:
                left.append(m)
        if left:
            warnings.warn(f"jquant.flax.quantize: {len(left)} parameter(s) matched by the policy are not the kernel "
                          f"of a Dense, DenseGeneral, Conv or Einsum layer, so QAT leaves them float: "
                          + ", ".join(f"{m.path} (rule {m.index})" for m in left), stacklevel=2)
        return variables

    def apply(self, variables, *args, **kwargs):
        with self._intercepting():
            return self.model.apply(variables, *args, **kwargs)

    def calibration_step(self, variables, *args, momentum: float = 0.9, **kwargs):
        """One calibration step (`jquant.flax.calibrate` runs it per batch): run the model on a
        batch and update every activation observer (EMA of the per-tensor range, kept in the
        `quant_stats` collection). Returns `variables` with `quant_stats` updated. Jit-able."""
        token = _CALIBRATION.set(momentum)
        try:
            with self._intercepting():
                _, stats = self.model.apply(variables, *args, mutable=[STATS], **kwargs)
        finally:
            _CALIBRATION.reset(token)
        return {**variables, **stats}

    def _intercepting(self):
        return nn.intercept_methods(functools.partial(_intercept, self.policy))


def act_ranges(variables) -> dict:
    """{kernel path: (act_lo, act_hi)} of the calibrated observers in `variables["quant_stats"]`
    (what `jquant.learned.init(..., act_ranges=...)` starts PACT clips from), the kernel paths
    relative to the params collection, as `learned.init(variables["params"], ...)` keys them."""
    stats = dict(leaves_with_paths(variables.get(STATS, {})))
    out = {}
    for path, hi in stats.items():
        module, _, name = path.rpartition("/")
        if name == "act_hi":
            prefix = f"{module}/" if module else ""
            out[prefix + "kernel"] = (stats[prefix + "act_lo"], hi)
    return out


def learned_stats(learned_tree, policy: Policy) -> dict:
    """The learned PACT clips as static activation ranges in the `quant_stats` layout:
    {module path: {"act_lo": 0 or −α, "act_hi": α, "count": 1}} — serve a wrapped Linen model with
    `apply({"params": learned.quantize_params(...), "quant_stats": learned_stats(...)}, x)`.

    Raises:
      ValueError: a learned clip whose kernel (`params/<module path>/kernel`) has no rule with an
        act spec.
    """
    out = {}
    for key, alpha in learned.learned_clips(learned_tree).items():
        hit = policy.rule_for(f"params/{key}")
        if hit is None or hit[1].act is None:
            raise ValueError(f"params/{key}: a learned clip but no rule with an act spec in {policy!r}")
        module = key[:-len("kernel")]  # "<module path>/" ("" for a top-level layer)
        nest(out, module + "act_lo", -alpha if hit[1].act.symmetric else jnp.zeros_like(alpha))
        nest(out, module + "act_hi", alpha)
        nest(out, module + "count", jnp.ones((), jnp.int32))
    return out


def quantize_linen(model: nn.Module, policy: Policy) -> QuantizedLinen:
    """Wrap `model` so that its Dense/DenseGeneral/Conv/Einsum layers follow `policy`."""
    check_policy(policy, "jquant.flax.quantize")
    return QuantizedLinen(model, policy)


def _hook(module):
    """(attribute to replace, op class, attributes to clear) for a supported layer, else None.

    Dense/DenseGeneral and Conv take their op from an attribute. nn.Einsum calls `jnp.einsum`
    itself, so its public `promote_dtype` hook is the place to quantize its operands.
    """
    if isinstance(module, (nn.Dense, nn.DenseGeneral)):
        return "dot_general", QuantDot, ("dot_general_cls",)
    if isinstance(module, nn.Conv):
        return "conv_general_dilated", QuantConv, ("conv_general_dilated_cls",)
    if isinstance(module, nn.Einsum):
        return "promote_dtype", _QuantizedPromote, ()
    return None


def _rule_for(policy: Policy, module):
    """The rule for the layer's kernel, looked up by its path and rank — one layer's, inside a
    stack (`Rule.matches(layer=True)`; while initializing, before the kernel exists, by path)."""
    kernel = module.variables.get("params", {}).get("kernel") if module.scope is not None else None
    hit = policy.rule_for(_kernel_path(module), None if kernel is None else kernel.ndim, layer=True)
    return None if hit is None else hit[1]


def _kernel_path(module) -> str:
    """The layer's kernel in the Linen variables: `params/<module path>/kernel`."""
    return "/".join(["params", *(str(p) for p in module.path), "kernel"])


def _intercept(policy, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or _INSIDE.get():
        return next_fun(*args, **kwargs)
    hook = _hook(module)
    rule = _rule_for(policy, module) if hook is not None else None
    if rule is None or (rule.spec is None and rule.act is None and rule.lora is None) or module.is_initializing():
        out = next_fun(*args, **kwargs)
        if hook is not None and _LAYERS.get() is not None:  # init: the layer's kernel exists now
            kernel = module.variables.get("params", {}).get("kernel")
            _LAYERS.get()[_kernel_path(module)] = None if kernel is None else kernel.ndim
            if rule is not None and rule.lora is not None and kernel is not None:
                _init_adapters(module, kernel, rule.lora)
        return out
    attribute, op_class, cleared = hook
    variables = module.variables
    kernel = variables.get("params", {}).get("kernel")
    if isinstance(kernel, QArray) and kernel.value.ndim != kernel.ndim:
        layers = kernel.ndim - kernel.value.ndim
        raise ValueError(f"{_kernel_path(module)}: a QArray of shape {kernel.shape} that a scan slices into layers "
                         f"of shape {kernel.shape[layers:]}, quantized with scales shared across the stack; quantize "
                         f"each layer on its own, as QAT inside the scan does: Rule(..., stacked={layers}) "
                         f"(presets: stacked={layers})")
    rule, variables, args = _apply_learned(rule, variables, args, kernel)
    seen = [] if rule.act is not None and _CALIBRATION.get() is not None else None
    if seen is not None:
        observers.require_static(rule.act, _CALIBRATION.get(), "/".join(module.path))
    activation = {"observe": seen.append} if seen is not None else _static_activation(module, rule)
    op = op_class(rule.spec, rule.act, cast_weight=True, **activation)
    if isinstance(kernel, QArray):
        # Flax checks a stored param's shape leaf by leaf against its initializer, which a packed
        # QArray cannot pass; the layer gets a same-shaped stand-in (a broadcast zero that XLA
        # drops, since nothing reads it) and the op gets the QArray.
        stand_in = jnp.broadcast_to(jnp.zeros((), kernel.dtype), kernel.shape)
        variables = {**variables, "params": {**variables["params"], "kernel": stand_in}}
        op = _WithWeight(op, kernel)
    adapters = variables.get(LORA, {}).get("kernel") if rule.lora is not None else None
    if adapters is not None:
        _lora_inputs(module)
        op = lora_lib.WithAdapters(op, adapters[lora_lib.A], adapters[lora_lib.B], rule.lora.scale)
    promote = {} if attribute == "promote_dtype" else {"promote_dtype": promote_dtype_linen}  # the kernel as stored
    variant = module.clone(parent=None, **{attribute: op}, **promote, **{name: None for name in cleared})
    token = _INSIDE.set(True)
    try:
        out = variant.apply(variables, *args, **kwargs)
    except (TypeError, ValueError) as err:
        raise at_path(_kernel_path(module), err, f"rule {rule!r}: ") from None
    finally:
        _INSIDE.reset(token)
    if seen is not None:
        _observe(module, rule, seen)
    return out


def _lora_inputs(module) -> int:
    """How many leading kernel axes the layer contracts (the adapters' layout, `jquant._src.lora`).

    Raises:
      ValueError: the layer is not a Dense or a DenseGeneral without batch dimensions.
    """
    if isinstance(module, nn.Dense):
        return 1
    if isinstance(module, nn.DenseGeneral) and not module.batch_dims:
        return len(module.axis) if isinstance(module.axis, (tuple, list)) else 1
    raise ValueError(f"{_kernel_path(module)}: LoRA adapters are for Dense and DenseGeneral (without batch_dims) "
                     f"kernels, not {type(module).__name__}; give this layer a rule without lora")


def _init_adapters(module, kernel, config) -> None:
    """Create the layer's adapters in the `"lora"` collection (A he-uniform, B zero)."""
    inputs = _lora_inputs(module)
    try:
        module.variable(LORA, "kernel", lambda: lora_lib.init(module.make_rng("params"), kernel.shape, inputs, config,
                                                              kernel.dtype))
    except flax.errors.ScopeCollectionNotFound:
        raise ValueError(f"{_kernel_path(module)}: the layer's LoRA adapters cannot be created in the '{LORA}' "
                         f"collection inside a lifted transform (nn.scan, nn.vmap) that does not map it; add it "
                         f"as the params are, e.g. variable_axes={{'params': 0, '{LORA}': 0}}") from None


def _apply_learned(rule, variables, args, kernel):
    """Learned quantizers from the `lsq_step` / `pact_clip` collections (`jquant.learned`), if the
    layer has them: the float kernel is LSQ fake-quantized and the input PACT-quantized here, and
    the rule loses the spec / act they replace (so the op does not quantize them again)."""
    step = variables.get(learned.LSQ_STEP, {}).get("kernel")
    clip = variables.get(learned.PACT_CLIP, {}).get("kernel")
    if step is not None and rule.spec is not None and kernel is not None and not isinstance(kernel, QArray):
        kernel = learned.lsq_fake_quant(kernel, step, rule.spec)
        variables = {**variables, "params": {**variables["params"], "kernel": kernel}}
        rule = dataclasses.replace(rule, spec=None)
    if clip is not None and rule.act is not None:
        args = (learned.pact(args[0], clip, rule.act),) + tuple(args[1:])
        rule = dataclasses.replace(rule, act=None)
    return rule, variables, args


def _static_activation(module, rule) -> dict:
    """The op's static `act_scale`/`act_zero_point` from the layer's `quant_stats`, or {} (the
    activation is quantized per call: no spec, or no observer calibrated)."""
    if rule.act is None or not module.has_variable(STATS, "act_lo"):
        return {}
    stats = [module.get_variable(STATS, name) for name, _ in observers.initial_stats()]
    scale, zero_point = observers.static_scale(stats, rule.act)
    return {"act_scale": scale, "act_zero_point": zero_point}


def _observe(module, rule, seen) -> None:
    """A calibration pass: update the layer's observer with each activation its op quantized
    (`seen`, after any rotation: `_QuantOp.observe`); the pass itself quantized dynamically."""
    stats = [module.variable(STATS, name, init) for name, init in observers.initial_stats()]
    new = observers.observe_all([v.value for v in stats], seen, rule.act, _CALIBRATION.get(), "/".join(module.path))
    for variable, value in zip(stats, new):
        variable.value = value


@dataclasses.dataclass(frozen=True, eq=False)
class _QuantizedPromote(QuantDot):
    """nn.Einsum's `promote_dtype` hook: Flax's promotion, then the activation fake-quantized and
    the kernel fake-quantized (QAT) or replaced by the dequantized QArray (serving; nn.Einsum
    runs `jnp.einsum`, so it has no integer path)."""

    def __call__(self, inputs, kernel, bias, dtype=None, inexact=True):
        inputs, _, bias = promote_dtype_linen(inputs, kernel, bias, dtype=dtype, inexact=inexact)
        inputs, kernel = self.fake_quant_inputs(self.observed(inputs), kernel)  # quantized as stored, then cast
        return inputs, kernel, bias


@dataclasses.dataclass(frozen=True)
class _WithWeight:
    """An op called with the layer's stand-in kernel, run on the stored QArray instead."""

    op: object
    weight: QArray

    def __call__(self, lhs, stand_in, *args, **kwargs):
        if isinstance(self.op, _QuantizedPromote):  # (inputs, kernel, bias): serve the dequantized weight
            inputs, _, bias = self.op(lhs, stand_in, *args, **kwargs)
            return inputs, self.weight.dequantize().astype(inputs.dtype), bias  # the layer's compute dtype
        return self.op(lhs, self.weight, *args, **kwargs)  # the op casts it to the compute dtype
