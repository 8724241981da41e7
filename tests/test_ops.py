"""QuantDot's QAT forward on the integer path: the served numbers, with the STE's derivatives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import QuantDot, QuantSpec

DN = (((1,), (0,)), ((), ()))


@pytest.fixture(autouse=True)
def _integer_qat_at_any_size(monkeypatch):
    monkeypatch.setattr(jquant._src.ops, "INTEGER_QAT_MIN_MACS", 0)  # small shapes keep the tests fast


def _operands():
    return jax.random.normal(jax.random.key(0), (16, 64)), jax.random.normal(jax.random.key(1), (64, 24))


@pytest.mark.parametrize("weight,act", [
    (QuantSpec(8, channel_axes=(1,)), QuantSpec(8)),
    (QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=16), QuantSpec(8, symmetric=False)),
])
def test_integer_qat_forward_is_the_served_computation(weight, act):
    x, w = _operands()
    op = QuantDot(weight, act)
    assert op._integer_forward(x, w, DN)
    qat = jax.jit(lambda x, w: op(x, w, DN))(x, w)
    # quantized in the same kind of program (eager and jitted scales may differ by 1 ulp: XLA
    # rewrites division by a constant)
    served = jax.jit(lambda x, w: op(x, jquant.quantize(w, weight), DN))(x, w)
    np.testing.assert_array_equal(np.asarray(qat), np.asarray(served))
    assert "i32" in str(jax.make_jaxpr(lambda x, w: op(x, w, DN))(x, w))


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


def test_incompatible_operands_keep_the_float_ste_path():
    x, w = _operands()
    op = QuantDot(QuantSpec(8, channel_axes=(0,)), QuantSpec(8))  # weight scale varies along the contraction
    assert not op._integer_forward(x, w, DN)
    y = op(x, w, DN)
    expected = jquant.fake_quant(x, QuantSpec(8)) @ jquant.fake_quant(w, QuantSpec(8, channel_axes=(0,)))
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-6, atol=1e-6)
