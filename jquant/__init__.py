"""jquant: functional quantization transforms for JAX.

Public namespaces: `jquant` (specs, formats, QArray, fake quantization, the integer dot and
convolution, quantized ops, policies and the transforms over parameter trees, reports,
checkpoints),
`jquant.ptq` (GPTQ, AWQ, SmoothQuant, mixed-precision search on any JAX function),
`jquant.learned` (LSQ steps, PACT clips) and `jquant.flax` (Linen and NNX). The subpackages are
imported on first use, so `import jquant` does not import Flax.

The implementation lives in `jquant._src` (private); its layers, each importing only those
before it: calibration → numerics → rotation, equalization → formats (one module per format family) → spec → packing →
qarray → ste, dot → conv → ops → tree (paths, the one walk over a tree by policy) → policy →
transforms, report, kvcache (a quantized KV cache: qarray and spec only), checkpoint (on Orbax;
spec_json, checkpoint_v1), safetensors_io →
learned, lora, ptq; `jquant.flax` sits on top and is the only place
that knows Flax.
"""

import importlib

from jquant._src.calibration import HQQ, MSE, MinMax, Percentile
from jquant._src.formats import FP8E4M3, FP8E5M2, MXFP4, MXFP8, NF4, NVFP4, Format, KMeans, Sign, Uniform
from jquant._src.equalization import Equalize
from jquant._src.rotation import Hadamard
from jquant._src.spec import QuantSpec
from jquant._src.qarray import QArray, dequantize, quantize
from jquant._src.ste import fake_quant, ste_round
from jquant._src.dot import Accumulator, dot_general, int_dot_general, requantize
from jquant._src.conv import conv_general_dilated, int_conv_general_dilated
from jquant._src.ops import QuantConv, QuantDot, QuantEinsum
from jquant._src.policy import LoRA, Policy, Rule, fp8_w8a8, int4_weights, int8_weights, w8a8
from jquant._src.transforms import checked, dequantize_params, fake_quant_params, quantize_params
from jquant._src.report import Report, report
from jquant._src.lora import merge
from jquant._src.kvcache import KV_INT8, KVCache, kv_cache
from jquant._src.checkpoint import QuantRestore, QuantSave, load, save
from jquant._src.safetensors_io import export_safetensors, import_safetensors

_SUBPACKAGES = ("flax", "learned", "ptq")

__all__ = [
    "QuantSpec", "Format", "Uniform", "Sign", "KMeans", "NF4", "FP8E4M3", "FP8E5M2", "MXFP8", "MXFP4", "NVFP4",
    "MinMax", "Percentile", "MSE", "HQQ", "Hadamard", "Equalize", "QArray", "quantize",
    "dequantize", "fake_quant", "ste_round", "Accumulator", "dot_general", "int_dot_general", "requantize",
    "conv_general_dilated", "int_conv_general_dilated", "QuantDot", "QuantEinsum", "QuantConv", "Rule", "Policy",
    "LoRA", "int8_weights", "int4_weights", "w8a8", "fp8_w8a8",
    "quantize_params", "dequantize_params", "fake_quant_params", "merge", "checked", "report", "Report", "save", "load",
    "QuantSave", "QuantRestore", "export_safetensors", "import_safetensors",
    "KVCache", "kv_cache", "KV_INT8",
    *_SUBPACKAGES,
]


def __getattr__(name):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"jquant.{name}")
    raise AttributeError(f"module 'jquant' has no attribute {name!r}")
