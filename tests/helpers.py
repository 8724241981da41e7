"""Helpers shared by the test modules (numeric references live in tests/reference.py, hypothesis
profiles in tests/conftest.py):

* data: `normal` (seeded), `correlated_batches` (GPTQ calibration), `outlier_batches` (AWQ);
* compiled quantization: `jit_quantize`, `quantize_jit` (QArray, q, x̂ in one program) — one
  compilation per shape instead of one per eager op;
* `assert_same_bits` for pytrees (QArrays included); `int8_convs` counts integer convolutions;
* models: Linen `Mlp`, `NnxMlp`, the plain functions `tanh_mlp` and `transformer_block`;
* hypothesis: `COMPILING` settings, `uniform_specs`, `fixed_ranges`, `per_element`.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jquant
from jquant import QuantSpec

import reference

DN = (((1,), (0,)), ((), ()))  # (M, K) × (K, N): contract lhs axis 1 with rhs axis 0

# For hypothesis tests whose every example compiles a new program (a new shape): a third of the
# profile's count (tests/conftest.py).
COMPILING = settings(max_examples=max(8, settings.default.max_examples // 3))


def normal(seed: int, shape, dtype=jnp.float32, scale: float = 1.0) -> jax.Array:
    """Seeded standard-normal data (NumPy's generator, so the values are fixed across JAX
    versions), times `scale`, as a JAX array of `dtype` (rounded once from float64)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, dtype)


def correlated_batches(seed: int, n: int, rows: int, dim: int):
    """`n` calibration batches `(x,)` of `rows` × `dim` inputs whose channels are correlated (one
    fixed mixing matrix), the input statistics GPTQ exploits."""
    mix = normal(seed, (dim, dim))
    return [(normal(seed + 1 + i, (rows, dim)) @ mix,) for i in range(n)]


jit_quantize = jax.jit(jquant.quantize, static_argnums=1)  # one compilation cache for every test module


@functools.partial(jax.jit, static_argnums=1)
def quantize_jit(x, spec, scale=None, zero_point=None):
    """`(qa, qa.q, qa.dequantize())` in one compiled program: one compilation per new shape is far
    cheaper than compiling each eager op for it, which matters with hypothesis' many shapes."""
    qa = jquant.quantize(x, spec, scale=scale, zero_point=zero_point)
    return qa, qa.q, qa.dequantize()


def int8_convs(jaxpr) -> int:
    """How many int8 × int8 convolutions a (closed) jaxpr runs, nested jaxprs (jit) included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "conv_general_dilated" and all(v.aval.dtype == jnp.int8 for v in eqn.invars)
        count += sum(int8_convs(p) for p in eqn.params.values() if hasattr(p, "eqns") or hasattr(p, "jaxpr"))
    return count


def assert_same_bits(a, b, what: str = ""):
    """Two pytrees (QArrays included) have the same structure and bit-identical leaves: same dtype,
    shape and bytes (so -0.0 ≠ 0.0 and NaN payloads count)."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b), what
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        u, v = np.asarray(u), np.asarray(v)
        assert u.dtype == v.dtype and u.shape == v.shape, what
        assert u.tobytes() == v.tobytes(), f"{what}: {u.ravel()[:4]} vs {v.ravel()[:4]}"


# --- small models: Linen, NNX, a plain function --------------------------------------------

class Mlp(nn.Module):
    """Linen Dense(hidden) → activation → Dense(outputs); params Dense_0, Dense_1."""
    hidden: int = 128
    outputs: int = 10
    activation: Callable = nn.relu

    @nn.compact
    def __call__(self, x):
        hidden = self.activation(nn.Dense(self.hidden)(x))  # created first: Dense_0
        return nn.Dense(self.outputs)(hidden)


