"""Post-training quantization from calibration data, on any JAX function `fn(params, *batch)`.

`gptq` finds where `fn` multiplies each policy-matched weight (by tracing it to a jaxpr — no
model-specific code) and quantizes weight by weight with the inputs it really sees. `awq` and
`smoothquant` fold per-input-channel scales into the float params (the function is unchanged) so
that quantizing afterwards loses less. All three return a `Result(params, errors)`.
`fold_rotations` folds rotated specs' Hadamard rotations into the params that make their inputs
(no online rotation at serving time) and returns the policy to quantize them with.
`search_policy` picks each weight's spec under a size budget from measured sensitivities.
"""

from jquant._src.ptq.gptq import LayerError, gptq_weight
from jquant._src.ptq.layerwise import Result, gptq
from jquant._src.ptq.rotating import Folded, fold_rotations
from jquant._src.ptq.scaling import awq, smoothquant
from jquant._src.ptq.search import SearchTable, relative_mse, search_policy

__all__ = ["gptq", "awq", "smoothquant", "Result", "LayerError", "gptq_weight", "search_policy", "SearchTable",
           "relative_mse", "fold_rotations", "Folded"]
