"""Post-training quantization from calibration data, on any JAX function.

`gptq(fn, params, policy, batches)` finds where `fn(params, *batch)` multiplies each
policy-matched weight (by tracing it to a jaxpr — no model-specific code) and quantizes weight by
weight with the inputs it really sees. `awq` and `smoothquant` fold per-input-channel scales into
the float params (the function is unchanged) so that quantizing afterwards loses less. Modules:
`capture` (sites and input statistics), `gptq` (the per-weight algorithm), `layerwise` (the
driver over a tree), `folding` (where a per-channel scale can be folded), `scaling` (AWQ,
SmoothQuant).
"""

from jquant.ptq.gptq import LayerResult, gptq_weight
from jquant.ptq.layerwise import gptq
from jquant.ptq.scaling import awq, smoothquant

__all__ = ["gptq", "gptq_weight", "LayerResult", "awq", "smoothquant"]
