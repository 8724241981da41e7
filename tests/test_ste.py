"""ste_round and fake_quant: forward values, straight-through gradients, clip masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jquant
from jquant import QuantSpec, fake_quant, ste_round

import reference

SPECS = [
    QuantSpec(8),
    QuantSpec(8, symmetric=False),
    QuantSpec(4, channel_axes=(1,)),
    QuantSpec(2, symmetric=False, channel_axes=(0,)),
    QuantSpec(3, channel_axes=(0,), group_size=4),
    QuantSpec(5, symmetric=False, group_size=8, group_axis=1),
    QuantSpec(1, method="sign"),
    QuantSpec(1, method="sign", channel_axes=(1,)),
]
IDS = [repr(s) for s in SPECS]


def _x(shape=(6, 16), dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _grad_of_sum(f, x):
    return np.asarray(jax.grad(lambda v: jnp.sum(f(v).astype(jnp.float32)))(x).astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# ste_round


def test_ste_round_forward_is_round_half_to_even():
    x = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, -0.4999, 0.5001, 7.2, -7.7], np.float32)
    out = np.asarray(ste_round(jnp.asarray(x)))
    np.testing.assert_array_equal(out, reference.round_half_even(x.astype(np.float64)))
    ties = out[:7]
    assert np.all(ties % 2 == 0)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=2, max_side=5),
                  elements=st.floats(-1e6, 1e6, width=32)))
def test_ste_round_forward_and_grad(x):
    out, grad = _ste_round_value_and_grad(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(out), reference.round_half_even(x.astype(np.float64)))
    np.testing.assert_array_equal(np.asarray(grad), np.ones_like(x))


@jax.jit
def _ste_round_value_and_grad(x):
    return ste_round(x), jax.grad(lambda v: jnp.sum(ste_round(v)))(x)


def test_ste_round_grad_and_jvp():
    x = jnp.asarray([-1.5, -0.3, 0.5, 2.7], jnp.float32)
    assert float(jax.grad(ste_round)(0.3)) == 1.0
    cotangent = jnp.asarray([1.0, -2.0, 3.0, 0.5])
    grad = jax.grad(lambda v: jnp.sum(cotangent * ste_round(v)))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(cotangent))
    tangent = jnp.asarray([0.1, 0.2, -0.3, 4.0])
    primal, out_tangent = jax.jvp(ste_round, (x,), (tangent,))
    np.testing.assert_array_equal(np.asarray(primal), [-2.0, -0.0, 0.0, 3.0])
    np.testing.assert_array_equal(np.asarray(out_tangent), np.asarray(tangent))
    np.testing.assert_array_equal(np.asarray(jax.jacfwd(ste_round)(x)), np.eye(4))
    # under jit, and with bf16
    xb = x.astype(jnp.bfloat16)
    gb = jax.jit(jax.grad(lambda v: jnp.sum(ste_round(v).astype(jnp.float32))))(xb)
    assert gb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(gb.astype(jnp.float32)), np.ones(4))


# ---------------------------------------------------------------------------------------------
# fake_quant: forward


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_fake_quant_forward_equals_quantize_dequantize(spec, dtype):
    x = _x(dtype=dtype)
    expected = jquant.quantize(x, spec).dequantize()
    out = fake_quant(x, spec)
    assert out.dtype == dtype and out.shape == x.shape
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), np.asarray(expected.astype(jnp.float32)))
    # the same inside one jitted program
    jitted = jax.jit(lambda v: (fake_quant(v, spec), jquant.quantize(v, spec).dequantize()))(x)
    np.testing.assert_array_equal(np.asarray(jitted[0].astype(jnp.float32)), np.asarray(jitted[1].astype(jnp.float32)))


@pytest.mark.parametrize("spec, scale, zero_point", [
    (QuantSpec(8), 0.01, None),
    (QuantSpec(4, channel_axes=(1,)), jnp.linspace(0.05, 0.5, 16)[None, :], None),
    (QuantSpec(8, symmetric=False), 0.01, -28),
    (QuantSpec(3, symmetric=False, channel_axes=(0,)), jnp.full((6, 1), 0.3), jnp.arange(-4, 2)[:, None]),
])
def test_fake_quant_forward_with_fixed_scale(spec, scale, zero_point):
    x = _x() * 1.5
    out = fake_quant(x, spec, scale=scale, zero_point=zero_point)
    expected = jquant.quantize(x, spec, scale=scale, zero_point=zero_point).dequantize()
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    ref = reference.quantize(np.asarray(x, np.float64), spec,
                             np.asarray(jnp.asarray(scale, jnp.float32), np.float64), zero_point)
    np.testing.assert_allclose(np.asarray(out), ref.x_hat, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# fake_quant: gradients


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_gradient_is_identity_when_scale_comes_from_x(spec):
    x = _x() * 3
    np.testing.assert_array_equal(_grad_of_sum(lambda v: fake_quant(v, spec), x), np.ones(x.shape))
    # a non-uniform cotangent passes through unchanged
    w = _x(seed=7)
    grad = jax.grad(lambda v: jnp.sum(w * fake_quant(v, spec)))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(w))
    # forward mode too
    _, tangent = jax.jvp(lambda v: fake_quant(v, spec), (x,), (w,))
    np.testing.assert_array_equal(np.asarray(tangent), np.asarray(w))


def test_gradient_with_fixed_symmetric_scale_masks_the_clipped_values():
    # QuantSpec(8), s = 0.01: representable range ±1.27 (± half a step rounds back inside)
    x = jnp.linspace(-3.0, 3.0, 601)
    grad = _grad_of_sum(lambda v: fake_quant(v, QuantSpec(8), scale=0.01), x)
    xs = np.asarray(x)
    assert np.all(grad[np.abs(xs) > 1.3] == 0)
    assert np.all(grad[np.abs(xs) < 1.2] == 1)
    assert set(np.unique(grad)) == {0.0, 1.0}


@pytest.mark.parametrize("bits, scale, zero_point", [(8, 0.01, -28), (4, 0.25, 3), (2, 0.5, -1)])
def test_gradient_with_fixed_asymmetric_scale_and_zero_point(bits, scale, zero_point):
    spec = QuantSpec(bits, symmetric=False)
    qmin, qmax = reference.qrange(bits, symmetric=False)
    lo, hi = scale * (qmin - zero_point), scale * (qmax - zero_point)  # the grid's ends
    x = jnp.linspace(lo - 1.0, hi + 1.0, 997)
    xs = np.asarray(x)
    grad = _grad_of_sum(lambda v: fake_quant(v, spec, scale=scale, zero_point=zero_point), x)
    margin = 0.55 * scale  # half a step rounds back onto the grid, plus slack for float32
    assert np.all(grad[(xs < lo - margin) | (xs > hi + margin)] == 0)
    inside = (xs > lo + 0.45 * scale) & (xs < hi - 0.45 * scale)
    assert np.all(grad[inside] == 1)
    assert inside.sum() > 0 and ((xs < lo - margin) | (xs > hi + margin)).sum() > 0


def test_gradient_mask_edge_is_half_a_step_beyond_the_grid():
    # documented: 1 where Qmin <= round(x/s) + z <= Qmax. With s = 2^-7, x/s = 127.4 rounds to 127
    # (inside, gradient 1); 127.6 rounds to 128 (clipped, gradient 0); the same at the lower end.
    s = 2.0 ** -7
    t = np.array([127.4, 127.6, -127.4, -127.6, 126.9, -126.9])
    grad = _grad_of_sum(lambda v: fake_quant(v, QuantSpec(8), scale=s), jnp.asarray(t * s, jnp.float32))
    np.testing.assert_array_equal(grad, [1, 0, 1, 0, 1, 1])


def test_gradient_with_fixed_per_channel_scale():
    spec = QuantSpec(4, channel_axes=(1,))
    scale = jnp.asarray([[0.01, 0.1, 1.0]])
    x = jnp.tile(jnp.asarray([[0.05], [0.5], [5.0], [-0.05], [-0.5], [-5.0]]), (1, 3))
    grad = _grad_of_sum(lambda v: fake_quant(v, spec, scale=scale), x)
    # range of channel c: ±7·s_c → ±0.07, ±0.7, ±7
    expected = (np.abs(np.asarray(x)) < 7.5 * np.asarray(scale)).astype(np.float32)
    np.testing.assert_array_equal(grad, expected)


@pytest.mark.parametrize("scale", [None, 0.001])
def test_sign_gradient_is_identity(scale):
    x = _x() * 10
    spec = QuantSpec(1, method="sign", channel_axes=(0,))
    if scale is not None:
        scale = jnp.full((6, 1), scale)
    np.testing.assert_array_equal(_grad_of_sum(lambda v: fake_quant(v, spec, scale=scale), x), np.ones(x.shape))


def test_gradient_under_jit_and_bf16():
    spec = QuantSpec(8)
    x = jnp.linspace(-3.0, 3.0, 601)
    expected = (np.abs(np.asarray(x)) < 1.275).astype(np.float32)  # multiples of 0.01: up to ±1.27
    g = jax.jit(jax.grad(lambda v: jnp.sum(fake_quant(v, spec, scale=0.01))))(x)
    np.testing.assert_array_equal(np.asarray(g), expected)
    xb = x.astype(jnp.bfloat16)
    gb = jax.jit(jax.grad(lambda v: jnp.sum(fake_quant(v, spec, scale=0.01).astype(jnp.float32))))(xb)
    assert gb.dtype == jnp.bfloat16
    xbf = np.asarray(xb.astype(jnp.float32))
    gbf = np.asarray(gb.astype(jnp.float32))
    assert np.all(gbf[np.abs(xbf) > 1.3] == 0) and np.all(gbf[np.abs(xbf) < 1.2] == 1)
    # scale computed from x, bf16, jitted: identity
    gid = jax.jit(jax.grad(lambda v: jnp.sum(fake_quant(v, QuantSpec(4, channel_axes=(0,))).astype(jnp.float32))))
    np.testing.assert_array_equal(np.asarray(gid(_x(dtype=jnp.bfloat16)).astype(jnp.float32)), np.ones((6, 16)))


def test_scale_receives_no_gradient():
    x = _x() * 2
    for spec, zero_point in ((QuantSpec(8), None), (QuantSpec(4, symmetric=False), 2)):
        g = jax.grad(lambda s: jnp.sum(fake_quant(x, spec, scale=s, zero_point=zero_point) ** 2))(0.05)
        assert float(g) == 0.0
        g = jax.grad(lambda s: jnp.sum(fake_quant(x, spec, scale=s, zero_point=zero_point) ** 2))(jnp.full((1, 1), 0.05))
        np.testing.assert_array_equal(np.asarray(g), [[0.0]])
