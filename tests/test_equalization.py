"""Weight-norm equalization (`QuantSpec(equalization=jquant.Equalize())`): r against a NumPy
float64 reference, quantize/dequantize/fake_quant/dot/QAT/GPTQ/checkpoints, alone and with a
Hadamard rotation, and the errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import Equalize, Hadamard, QuantDot, QuantSpec
from jquant._src import numerics, rotation
from jquant._src.ptq.gptq import gptq_weight
from jquant._src.qarray import in_stored_basis

from helpers import DN, correlated_batches, jit_quantize, normal, quantize_jit
from reference import as_f64, sqnr_db

EQ = Equalize(0.5)
INT4 = QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=128)


def _reference_r(w, alpha, averaged, axis):
    """r_k = (m_k / G)^α, m_k the RMS over `averaged`, G the geometric mean of the nonzero m_k
    along `axis`; 1 where m_k = 0 (module docstring of jquant._src.equalization)."""
    w = as_f64(w)
    m = np.sqrt(np.mean(w ** 2, axis=averaged, keepdims=True))
    nonzero = m > 0
    log_m = np.log(np.where(nonzero, m, 1.0))
    log_g = np.sum(np.where(nonzero, log_m, 0), axis=axis, keepdims=True) / np.maximum(
        np.sum(nonzero, axis=axis, keepdims=True), 1)
    return np.where(nonzero, np.exp(alpha * (log_m - log_g)), 1.0)


def _rows_of_different_norms(seed, shape, dtype=jnp.float32):
    w = np.asarray(normal(seed, shape), np.float64)
    norms = np.exp(np.random.default_rng(seed).normal(0, 1, shape[-2]))
    return jnp.asarray(w * norms[:, None], dtype)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_r_matches_the_float64_reference_and_the_stored_values_are_w_over_r(alpha):
    w = _rows_of_different_norms(0, (512, 96)).at[7].set(0.0)  # an all-zero row keeps r = 1
    spec = dataclasses.replace(INT4, equalization=Equalize(alpha))
    qa = jit_quantize(w, spec)
    want = _reference_r(w, alpha, (1,), 0)
    assert qa.eq_scale.shape == (512, 1) and qa.eq_scale.dtype == jnp.bfloat16 and want[7, 0] == 1.0
    np.testing.assert_allclose(as_f64(qa.eq_scale), want, rtol=2 ** -8)  # rounded to bfloat16
    assert as_f64(qa.eq_scale)[7, 0] == 1.0 and np.isclose(np.exp(np.mean(np.log(np.delete(want, 7)))), 1.0)
    # the stored integers are those of W·(1/r) quantized with the plain spec; dequantize is r·Q
    r = np.asarray(qa.eq_scale, np.float32)
    stored = jnp.asarray(np.asarray(w) * (np.float32(1) / r))
    plain = jit_quantize(stored, INT4)
    np.testing.assert_array_equal(in_stored_basis(qa).q, plain.q)
    np.testing.assert_array_equal(qa.dequantize(), jnp.asarray(r * np.asarray(plain.dequantize())))
    assert qa.nbytes == plain.nbytes + 512 * 2
    # an all-zero tensor: r = 1 everywhere, dequantizes to exact zeros
    zero = jit_quantize(jnp.zeros((256, 8)), dataclasses.replace(INT4, equalization=EQ))
    assert np.all(np.asarray(zero.eq_scale) == 1) and not np.any(np.asarray(zero.dequantize()))


def test_hqq_fits_the_grid_of_w_over_r_so_its_objective_weighs_row_k_by_r_k_to_the_minus_p():
    w = _rows_of_different_norms(1, (1024, 256))
    hqq = dataclasses.replace(INT4, calibration=jquant.HQQ())
    qa = jit_quantize(w, dataclasses.replace(hqq, equalization=EQ))
    r = np.asarray(qa.eq_scale, np.float32)
    plain = jit_quantize(jnp.asarray(np.asarray(w) * (np.float32(1) / r)), hqq)
    np.testing.assert_array_equal(in_stored_basis(qa).q, plain.q)
    np.testing.assert_array_equal(qa.dequantize(), jnp.asarray(r * np.asarray(plain.dequantize())))

    def objective(spec):  # Σ r_k^−p·|w − ŵ|^p per group of 128 rows, in float64
        err = np.abs(as_f64(w) - as_f64(jit_quantize(w, spec).dequantize())) / as_f64(r)
        return np.sum(err.reshape(8, 128, 256) ** 0.7, axis=1)

    rtn, fitted = objective(dataclasses.replace(INT4, equalization=EQ)), objective(qa.spec)
    assert np.all(fitted <= rtn * (1 + 1e-5)) and np.sum(fitted) < 0.99 * np.sum(rtn)  # measured 1.4% lower


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_stay_visible_at_4096_squared_and_change_no_other_row(bad):
    w = normal(25, (4096, 4096), scale=0.02)
    spec = dataclasses.replace(INT4, equalization=EQ)
    clean = jit_quantize(w, spec)
    got = jit_quantize(w.at[100, 7].set(bad), spec)
    d = np.asarray(got.dequantize())
    others = np.ones(4096, bool)
    others[100] = False
    np.testing.assert_array_equal(np.asarray(got.eq_scale)[others], np.asarray(clean.eq_scale)[others])
    assert np.isnan(d[100, 7])
    if np.isnan(bad):  # its group, as without equalization
        assert np.isnan(d[:128, 7]).all() and np.isfinite(np.delete(d[100], 7)).all()
    else:  # r = Inf: its whole row
        assert not np.isfinite(d[100]).any()
    # other groups (rows 128…) are untouched; rows 0…127 share row 100's changed value in each group
    np.testing.assert_array_equal(d[128:], np.asarray(clean.dequantize())[128:])


def test_stacked_layers_get_their_own_r_and_bf16_dequantizes_to_bf16():
    w = jnp.stack([_rows_of_different_norms(s, (256, 64)) for s in (1, 2, 3)]).astype(jnp.bfloat16)
    spec = QuantSpec(4, channel_axes=(0, 2), group_size=128, equalization=EQ)  # Rule(stacked=1)'s spec
    qa, _, w_hat = quantize_jit(w, spec)
    assert qa.eq_scale.shape == (3, 256, 1) and w_hat.dtype == jnp.bfloat16
    np.testing.assert_allclose(as_f64(qa.eq_scale), _reference_r(w, 0.5, (2,), 1), rtol=2 ** -8)
    for layer in range(3):  # each layer as quantized alone
        one = jit_quantize(w[layer], QuantSpec(4, channel_axes=(1,), group_size=128, equalization=EQ))
        np.testing.assert_array_equal(as_f64(one.dequantize()), as_f64(w_hat[layer]))


@pytest.mark.parametrize("rotated", [False, True])
def test_equalization_helps_round_to_nearest_where_small_rows_meet_large_activations(rotated):
    # a trained layer's small rows often read its largest activations: r keeps their error small
    w = _rows_of_different_norms(4, (1024, 256))
    norms = np.linalg.norm(np.asarray(w), axis=1)
    x = normal(5, (256, 1024)) * jnp.asarray(norms.mean() / norms)[None, :] ** 0.5
    base = dataclasses.replace(INT4, bits=3, rotation=Hadamard(1) if rotated else None)
    exact = as_f64(x) @ as_f64(w)
    plain = sqnr_db(exact, as_f64(x) @ as_f64(quantize_jit(w, base)[2]))
    equalized = sqnr_db(exact, as_f64(x) @ as_f64(quantize_jit(w, dataclasses.replace(base, equalization=EQ))[2]))
    assert equalized > plain + 1.0, (plain, equalized)


@pytest.mark.parametrize("rotated", [False, True])
def test_fake_quant_is_quantize_dequantize_with_the_ste_gradient(rotated):
    w = _rows_of_different_norms(6, (256, 64))
    spec = QuantSpec(3, symmetric=False, channel_axes=(1,), group_size=64, equalization=EQ,
                     rotation=Hadamard(2) if rotated else None)
    np.testing.assert_array_equal(jax.jit(jquant.fake_quant, static_argnums=1)(w, spec), quantize_jit(w, spec)[2])
    c = normal(7, w.shape)
    g = jax.jit(jax.grad(lambda w: jnp.sum(jquant.fake_quant(w, spec) * c)))(w)
    np.testing.assert_allclose(g, c, rtol=1e-5, atol=1e-5)  # MinMax clips nothing: r·R·Rᵀ·c/r = c


@pytest.mark.parametrize("rotated", [False, True])
def test_served_dot_scales_the_activation_and_never_dequantizes_the_weight(rotated):
    from test_rotation import _no_float_weight
    x, w = normal(8, (16, 2048), jnp.bfloat16), _rows_of_different_norms(9, (2048, 1024), jnp.bfloat16)
    qa = jit_quantize(w, dataclasses.replace(INT4, equalization=EQ, rotation=Hadamard(3) if rotated else None))
    want = as_f64(x) @ as_f64(qa.dequantize())
    got = jax.jit(jquant.dot_general, static_argnums=2)(x, qa, DN)
    assert got.dtype == jnp.bfloat16
    # bf16: x·r (and its rotation) is rounded to bf16 once, the output once more
    assert sqnr_db(want, got) > 40
    assert _no_float_weight(lambda x, qa: jquant.dot_general(x, qa, DN), x, qa, shape=(2048, 1024))


def test_w4a8_quantizes_the_scaled_rotated_activation_and_int_dot_refuses():
    x, w = normal(10, (32, 384)), _rows_of_different_norms(11, (384, 64))
    spec = QuantSpec(4, channel_axes=(1,), equalization=EQ, rotation=Hadamard(2))
    act = QuantSpec(8, channel_axes=(0,))
    qa = jit_quantize(w, spec)
    r = as_f64(qa.eq_scale)[:, 0]
    xr = jnp.asarray((as_f64(x) * r) @ rotation.matrix(Hadamard(2), 384), jnp.float32)
    want = as_f64(quantize_jit(xr, act)[2]) @ as_f64(in_stored_basis(qa).dequantize())
    dot = jax.jit(lambda x, w: jquant.dot_general(x, w, DN, lhs_spec=act))
    for got in (dot(x, qa), jax.jit(QuantDot(act=act), static_argnums=2)(x, qa, DN)):
        np.testing.assert_allclose(as_f64(got), want, atol=1e-4 * np.abs(want).max())
    with pytest.raises(ValueError, match="equalized"):
        jquant.int_dot_general(jit_quantize(x, QuantSpec(8, channel_axes=(0,))), qa, DN)


def test_qat_quantdot_matches_serving_and_the_gradient_is_the_ste_of_the_served_basis():
    x, w = normal(12, (64, 256)), _rows_of_different_norms(13, (256, 128))
    spec = QuantSpec(4, channel_axes=(1,), group_size=128, equalization=EQ, rotation=Hadamard(1))
    act = QuantSpec(8, channel_axes=(0,))
    op = QuantDot(weight=spec, act=act)
    served = jax.jit(QuantDot(act=act), static_argnums=2)(x, jit_quantize(w, spec), DN)
    y, gw = jax.jit(lambda x, w: (op(x, w, DN), jax.grad(lambda w: jnp.sum(op(x, w, DN) ** 2))(w)))(x, w)
    np.testing.assert_allclose(y, served, atol=1e-4 * float(jnp.abs(served).max()))
    # ∂/∂W of (fq(x·r·R))·fq(Rᵀ·W/r) with r held fixed: (1/r)·R·(x̂ᵀ·dy)
    qa = jit_quantize(w, spec)
    r, rot = as_f64(qa.eq_scale), rotation.matrix(Hadamard(1), 256)
    xq = as_f64(quantize_jit(jnp.asarray((as_f64(x) * r[:, 0]) @ rot, jnp.float32), act)[2])
    np.testing.assert_allclose(gw, (rot @ (xq.T @ (2 * as_f64(y)))) / r, rtol=2e-3,
                               atol=2e-3 * float(jnp.abs(gw).max()))


def test_quant_conv_serves_the_dequantized_kernel_that_qat_fake_quantizes():
    img, kernel = normal(23, (2, 6, 6, 32)), _rows_of_different_norms(24, (3, 3, 32, 8))
    kspec = QuantSpec(4, channel_axes=(3,), equalization=EQ)  # r along I, the norms over H, W, O
    qk = jit_quantize(kernel, kspec)
    assert qk.eq_scale.shape == (1, 1, 32, 1)
    for act in (None, QuantSpec(8)):
        conv = jax.jit(lambda a, k: jquant.QuantConv(weight=kspec, act=act)(
            a, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
        np.testing.assert_allclose(conv(img, qk), conv(img, kernel), atol=1e-4)


def test_flax_linen_stack_served_equals_the_dequantized_model():
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(256, dtype=jnp.bfloat16)(jax.nn.gelu(nn.Dense(512, dtype=jnp.bfloat16)(x))), None

    model = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()
    x = normal(14, (4, 8, 256))
    params = model.init(jax.random.key(0), x, None)
    spec = QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=128, equalization=EQ)
    policy = jquant.Policy([jquant.Rule(r".*kernel", spec, stacked=1)])
    served = jquant.quantize_params(params, policy)
    kernel = served["params"]["Dense_0"]["kernel"]
    assert kernel.eq_scale.shape == (3, 512, 1)  # Dense_0 is the (512, 256) one, called second
    qmodel = jquant.flax.quantize(model, policy)
    got = jax.jit(qmodel.apply)(served, x, None)[0]
    want = jax.jit(model.apply)(jquant.dequantize_params(served), x, None)[0]
    assert got.dtype == want.dtype
    np.testing.assert_allclose(as_f64(got), as_f64(want), atol=0.05 * float(jnp.abs(want).max()))
    assert sqnr_db(want.astype(jnp.float32), got.astype(jnp.float32)) > 30


def test_flax_attention_kernels_served_equal_the_dequantized_model():
    import flax.linen as nn
    model = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=256, dtype=jnp.bfloat16)
    x = normal(26, (2, 16, 256))
    params = model.init(jax.random.key(1), x)
    qkv = QuantSpec(4, symmetric=False, channel_axes=(1, 2), group_size=128, equalization=EQ)  # (in, heads, dim)
    out = QuantSpec(4, symmetric=False, channel_axes=(2,), equalization=EQ, rotation=Hadamard())  # (heads, dim, out)
    policy = jquant.Policy([jquant.Rule(r".*(query|key|value)/kernel", qkv), jquant.Rule(r".*out/kernel", out)])
    served = jquant.quantize_params(params, policy)
    assert served["params"]["query"]["kernel"].eq_scale.shape == (256, 1, 1)
    assert served["params"]["out"]["kernel"].eq_scale.shape == (1, 64, 1)  # head_dim, the larger shared axis
    got = jax.jit(jquant.flax.quantize(model, policy).apply)(served, x)
    want = jax.jit(model.apply)(jquant.dequantize_params(served), x)
    assert got.dtype == want.dtype == jnp.bfloat16
    assert sqnr_db(want.astype(jnp.float32), got.astype(jnp.float32)) > 30


def test_gptq_runs_on_w_over_r_under_r_h_r_and_beats_equalized_rtn():
    w = _rows_of_different_norms(15, (256, 32))
    (x,) = correlated_batches(16, 1, 1024, 256)[0]
    xtx = x.T @ x
    for rot in (None, Hadamard(4)):
        spec = QuantSpec(3, symmetric=False, channel_axes=(1,), group_size=128, equalization=EQ, rotation=rot)
        qa, err = gptq_weight(w, xtx, 1024, spec, (0,))
        assert qa.spec == spec and err.error < 0.8 * err.rtn_error
        # the same as GPTQ of the plain (or rotated) spec on W/r with the inputs x·r
        r = as_f64(qa.eq_scale)
        xr = jnp.asarray(as_f64(x) * r[:, 0], jnp.float32)
        plain, _ = gptq_weight(jnp.asarray(as_f64(w) / r, jnp.float32), xr.T @ xr, 1024,
                               dataclasses.replace(spec, equalization=None), (0,))
        np.testing.assert_allclose(as_f64(qa.dequantize()), r * as_f64(plain.dequantize()), atol=2e-2 * float(
            jnp.abs(w).max()))
        assert np.mean(np.isclose(as_f64(qa.dequantize()), r * as_f64(plain.dequantize()), rtol=1e-4)) > 0.95


def test_checkpoint_and_safetensors_round_trip_bit_exact(tmp_path):
    spec = QuantSpec(3, symmetric=False, channel_axes=(1,), group_size=64, equalization=Equalize(0.75),
                     rotation=Hadamard(seed=5))
    tree = {"w": jit_quantize(_rows_of_different_norms(17, (128, 48)), spec),
            "plain": jit_quantize(normal(18, (64, 8)), QuantSpec(8))}
    jquant.save(tmp_path / "ckpt", tree)
    jquant.export_safetensors(tmp_path / "w.safetensors", tree)
    for got in (jquant.load(tmp_path / "ckpt"), jquant.import_safetensors(tmp_path / "w.safetensors")):
        assert got["w"].spec == spec and got["plain"].eq_scale is None
        np.testing.assert_array_equal(got["w"].eq_scale, tree["w"].eq_scale)
        np.testing.assert_array_equal(got["w"].dequantize(), tree["w"].dequantize())


def test_config_repr_and_errors():
    spec = dataclasses.replace(INT4, equalization=Equalize(1))
    assert repr(spec).endswith("equalization=Equalize(alpha=1.0))")
    with pytest.raises(ValueError, match=r"alpha=0 must be in \(0, 1\]"):
        Equalize(0)
    with pytest.raises(TypeError, match="alpha"):
        Equalize("half")
    with pytest.raises(TypeError, match="not an equalization"):
        QuantSpec(4, equalization=0.5)
    # (out, in) per output channel: every other axis leads up to the contraction, no norm to take
    with pytest.raises(ValueError, match="nothing to take a norm over"):
        jquant.quantize(normal(19, (16, 64)), QuantSpec(4, channel_axes=(0,), equalization=EQ))
    with pytest.raises(ValueError, match="equalization"):
        jquant.learned.lsq_fake_quant(normal(20, (64, 8)), jnp.ones((1, 8)),
                                      dataclasses.replace(INT4, group_size=None, equalization=EQ))
    assert numerics.layout((64, 8), dataclasses.replace(INT4, group_size=None, equalization=EQ)).transform_axis == 0
    policy = jquant.Policy([jquant.Rule(r".*kernel", QuantSpec(4, channel_axes=(1,), equalization=EQ))])
    with pytest.raises(ValueError, match="^dense/kernel: LSQ .* equalization"):
        jquant.learned.init({"dense": {"kernel": normal(21, (128, 8))}}, policy)
    with pytest.raises(ValueError, match="dense/kernel.*nothing to take a norm over"):
        jquant.quantize_params({"dense": {"kernel": normal(22, (8, 128))}},
                               jquant.Policy([jquant.Rule(r".*kernel", QuantSpec(4, channel_axes=(0,), equalization=EQ))]))
