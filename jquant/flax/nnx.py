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
"""

from __future__ import annotations

from flax import nnx

from jquant.flax.dtypes import promote_dtype_nnx
from jquant.ops import QuantConv, QuantDot, QuantEinsum
from jquant.policy import Policy


def quantize_nnx(model, policy: Policy):
    """Switch `model`'s matched layers to quantized ops, in place; returns `model`."""
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a jquant.Policy, got {type(policy).__name__}")
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)):
            continue
        hit = policy.rule_for("/".join(str(p) for p in path) + "/kernel")
        if hit is None or (hit[1].spec is None and hit[1].act is None):
            continue
        rule = hit[1]
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
