"""The public surface: a small top level, three namespaces imported on first use, Flax only when
`jquant.flax` is used."""

import subprocess
import sys

import jquant


def test_import_jquant_does_not_import_flax_and_namespaces_load_on_first_use():
    program = (
        "import sys, jquant\n"
        "assert not any(m == 'flax' or m.startswith('flax.') for m in sys.modules), 'flax imported'\n"
        "assert callable(jquant.ptq.gptq) and callable(jquant.learned.init)\n"
        "assert not any(m == 'flax' or m.startswith('flax.') for m in sys.modules), 'flax imported by ptq/learned'\n"
        "assert callable(jquant.flax.quantize) and 'flax.linen' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_top_level_names():
    assert sorted(jquant.__all__) == sorted([
        "QuantSpec", "Format", "Uniform", "Sign", "KMeans", "NF4", "FP8E4M3", "FP8E5M2", "MXFP8", "MXFP4", "NVFP4",
        "MinMax", "Percentile", "MSE", "HQQ", "Hadamard", "Equalize", "QArray",
        "quantize", "dequantize", "fake_quant", "ste_round", "Accumulator", "dot_general", "int_dot_general",
        "conv_general_dilated", "int_conv_general_dilated",
        "requantize", "QuantDot", "QuantEinsum", "QuantConv", "Rule", "Policy", "LoRA", "merge", "int8_weights", "int4_weights",
        "w8a8", "fp8_w8a8", "quantize_params", "dequantize_params", "fake_quant_params", "checked", "report",
        "Report", "save",
        "load", "QuantSave", "QuantRestore", "export_safetensors", "import_safetensors", "KVCache", "kv_cache", "KV_INT8",
        "flax", "learned", "ptq"])
    for name in jquant.__all__:
        assert getattr(jquant, name) is not None
    for namespace in (jquant.ptq, jquant.learned, jquant.flax):
        for name in namespace.__all__:
            assert getattr(namespace, name) is not None, (namespace.__name__, name)
