"""The examples run end to end (small settings) and print what they promise."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The byte-level LM of the char_lm examples at its smallest: one block, 5 training steps, 64-byte
# windows, 16 evaluation windows (the training-steps flag is added per example).
TINY_LM = ("--depth", "1", "--context", "64", "--eval-windows", "16")



def _run(script, *args):
    # checked for what they print, not timed: compiled at the suite's XLA level (tests/conftest.py)
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def lm_cache(tmp_path_factory):
    """One model cache for the char_lm tests: the first to run trains the tiny LM, the others load it."""
    return str(tmp_path_factory.mktemp("char_lm"))


def test_digits_qat_demo():
    # two of the demo's policies (integer W8A8, a microscaled weight-only one): every policy's Flax
    # QAT and serving has its own tests; this checks the demo around them
    out = _run("digits_qat.py", "--epochs", "1", "--timing-steps", "3", "--policies", "^(W8A8|NVFP4 .*)$")
    for text in ("Linen MLP", "Linen CNN", "NNX MLP", "W8A8", "NVFP4 weight-only", "PTQ acc"):
        assert text in out, text
    assert "W4 weight-only" not in out
    # the served Linen CNN's second conv (16 input features) runs int8 × int8 → int32
    assert "W8A8: 1 int8 × int8 → int32 convolution(s); served = QAT argmax 1.000" in out


def test_digits_lsq():
    out = _run("digits_lsq.py", "--epochs", "1", "--seeds", "1", "--configs", "W2A2")
    for text in ("| STE | LSQ | LSQ + PACT |", "W2A2", "float accuracy"):
        assert text in out, text


def test_schemes():
    out = _run("schemes.py", "--rows", "64", "--only",
               "^(int8 per-channel|nf4 group-64|mxfp4.*)$")
    for text in ("int8 per-channel", "nf4 group-64", "mxfp4 (blocks of 32)",
                 "digits acc"):
        assert text in out, text


def test_quantize_tree():
    out = _run("quantize_tree.py", "--depth", "1")
    assert "jquant report" in out and "argmax agreement" in out


def test_char_lm(lm_cache):
    out = _run("char_lm.py", *TINY_LM, "--steps", "5", "--calib-windows", "8", "--calib-batch", "8",
               "--cache", lm_cache, "--only", "^(int8 per-channel RTN|int4 g128 (GPTQ|AWQ))$")
    for text in ("| method | bits/weight", "float32", "int8 per-channel RTN", "int4 g128 GPTQ", "int4 g128 AWQ"):
        assert text in out, text


def test_char_lm_search(lm_cache):
    out = _run("char_lm_search.py", *TINY_LM, "--steps", "5", "--calib-windows", "32", "--budgets", "3.5",
               "--candidates", "int4 g128", "2-bit g128", "--cache", lm_cache)
    for text in ("| policy | bits/weight | eval perplexity", "uniform int4 g128", "searched ≤ 3.5 bits"):
        assert text in out, text


def test_char_lm_lsq(lm_cache):
    out = _run("char_lm_lsq.py", *TINY_LM, "--train-steps", "5", "--steps", "3", "--bits", "2", "--cache", lm_cache)
    for text in ("| weights (block kernels, g128) | bits/weight | PTQ (RTN) | STE QAT | LSQ |", "2-bit asymmetric"):
        assert text in out, text


def test_decode_lm(lm_cache):
    out = _run("decode_lm.py", *TINY_LM, "--width", "128", "--steps", "5", "--prompt", "16", "--rounds", "1",
               "--ppl-windows", "4", "--cache", lm_cache)
    gap = float(re.search(r"max \|cached decode - forward\| logits over the prompt: (\S+)", out).group(1))
    assert gap < 1e-4
    for text in ("| weights | weight MB |", "| float32 |", "| int8 |", "| int4 g128 |", "| W8A8 |"):
        assert text in out, text
    kv = out[out.index("| KV cache |"):]
    for name in ("float32", "int8", "fp8 e4m3"):
        assert f"| {name} | " in kv, name
    assert "| int8 | 0.017 | 0.266 |" in kv  # int8 entries and a float32 scale per token and head
