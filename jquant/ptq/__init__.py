"""Post-training quantization from calibration data, on any JAX function.

`gptq(fn, params, policy, batches)` finds where `fn(params, *batch)` multiplies each
policy-matched weight (by tracing it to a jaxpr — no model-specific code) and quantizes weight by
weight with the inputs it really sees. Modules: `capture` (sites and input statistics), `gptq`
(the per-weight algorithm), `layerwise` (the driver over a tree).
"""

from jquant.ptq.gptq import LayerResult, gptq_weight
from jquant.ptq.layerwise import gptq

__all__ = ["gptq", "gptq_weight", "LayerResult"]
