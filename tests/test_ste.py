"""ste_round and fake_quant: forward values, straight-through gradients, clip masks (examples,
and the mask as a property over uniform specs with fixed ranges)."""

import functools

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
from helpers import assert_same_bits, fixed_ranges, per_element, normal, uniform_specs
from reference import as_f64

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


SHAPE = (6, 16)


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


@settings(max_examples=25, deadline=None)
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


@functools.partial(jax.jit, static_argnums=1)
def _forward_both_ways(x, spec):
    return fake_quant(x, spec), jquant.quantize(x, spec).dequantize()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_fake_quant_forward_equals_quantize_dequantize(spec, dtype):
    # bit for bit, eagerly and inside one jitted program, at magnitudes from tiny to huge
    for magnitude in (1e-6, 1e-2, 1.0, 37.0, 1e4, 1e30):
        if 5 * magnitude > float(jnp.finfo(dtype).max):
            continue
        x = normal(0, SHAPE, dtype, scale=magnitude)
        out = fake_quant(x, spec)
        assert out.dtype == dtype and out.shape == x.shape
        assert_same_bits(out, jquant.quantize(x, spec).dequantize(), f"eager, magnitude {magnitude}")
        fq, x_hat = _forward_both_ways(x, spec)
        assert_same_bits(fq, x_hat, f"jit, magnitude {magnitude}")


@pytest.mark.parametrize("spec, scale, zero_point", [
    (QuantSpec(8), 0.01, None),
    (QuantSpec(4, channel_axes=(1,)), jnp.linspace(0.05, 0.5, 16)[None, :], None),
    (QuantSpec(8, symmetric=False), 0.01, -28),
    (QuantSpec(3, symmetric=False, channel_axes=(0,)), jnp.full((6, 1), 0.3), jnp.arange(-4, 2)[:, None]),
])
def test_fake_quant_forward_with_fixed_scale(spec, scale, zero_point):
    x = normal(0, SHAPE) * 1.5
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
    x = normal(0, SHAPE) * 3
    np.testing.assert_array_equal(_grad_of_sum(lambda v: fake_quant(v, spec), x), np.ones(x.shape))
    # a non-uniform cotangent passes through unchanged
    w = normal(7, SHAPE)
    grad = jax.grad(lambda v: jnp.sum(w * fake_quant(v, spec)))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(w))
    # forward mode too
    _, tangent = jax.jvp(lambda v: fake_quant(v, spec), (x,), (w,))
    np.testing.assert_array_equal(np.asarray(tangent), np.asarray(w))


def test_gradient_mask_edge_is_half_a_step_beyond_the_grid():
    # documented: 1 where Qmin <= round(x/s) + z <= Qmax. With s = 2^-7, x/s = 127.4 rounds to 127
    # (inside, gradient 1); 127.6 rounds to 128 (clipped, gradient 0); the same at the lower end.
    s = 2.0 ** -7
    t = np.array([127.4, 127.6, -127.4, -127.6, 126.9, -126.9])
    grad = _grad_of_sum(lambda v: fake_quant(v, QuantSpec(8), scale=s), jnp.asarray(t * s, jnp.float32))
    np.testing.assert_array_equal(grad, [1, 0, 1, 0, 1, 1])


@pytest.mark.parametrize("scale", [None, 0.001])
def test_sign_gradient_is_identity(scale):
    x = normal(0, SHAPE) * 10
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
    np.testing.assert_array_equal(np.asarray(gid(normal(0, SHAPE, jnp.bfloat16)).astype(jnp.float32)), np.ones(SHAPE))


def test_scale_receives_no_gradient():
    x = normal(0, SHAPE) * 2
    for spec, zero_point in ((QuantSpec(8), None), (QuantSpec(4, symmetric=False), 2)):
        g = jax.grad(lambda s: jnp.sum(fake_quant(x, spec, scale=s, zero_point=zero_point) ** 2))(0.05)
        assert float(g) == 0.0
        g = jax.grad(lambda s: jnp.sum(fake_quant(x, spec, scale=s, zero_point=zero_point) ** 2))(jnp.full((1, 1), 0.05))
        np.testing.assert_array_equal(np.asarray(g), [[0.0]])


@functools.partial(jax.jit, static_argnums=1)
def _grad(x, spec, scale, zero_point):
    return jax.grad(lambda v: jnp.sum(fake_quant(v, spec, scale=scale, zero_point=zero_point)))(x)


@given(st.sampled_from([(3, 8), (4, 6)]).flatmap(lambda s: st.tuples(st.just(s), uniform_specs(s))), st.data())
def test_gradient_with_fixed_ranges_is_the_clip_mask(shape_spec, data):
    """With a fixed scale (per tensor, channel or group) and zero-point, the gradient is exactly the
    documented mask: 1 where Qmin <= round(x/s) + z <= Qmax (mid-rise: floor), else 0."""
    shape, spec = shape_spec
    scale, zero_point = data.draw(fixed_ranges(shape, spec))
    s, z = per_element(scale, zero_point, shape, spec)
    # x/s spread over twice the grid so that both clip ends are crossed
    t = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(-2.0 ** spec.bits, 2.0 ** spec.bits)))
    x = jnp.asarray(t * s, jnp.float32)
    grad = np.asarray(_grad(x, spec, scale, zero_point))
    ratio = as_f64(x) / s
    integer = np.floor(ratio) if spec.midrise else reference.round_half_even(ratio)
    expected = ((spec.qmin <= integer + z) & (integer + z <= spec.qmax)).astype(np.float32)
    # float32's x·(1/s) may round the other way within an ulp of a decision boundary
    boundary = reference.near_tie(ratio) if not spec.midrise else np.abs(ratio - np.round(ratio)) <= 1e-5 * np.abs(ratio)
    ok = (grad == expected) | boundary
    assert set(np.unique(grad)) <= {0.0, 1.0}
    assert np.all(ok), f"gradient {grad[~ok]} where the mask says {expected[~ok]} (x/s = {ratio[~ok]})"
