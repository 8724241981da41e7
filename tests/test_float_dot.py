"""The dot of QArrays with floating-point elements (`jquant._src.float_dot`): every path within
float32 rounding of the float64 product of the dequantized operands, the path choice, the FP8 W8A8
preset, and an FP8 W8A8 Flax MLP whose served outputs equal its QAT outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jquant
from jquant import QuantSpec
from jquant._src import float_dot

import reference
from helpers import DN, Mlp, normal, quantize_jit

FP8_TOKEN = QuantSpec(8, channel_axes=(0,), method="fp8_e4m3")  # activation (M, K): a scale per token
FP8_CHANNEL = QuantSpec(8, channel_axes=(1,), method="fp8_e4m3")  # kernel (K, N): a scale per output channel


def _relative_to_float64(y, lhs, rhs, dimension_numbers=DN):
    want = reference.dot_general(reference.as_f64(lhs.dequantize()), reference.as_f64(rhs.dequantize()),
                                 dimension_numbers)
    return float(np.max(np.abs(reference.as_f64(y) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("path, m", [("elements", 48), ("weight_only", 48), ("dequantized", 48), (None, 1)])
def test_fp8_dot_is_within_float32_rounding_of_the_float64_product(path, m):
    x = jquant.quantize(normal(0, (m, 1024)), FP8_TOKEN)
    w = jquant.quantize(normal(1, (1024, 512), scale=0.05), QuantSpec(8, channel_axes=(1,), method="fp8_e5m2"))
    y = jax.jit(lambda a, b: float_dot.dot_general(a, b, DN, path=path))(x, w)
    assert y.shape == (m, 512) and y.dtype == jnp.float32
    assert _relative_to_float64(y, x, w) < 1e-5
    np.testing.assert_array_equal(np.asarray(jquant.dot_general(x, w, DN)),
                                  np.asarray(float_dot.dot_general(x, w, DN)))  # dot_general dispatches here


def test_element_path_with_batch_axes_and_scales_on_both_sides():
    x = jquant.quantize(normal(2, (3, 16, 256)), QuantSpec(8, channel_axes=(0, 1), method="fp8_e4m3"))
    w = jquant.quantize(normal(3, (3, 256, 40)), QuantSpec(8, channel_axes=(0, 2), method="fp8_e4m3"))
    dn = (((2,), (1,)), ((0,), (0,)))
    y = float_dot.dot_general(x, w, dn, path="elements")
    assert y.shape == (3, 16, 40)
    assert _relative_to_float64(y, x, w, dn) < 1e-5


def test_blocked_operands_take_the_dequantized_paths_and_the_element_path_says_why():
    x = quantize_jit(normal(4, (8, 256)), QuantSpec(8, channel_axes=(0,), group_size=32, group_axis=1,
                                                     method="mxfp8"))[0]
    w = quantize_jit(normal(5, (256, 64)), QuantSpec(4, channel_axes=(1,), group_size=32, method="mxfp4"))[0]
    dot = jax.jit(lambda a, b: jquant.dot_general(a, b, DN))
    assert _relative_to_float64(dot(x, w), x, w) < 1e-5
    with pytest.raises(ValueError, match="lhs is .*mxfp8.*not FP8"):
        float_dot.dot_general(x, w, DN, path="elements")
    with pytest.raises(ValueError, match="path='fast' is unknown"):
        float_dot.dot_general(x, w, DN, path="fast")
    # an FP8 activation with an integer weight: the activation's float values meet the int8 weight
    w8 = quantize_jit(normal(6, (256, 64)), QuantSpec(8, channel_axes=(1,)))[0]
    xf = quantize_jit(normal(7, (8, 256)), FP8_TOKEN)[0]
    assert _relative_to_float64(dot(xf, w8), xf, w8) < 1e-5


def test_fp8_w8a8_preset():
    policy = jquant.fp8_w8a8()
    params = {"dense": {"kernel": normal(8, (64, 32))}, "attn": {"query": {"kernel": normal(9, (64, 4, 16))}}}
    tree = jquant.quantize_params(params, policy)
    assert tree["dense"]["kernel"].spec == QuantSpec(8, channel_axes=(-1,), method="fp8_e4m3")
    assert tree["attn"]["query"]["kernel"].spec.method.name == "fp8_e4m3"
    assert all(rule.act == QuantSpec(8, method="fp8_e4m3") for rule in policy.rules)


def test_fp8_w8a8_flax_mlp_serves_its_qat_outputs():
    """Acceptance: served (FP8 kernels, FP8 activations quantized per call, the FP8 dot) equals the
    QAT forward (fake-quantized) within 1e-4 relative, and differs from float."""
    x = normal(10, (64, 256))
    model = Mlp(hidden=512, outputs=128, activation=nn.gelu)
    params = model.init(jax.random.key(0), x)
    policy = jquant.fp8_w8a8()
    qmodel = jquant.flax.quantize(model, policy)
    qat = jax.jit(qmodel.apply)(params, x)
    served_params = jquant.quantize_params(params, policy)
    assert served_params["params"]["Dense_0"]["kernel"].bits_per_weight == pytest.approx(8 + 32 / 256)
    served = jax.jit(qmodel.apply)(served_params, x)
    scale = float(jnp.max(jnp.abs(qat)))
    assert float(jnp.max(jnp.abs(served - qat))) <= 1e-4 * scale
    assert float(jnp.max(jnp.abs(qat - model.apply(params, x)))) > 1e-3 * scale
    grads = jax.grad(lambda p: jnp.sum(qmodel.apply(p, x) ** 2))(params)
    assert float(jnp.sum(jnp.abs(grads["params"]["Dense_0"]["kernel"]))) > 0


def test_path_choice_by_backend(monkeypatch):
    """XLA:CPU: the weight-only path (no float8 dot in the program); a GPU/TPU backend: the dot of
    the float8 elements with a float32 result, for FP8 operands whose scales stay out of the sum."""
    x = jquant.quantize(normal(11, (4, 512)), FP8_TOKEN)
    w = jquant.quantize(normal(12, (512, 256)), FP8_CHANNEL)

    def float8_dots():
        jaxpr = jax.make_jaxpr(lambda a, b: jquant.dot_general(a, b, DN))(x, w).jaxpr
        return [e for e in jaxpr.eqns if e.primitive.name == "dot_general"
                and all(v.aval.dtype == jnp.float8_e4m3fn for v in e.invars)]

    assert float8_dots() == []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    dots = float8_dots()
    assert len(dots) == 1 and dots[0].params["preferred_element_type"] == jnp.float32
    mx = jquant.quantize(normal(13, (512, 256)), QuantSpec(8, channel_axes=(1,), group_size=32, method="mxfp8"))
    assert float_dot.element_dot_problem(x, mx, DN) is not None  # blocks: dequantized on every backend
