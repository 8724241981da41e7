"""The drop-in ops: QuantDot as a Flax `dot_general` and an einsum's `_dot_general`, its QAT
forward on the integer path (the served numbers, with the STE's derivatives), and the einsum
specification parser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import linen as nn

import jquant
from jquant import QuantDot, QuantSpec
from jquant._src.ops import einsum_dimension_numbers

from helpers import DN


@pytest.fixture
def integer_qat_at_any_size(monkeypatch):
    monkeypatch.setattr(jquant._src.ops, "INTEGER_QAT_MIN_MACS", 0)  # small shapes keep the tests fast


def _operands():
    return jax.random.normal(jax.random.key(0), (16, 64)), jax.random.normal(jax.random.key(1), (64, 24))


@pytest.mark.usefixtures("integer_qat_at_any_size")
@pytest.mark.parametrize("weight,act", [
    (QuantSpec(8, channel_axes=(1,)), QuantSpec(8)),
    (QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=16), QuantSpec(8, symmetric=False)),
])
def test_integer_qat_forward_is_the_served_computation(weight, act):
    x, w = _operands()
    op = QuantDot(weight, act)
    assert op._integer_forward(x, w, DN)
    qat = jax.jit(lambda x, w: op(x, w, DN))(x, w)
    # the weight quantized inside the served program, as QAT does: the QArray itself is the same
    # bits either way, but with a stored QArray XLA computes the accumulator's scale product
    # differently (int8 per-channel: Accumulator.scale differs, outputs by ~2e-6)
    served = jax.jit(lambda x, w: op(x, jquant.quantize(w, weight), DN))(x, w)
    np.testing.assert_array_equal(np.asarray(qat), np.asarray(served))
    assert "i32" in str(jax.make_jaxpr(lambda x, w: op(x, w, DN))(x, w))


@pytest.mark.usefixtures("integer_qat_at_any_size")
def test_integer_qat_derivatives_are_the_straight_through_ones():
    x, w = _operands()
    op = QuantDot(QuantSpec(8, channel_axes=(1,)), QuantSpec(8), act_scale=jnp.float32(0.01))  # clips |x| > 1.27
    g = jax.random.normal(jax.random.key(2), (16, 24))

    def integer(x, w):
        return op(x, w, DN)

    def float_ste(x, w):
        return op._fake_quant_dot(x, w, DN, None, None, op.act_scale, None)

    _, pull_int = jax.vjp(integer, x, w)
    _, pull_float = jax.vjp(float_ste, x, w)
    for a, b in zip(pull_int(g), pull_float(g)):  # the same linear map (the cotangent is fixed)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    dx = pull_int(g)[0]
    assert np.all(np.asarray(dx)[np.abs(np.asarray(x)) > 1.3] == 0)  # clipped activations: no gradient
    _, t_int = jax.jvp(integer, (x, w), (x, w))
    _, t_float = jax.jvp(float_ste, (x, w), (x, w))
    np.testing.assert_allclose(np.asarray(t_int), np.asarray(t_float), rtol=1e-5, atol=1e-5)


def test_small_dots_keep_the_float_ste_path(monkeypatch):
    x, w = _operands()
    op = QuantDot(QuantSpec(8, channel_axes=(1,)), QuantSpec(8))
    monkeypatch.setattr(jquant._src.ops, "INTEGER_QAT_MIN_MACS", 16 * 64 * 24 + 1)
    assert not op._integer_forward(x, w, DN)
    monkeypatch.setattr(jquant._src.ops, "INTEGER_QAT_MIN_MACS", 16 * 64 * 24)
    assert op._integer_forward(x, w, DN)


@pytest.mark.usefixtures("integer_qat_at_any_size")
def test_incompatible_operands_keep_the_float_ste_path():
    x, w = _operands()
    op = QuantDot(QuantSpec(8, channel_axes=(0,)), QuantSpec(8))  # weight scale varies along the contraction
    assert not op._integer_forward(x, w, DN)
    y = op(x, w, DN)
    expected = jquant.fake_quant(x, QuantSpec(8)) @ jquant.fake_quant(w, QuantSpec(8, channel_axes=(0,)))
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_quant_dot_as_dense_and_einsum_drop_in():
    x = jax.random.normal(jax.random.key(0), (4, 16))
    w = jax.random.normal(jax.random.key(1), (16, 8))
    op = QuantDot(weight=QuantSpec(4, channel_axes=(1,)), act=QuantSpec(8))
    expected = jquant.fake_quant(x, QuantSpec(8)) @ jquant.fake_quant(w, QuantSpec(4, channel_axes=(1,)))
    dense = nn.Dense(8, use_bias=False, dot_general=op)
    out = dense.apply({"params": {"kernel": w}}, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6, atol=1e-6)
    out = jnp.einsum("bi,io->bo", x, w, _dot_general=op)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6, atol=1e-6)
    served = op(x, jquant.quantize(w, op.weight), DN)
    np.testing.assert_allclose(np.asarray(served), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_einsum_dimension_numbers():
    dn, order = einsum_dimension_numbers("bsi,hio->bhso")
    assert dn == (((2,), (1,)), ((), ()))
    assert order == (0, 2, 1, 3)  # produced (b, s, h, o) → (b, h, s, o)
    for bad in ("bi,io", "...i,io->...o", "bii,io->bo", "bi,io,oc->bc", "bij,io->bo"):
        with pytest.raises(ValueError, match="einsum"):
            einsum_dimension_numbers(bad)
