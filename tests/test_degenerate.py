"""Degenerate data through every method and granularity: all-zero, constant, tiny, subnormal, huge
and float-max values, bf16/f16 inputs, size-0 and 0-d arrays, single-element groups.

Promised for all of them: no NaN or Inf in x̂, in fake_quant or in its gradient; x̂, fake_quant and
the gradient come back in the input's dtype and shape; fake_quant's forward equals
quantize→dequantize bit for bit; an all-zero group dequantizes to exact zeros, and so does every
0.0 on a grid that holds 0 (uniform mid-tread and NF4 — not sign, mid-rise or k-means, whose levels
need not include 0). XLA:CPU flushes subnormals to zero, so subnormal input behaves like zeros.

Each (method, granularity, dtype) is one compiled program run on a batch of data kinds (`vmap`
over the kinds), which keeps the whole grid to a few dozen compilations.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import QuantSpec

import reference
from reference import as_f64

METHODS = {
    "int8": dict(bits=8),
    "int4_asym": dict(bits=4, symmetric=False),
    "int3_asym": dict(bits=3, symmetric=False),
    "int2_midrise": dict(bits=2, midrise=True),
    "sign": dict(bits=1, method="sign"),
    "kmeans2": dict(bits=2, method="kmeans"),
    "nf4": dict(bits=4, method="nf4"),
}
ZERO_ON_GRID = {"int8", "int4_asym", "int3_asym", "nf4"}
GRANULARITIES = {
    "tensor": dict(),
    "channel": dict(channel_axes=(0,)),
    "group": dict(channel_axes=(0,), group_size=2),
    "group1": dict(group_size=1),  # every element its own group
}
KINDS = ("zeros", "constant", "negative_constant", "one_zero", "tiny", "subnormal", "huge", "float_max", "mixed")
SHAPE = (4, 6)


def _kinds(dtype, shape=SHAPE):
    """(len(KINDS), *shape) float32 data, exactly representable in `dtype`."""
    info = jnp.finfo(dtype)
    big, tiny = float(info.max), float(info.tiny)
    rng = np.random.default_rng(0)
    normal = rng.standard_normal(shape)
    signs = np.where(rng.standard_normal(shape) < 0, -1.0, 1.0)
    data = {
        "zeros": np.zeros(shape),
        "constant": np.full(shape, 0.3),
        "negative_constant": np.full(shape, -7.0),
        "one_zero": np.where(np.arange(np.prod(shape)).reshape(shape) == 5, 0.0, 1.0),
        "tiny": np.where(normal > 1.0, 0.0, signs * tiny * rng.integers(1, 5, shape)),
        "subnormal": signs * tiny / 8,
        "huge": np.clip(normal, -1, 1) * big,
        "float_max": signs * big,
        "mixed": np.where(np.abs(normal) < 0.3, 0.0, normal),
    }
    if normal.size > 2:
        data["mixed"].flat[1] = big
        data["mixed"].flat[2] = -big
    stacked = np.stack([data[k] for k in KINDS])
    return jnp.asarray(stacked.astype(np.float32 if dtype != jnp.float64 else np.float64)).astype(dtype)


def _outputs(x, spec):
    """x̂, fake_quant(x) and d/dx Σ fake_quant(x) for one tensor."""
    x_hat = jquant.quantize(x, spec).dequantize()
    fq, grad = jax.value_and_grad(lambda v: jnp.sum(jquant.fake_quant(v, spec).astype(jnp.float32)))(x)
    return x_hat, jquant.fake_quant(x, spec), grad


@functools.partial(jax.jit, static_argnums=1)
def _batched(xs, spec):
    return jax.vmap(lambda x: _outputs(x, spec))(xs)


def _check(x, spec, method, outputs):
    """The promises of the module docstring for input `x` (float) and its outputs."""
    x_hat, fq, grad = outputs
    xf = as_f64(x)
    for name, out in (("x_hat", x_hat), ("fake_quant", fq), ("gradient", grad)):
        assert out.dtype == x.dtype and out.shape == x.shape, name
        assert np.all(np.isfinite(as_f64(out))), f"{name} has NaN/Inf: {as_f64(out)}"
    np.testing.assert_array_equal(as_f64(fq), as_f64(x_hat), err_msg="fake_quant forward != quantize→dequantize")
    x_hat = as_f64(x_hat)
    # all-zero groups (zeros after XLA:CPU flushes subnormals) → exact zeros, for every method
    flushed = np.where(np.abs(xf) < float(jnp.finfo(jnp.float32).tiny), 0.0, xf)
    ids = reference.group_ids(x.shape, spec)
    for g in np.unique(ids):
        if np.all(flushed[ids == g] == 0):
            assert np.all(x_hat[ids == g] == 0), f"all-zero group {g} dequantizes to {x_hat[ids == g]}"
    if method in ZERO_ON_GRID:
        assert np.all(x_hat[xf == 0] == 0), f"0.0 became {x_hat[xf == 0]}"


CASES = [(m, g, "float32") for m in METHODS for g in GRANULARITIES]
CASES += [(m, "channel", d) for m in METHODS for d in ("bfloat16", "float16")]


def _check_every_kind(xs, spec, method, label=""):
    """`_check` on each of `_kinds`' tensors `xs`, run batched; a failure names the kind."""
    outputs = _batched(xs, spec)
    for i, kind in enumerate(KINDS):
        try:
            _check(xs[i], spec, method, [o[i] for o in outputs])
        except AssertionError as err:
            raise AssertionError(f"{label}{kind}: {err}") from None


