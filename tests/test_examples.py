"""The examples run end to end (small settings) and print what they promise."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script, *args):
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_digits_qat_demo():
    out = _run("digits_qat.py", "--epochs", "2")
    for text in ("Linen MLP", "Linen CNN", "NNX MLP", "W8A8", "W4 weight-only", "W2A8", "W1A8 (sign)", "PTQ acc"):
        assert text in out, text


def test_digits_lsq():
    out = _run("digits_lsq.py", "--epochs", "1", "--seeds", "1")
    for text in ("| STE | LSQ | LSQ + PACT |", "W2A8 ternary", "W2A2", "float accuracy"):
        assert text in out, text


def test_schemes():
    out = _run("schemes.py", "--rows", "256")
    for text in ("int8 per-channel", "nf4 group-64", "2-bit k-means per-channel", "digits acc"):
        assert text in out, text


def test_quantize_tree():
    out = _run("quantize_tree.py")
    assert "jquant report" in out and "argmax agreement" in out


def test_char_lm(tmp_path):
    out = _run("char_lm.py", "--depth", "1", "--steps", "5", "--batch", "8", "--eval-windows", "16",
               "--calib-windows", "8", "--calib-batch", "8", "--cache", str(tmp_path),
               "--only", "int8|int4 g128 (GPTQ|AWQ)|2-bit")
    for text in ("| method | bits/weight", "float32", "int8 per-channel RTN", "int4 g128 GPTQ", "int4 g128 AWQ",
                 "2-bit k-means per-channel"):
        assert text in out, text


def test_char_lm_search(tmp_path):
    out = _run("char_lm_search.py", "--depth", "1", "--steps", "5", "--eval-windows", "16", "--calib-windows", "32",
               "--budgets", "3.5", "--cache", str(tmp_path))
    for text in ("| policy | bits/weight | eval perplexity", "uniform int4 g128", "searched ≤ 3.5 bits"):
        assert text in out, text


def test_char_lm_lsq(tmp_path):
    out = _run("char_lm_lsq.py", "--depth", "1", "--train-steps", "5", "--steps", "3", "--bits", "2",
               "--eval-windows", "16", "--cache", str(tmp_path))
    for text in ("| weights (block kernels, g128) | bits/weight | PTQ (RTN) | STE QAT | LSQ |", "2-bit asymmetric"):
        assert text in out, text
