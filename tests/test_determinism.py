"""Determinism: the same input gives the same bits eagerly and under jit, run after run, process
after process, with and without LLVM's optimisation passes (the suite compiles without them,
tests/conftest.py; the second process with them).

What is guaranteed (README "Guarantees"): for the MinMax calibration (the default) and every
method — uniform mid-tread and mid-rise, sign, k-means, NF4 — `quantize` gives bit-identical
storage, scales and zero-points eagerly, under `jit`, inside a larger `jit` and through
`quantize_params`; `fake_quant` and `dequantize` likewise. XLA would otherwise make them differ:
under jit it rewrites some divisions into multiplications by a rounded reciprocal and contracts
multiply-adds into FMAs, eagerly it does neither; jquant's formulas are written so that neither
rewrite changes a bit (`jquant.numerics`). Not guaranteed: `Percentile` and `MSE` calibration,
whose range may differ in the last bit between eager and jit (and with it q, near a tie).
"""

import functools
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jquant
from jquant import Policy, QuantSpec, Rule

from conftest import UNOPTIMISED
from helpers import assert_same_bits, jit_quantize

SPECS = [
    QuantSpec(8), QuantSpec(8, symmetric=False), QuantSpec(4, channel_axes=(1,)),
    QuantSpec(3, symmetric=False, channel_axes=(0,)), QuantSpec(5, channel_axes=(0,), group_size=6),
    QuantSpec(2, midrise=True, channel_axes=(1,)), QuantSpec(1, method="sign"),
    QuantSpec(1, method="sign", channel_axes=(1,)), QuantSpec(1, method="sign", group_size=6),
    QuantSpec(4, method="nf4", group_size=6), QuantSpec(2, method="kmeans", channel_axes=(0,)),
]
_fake_quant_jit = jax.jit(jquant.fake_quant, static_argnums=1)


@functools.partial(jax.jit, static_argnums=1)
def _inside_a_larger_program(x, spec):
    # the quantizer fused with work before and after it
    qa = jquant.quantize(jnp.tanh(x) * 0 + x, spec)
    return qa, qa.dequantize() * 1.0


MAGNITUDES = st.sampled_from([1e-6, 1e-2, 1.0, 37.0, 1e4, 1e30])


@given(st.sampled_from(SPECS), st.sampled_from(["float32", "bfloat16"]), MAGNITUDES, st.data())
def test_eager_and_jit_give_the_same_bits(spec, dtype, magnitude, data):
    x = data.draw(hnp.arrays(np.float32, (6, 12), elements=st.floats(-1, 1, width=32)))
    x = jnp.asarray(x * np.float32(magnitude), dtype)
    eager = jquant.quantize(x, spec)
    assert_same_bits(eager, jit_quantize(x, spec), "quantize under jit")
    qa, x_hat = _inside_a_larger_program(x, spec)
    assert_same_bits(eager, qa, "quantize inside a larger jit")
    assert_same_bits(eager.dequantize(), x_hat, "dequantize")
    assert_same_bits(jquant.fake_quant(x, spec), _fake_quant_jit(x, spec), "fake_quant")
    # (fake_quant = quantize→dequantize bit for bit: tests/test_ste.py)


def test_quantize_params_eager_equals_jit_equals_quantize():
    rng = np.random.default_rng(0)
    params = {f"layer{i}": {"kernel": jnp.asarray(rng.standard_normal((6, 12)) * 10.0 ** (i - 3), jnp.float32)}
              for i in range(len(SPECS))}
    policy = Policy([Rule(f"layer{i}/kernel", spec) for i, spec in enumerate(SPECS)])
    eager = jquant.quantize_params(params, policy)
    assert_same_bits(eager, jax.jit(jquant.quantize_params, static_argnums=1)(params, policy), "quantize_params jit")
    for i, spec in enumerate(SPECS):
        assert_same_bits(eager[f"layer{i}"]["kernel"], jquant.quantize(params[f"layer{i}"]["kernel"], spec), repr(spec))


def _digest() -> str:
    """sha256 over the storage, scales and zero-points of every spec on fixed data, and a 1024-deep
    layer's integer dot (int32) and weight-only dots (int8 and int4 g128: the chunked path)."""
    rng = np.random.default_rng(7)  # NumPy's: jax.random's normals may differ in the last bit between XLA levels
    x = jnp.asarray(rng.standard_normal((24, 36)) * 3, jnp.float32)
    h = hashlib.sha256()
    for spec in SPECS:
        for leaf in jax.tree_util.tree_leaves(jit_quantize(x, spec)):  # eager = jit is tested above
            h.update(np.asarray(leaf).tobytes())
    w = jnp.asarray(rng.standard_normal((1024, 128)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((3, 1024)), jnp.float32)
    dims = (((1,), (0,)), ((), ()))
    w8 = jit_quantize(w, QuantSpec(8, channel_axes=(1,)))
    h.update(np.asarray(jquant.int_dot_general(jit_quantize(a, QuantSpec(8, symmetric=False)), w8, dims).value).tobytes())
    for qw in (w8, jit_quantize(w, QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=128))):
        h.update(np.asarray(jax.jit(jquant.dot_general, static_argnums=2)(a, qw, dims)).tobytes())
    return h.hexdigest()


def test_same_bits_across_runs_and_processes():
    # the other process compiles at XLA's default optimisation level (this one: tests/conftest.py)
    here = _digest()
    assert _digest() == here
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "import test_determinism as t; print(t._digest())")
    env = dict(os.environ, XLA_FLAGS=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f != UNOPTIMISED))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in env.items() if k != "XLA_FLAGS" or v})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == here