@pytest.mark.parametrize("method, granularity, dtype", CASES)
def test_degenerate_data(method, granularity, dtype):
    spec = QuantSpec(**METHODS[method], **GRANULARITIES[granularity])
    _check_every_kind(_kinds(jnp.dtype(dtype)), spec, method)


SIZE_ZERO = [  # (shape, granularity, dtype): empty along a channel, a shared and a grouped axis
    ((0,), dict(), jnp.float32), ((4, 0), dict(channel_axes=(0,)), jnp.bfloat16),
    ((0, 4), dict(channel_axes=(1,)), jnp.float16), ((2, 0, 3), dict(channel_axes=(0,), group_size=3), jnp.float32),
    ((4, 0), dict(group_size=2, group_axis=1), jnp.float32),
]


@pytest.mark.parametrize("method", list(METHODS))
def test_size_zero_arrays(method):
    for shape, granularity, dtype in SIZE_ZERO:
        spec = QuantSpec(**METHODS[method], **granularity)
        x = jnp.zeros(shape, dtype)
        qa, (x_hat, fq, grad) = _size_zero(x, spec)
        assert qa.shape == shape and qa.dtype == dtype
        for out in (x_hat, fq, grad):
            assert out.shape == shape and out.dtype == dtype


@functools.partial(jax.jit, static_argnums=1)
def _size_zero(x, spec):
    return jquant.quantize(x, spec), _outputs(x, spec)


@pytest.mark.parametrize("method", list(METHODS))
def test_zero_dimensional_arrays(method):
    spec = QuantSpec(**METHODS[method])
    for dtype in ("float32", "float16"):  # bf16: in the grid above
        xs = _kinds(jnp.dtype(dtype), shape=())
        _check_every_kind(xs, spec, method, label=f"{dtype} ")
        eager = jquant.quantize(xs[3], spec)  # 1.0: the unbatched path, packed storage of one code
        assert eager.shape == () and eager.dequantize().shape == ()


@pytest.mark.parametrize("spec", [
    QuantSpec(8), QuantSpec(2), QuantSpec(4, symmetric=False, channel_axes=(0,)), QuantSpec(1, method="sign"),
    QuantSpec(2, method="kmeans", channel_axes=(0,)), QuantSpec(4, method="nf4", group_size=4)], ids=repr)
def test_constant_groups_are_reproduced(spec):
    # a group of equal values lands on a grid point (|x| = absmax is ±Qmax·s, up to the rounding of
    # s and of s·Qmax), at every magnitude — 2-bit scales near the float max included, whose
    # reciprocal would be subnormal
    values = jnp.asarray([0.3, -7.0, 1e-30, 3e38, -3.4e38], jnp.float32)
    x_hat = _dequantized(jnp.broadcast_to(values[:, None, None], (5, 3, 8)), spec)
    np.testing.assert_allclose(np.asarray(x_hat), np.broadcast_to(values[:, None, None], (5, 3, 8)), rtol=3e-7)


@functools.partial(jax.jit, static_argnums=1)
def _dequantized(xs, spec):
    return jax.vmap(lambda x: jquant.quantize(x, spec).dequantize())(xs)


@jax.jit
def _degenerate_dots(w):
    dn = (((1,), (0,)), ((), ()))
    wq = jquant.quantize(w, QuantSpec(4, channel_axes=(1,)))
    zeros = jquant.dot_general(jnp.zeros((3, 16)), wq, dn, lhs_spec=QuantSpec(8, symmetric=False))
    tiny = jquant.dot_general(jnp.full((3, 16), 1e-30), wq, dn, lhs_spec=QuantSpec(8))
    empty = jquant.dot_general(jnp.zeros((3, 0)), jnp.zeros((0, 4)), dn, lhs_spec=QuantSpec(8), rhs_spec=QuantSpec(8))
    return zeros, tiny, empty


def test_integer_dot_of_degenerate_operands():
    zeros, tiny, empty = _degenerate_dots(jax.random.normal(jax.random.key(0), (16, 4)))
    np.testing.assert_array_equal(np.asarray(zeros), 0.0)
    assert np.all(np.isfinite(np.asarray(tiny))) and np.all(np.asarray(tiny) != 0)
    assert empty.shape == (3, 4) and np.all(np.asarray(empty) == 0)