class NnxMlp(nnx.Module):
    """NNX Linear(din, hidden) → relu → Linear(hidden, dout); layers `hidden` and `out`."""

    def __init__(self, din: int, hidden: int, dout: int, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(din, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def tanh_mlp(p, x):
    """A plain-function model for the PTQ tests: tanh(x @ w1) @ w2."""
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def tanh_mlp_params(seed: int):
    """Seeded params of `tanh_mlp`: w1 (16, 16), w2 (16, 8)."""
    return {"w1": normal(seed, (16, 16), scale=0.3), "w2": normal(seed + 1, (16, 8), scale=0.3)}


# --- hypothesis strategies --------------------------------------------------------------------

@st.composite
def uniform_specs(draw, shape, midrise=True):
    """A uniform spec that fits `shape`: per-tensor, per-channel (first or last axis) or per-group
    (channels on the first axis, groups along the last)."""
    bits = draw(st.integers(2, 8))
    kind = draw(st.sampled_from(["symmetric", "asymmetric"] + (["midrise"] if midrise else [])))
    kw = dict(bits=bits, symmetric=kind != "asymmetric", midrise=kind == "midrise")
    granularity = draw(st.sampled_from(["tensor", "channel", "group"])) if len(shape) > 1 else "tensor"
    if granularity == "channel":
        kw["channel_axes"] = (draw(st.sampled_from([0, len(shape) - 1])),)
    elif granularity == "group":
        kw.update(channel_axes=(0,), group_size=draw(st.sampled_from([1, 2, shape[-1]])), group_axis=-1)
    return QuantSpec(**kw)


@st.composite
def fixed_ranges(draw, shape, spec):
    """A fixed scale (scale-shaped, in [1e-3, 10]) and zero-point for `spec` on `shape`."""
    scale_shape = reference.scale_shape(shape, spec)
    scale = draw(hnp.arrays(np.float32, scale_shape, elements=st.floats(float(np.float32(1e-3)), 10.0, width=32)))
    zero_point = None
    if not spec.symmetric:
        zero_point = draw(hnp.arrays(np.int8, scale_shape, elements=st.integers(spec.qmin, spec.qmax)))
    return scale, zero_point


def per_element(scale, zero_point, shape, spec):
    """A fixed scale and zero-point (scale-shaped, or None) as float64 values per element of `shape`."""
    s = reference.expand(np.asarray(scale, np.float64), shape, spec)
    z = 0.0 if zero_point is None else reference.expand(np.asarray(zero_point, np.float64), shape, spec)
    return s, z


# --- a functional pre-norm transformer block (the PTQ scaling and folding tests) --------------

WIDTH = 32


def layer_norm(x, p):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.var(x, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def transformer_block(p, x):
    """LayerNorm → q, k, v → attention → o; LayerNorm → up (+ bias) → gelu → down; both residual."""
    h = layer_norm(x, p["ln1"])
    q, k, v = h @ p["q"]["kernel"], h @ p["k"]["kernel"], h @ p["v"]["kernel"]
    x = x + jax.nn.softmax(q @ k.T / np.sqrt(WIDTH)) @ v @ p["o"]["kernel"]
    h = layer_norm(x, p["ln2"])
    u = jax.nn.gelu(h @ p["up"]["kernel"] + p["up"]["bias"])
    return x + u @ p["down"]["kernel"]


def block_params(seed: int):
    """Seeded params of `transformer_block` (norm scales away from 1, so folding them matters)."""
    rng = np.random.default_rng(seed)
    d = WIDTH

    def w(*shape):
        return jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32)

    return {"ln1": {"scale": jnp.asarray(1 + 3 * rng.random(d), jnp.float32), "bias": w(d)},
            "ln2": {"scale": jnp.asarray(1 + rng.random(d), jnp.float32), "bias": w(d)},
            "q": {"kernel": w(d, d)}, "k": {"kernel": w(d, d)}, "v": {"kernel": w(d, d)}, "o": {"kernel": w(d, d)},
            "up": {"kernel": w(d, 4 * d), "bias": w(4 * d)}, "down": {"kernel": w(4 * d, d)}}


def outlier_batches(seed: int, n: int, rows: int = 32):
    """`n` batches `(x,)` of block inputs with activation outliers in a few channels, as in real
    transformers."""
    rng = np.random.default_rng(seed)
    channel_scale = np.ones(WIDTH)
    channel_scale[:3] = 20.0
    return [(jnp.asarray(rng.standard_normal((rows, WIDTH)) * channel_scale, jnp.float32),) for _ in range(n)]
