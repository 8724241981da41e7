"""jquant: functional quantization transforms for JAX.

Layers, each importing only the ones above it: `calibration` (range methods) → `spec`
(QuantSpec) → `numerics` (formulas) → `packing`, `codebook` → `qarray` (QArray, quantize) →
`ste` (fake_quant), `dot` (integer dot_general) → `ops` (QuantDot/QuantEinsum/QuantConv) →
`policy`, `transforms`, `report`, `checkpoint`, `search` (mixed precision), `learned` (LSQ /
PACT) → `flax` (Linen and NNX integration), `ptq` (GPTQ / AWQ / SmoothQuant on any function;
import `jquant.ptq`).
"""

from jquant.calibration import MSE, MinMax, Percentile
from jquant.spec import QuantSpec
from jquant.qarray import QArray, dequantize, quantize
from jquant.ste import fake_quant, ste_round
from jquant.dot import Accumulator, dot_general, int_dot_general, requantize
from jquant.ops import QuantConv, QuantDot, QuantEinsum
from jquant.policy import Policy, Rule, int4_weights, int8_weights, w8a8
from jquant.transforms import checked, dequantize_params, fake_quant_params, quantize_params
from jquant.report import Report, report
from jquant.checkpoint import load, save
from jquant.search import search_policy
from jquant.learned import init_learned, lsq_fake_quant, pact
from jquant import learned
from jquant import flax

__all__ = [
    "QuantSpec", "MinMax", "Percentile", "MSE", "QArray", "quantize", "dequantize", "fake_quant", "ste_round",
    "Accumulator", "dot_general", "int_dot_general", "requantize", "QuantDot", "QuantEinsum", "QuantConv", "Rule",
    "Policy", "int8_weights", "int4_weights", "w8a8", "quantize_params", "dequantize_params", "fake_quant_params",
    "checked", "report", "Report", "save", "load", "search_policy", "flax", "learned", "lsq_fake_quant", "pact",
    "init_learned",
]
