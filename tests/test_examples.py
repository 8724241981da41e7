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
