"""Hadamard rotations (`QuantSpec(rotation=jquant.Hadamard(...))`): the matrix and its fast
transform against NumPy float64 references, quantize/dequantize, the online-rotated dot, STE,
GPTQ in the rotated basis, policies, jit, checkpoints and errors."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import jquant
from jquant import Hadamard, QuantDot, QuantSpec
from jquant._src import rotation
from jquant._src.ptq.gptq import gptq_weight
from jquant._src.qarray import in_stored_basis

from helpers import DN, correlated_batches, jit_quantize, normal, quantize_jit
from reference import as_f64, sqnr_db


def _paley_reference(q: int) -> np.ndarray:
    """Paley I Hadamard matrix of order q + 1 for a prime q ≡ 3 mod 4, by the Legendre symbol."""
    chi = np.array([0] + [1 if pow(a, (q - 1) // 2, q) == 1 else -1 for a in range(1, q)])
    jacobsthal = chi[(np.arange(q)[:, None] - np.arange(q)[None, :]) % q]
    s = np.block([[np.zeros((1, 1)), np.ones((1, q))], [-np.ones((q, 1)), jacobsthal]])
    return np.eye(q + 1) + s


def _signs_reference(seed: int, n: int) -> np.ndarray:
    """splitmix64 in Python integers."""
    out = []
    for i in range(n):
        z = (seed * 2 ** 32 + i + 0x9E3779B97F4A7C15) % 2 ** 64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2 ** 64
        out.append(-1.0 if (z ^ (z >> 31)) & 1 else 1.0)
    return np.array(out)


_deq = jax.jit(lambda qa: qa.dequantize())


def _reference_matrix(seed: int, n: int, block=None) -> np.ndarray:
    """R = D·diag(H_b, …)/√b from scipy's Sylvester matrices and `_paley_reference` (b = 2^k or 12·2^k)."""
    b = n if block is None else block
    m = 12 if b % 3 == 0 else 1
    h = np.kron(_paley_reference(11) if m == 12 else np.ones((1, 1)), scipy.linalg.hadamard(b // m))
    return _signs_reference(seed, n)[:, None] * np.kron(np.eye(n // b), h) / math.sqrt(b)


@pytest.mark.parametrize("n, block", [(256, None), (384, None), (1536, None), (512, 128), (768, 192)])
def test_transform_is_the_orthogonal_reference_matrix(n, block):
    rot = Hadamard(seed=7, block=block)
    r = _reference_matrix(7, n, block)
    np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-12)
    np.testing.assert_array_equal(rotation.matrix(rot, n), r)
    x = np.random.default_rng(0).standard_normal((3, n))
    # to_rotated along the last axis is x·R (= Rᵀ applied to each row); from_rotated inverts it
    got = rotation.to_rotated(jnp.asarray(x, jnp.float32), rot, 1)
    np.testing.assert_allclose(as_f64(got), x @ r, atol=2e-5 * np.abs(x @ r).max())
    np.testing.assert_allclose(as_f64(rotation.from_rotated(got, rot, 1)), x, atol=1e-5)
    # along a leading axis (a weight's contraction axis)
    w = np.random.default_rng(1).standard_normal((n, 5))
    np.testing.assert_allclose(as_f64(rotation.to_rotated(jnp.asarray(w, jnp.float32), rot, 0)), r.T @ w, atol=1e-5)


def test_signs_are_splitmix64_and_differ_by_seed():
    np.testing.assert_array_equal(rotation.signs(123, 64), _signs_reference(123, 64))
    assert not np.array_equal(rotation.signs(0, 64), rotation.signs(1, 64))


def test_real_model_sizes_and_11008_by_paley_344():
    for n, m in ((384, 12), (768, 12), (1536, 12), (2048, 1), (4096, 1), (11008, 344)):
        assert rotation._factor(n)[0] == m, n
    h = rotation._paley(344)  # Paley I over GF(7³)
    assert set(np.unique(h)) == {-1.0, 1.0} and np.array_equal(h @ h.T, 344 * np.eye(344))
    # K = 11008 once: Rᵀ on rows equals D then (H_344 ⊗ H_32)ᵀ / √n, the Kronecker product applied
    # as two small float64 matrix products
    x = np.random.default_rng(2).standard_normal((4, 11008))
    got = as_f64(rotation.to_rotated(jnp.asarray(x, jnp.float32), Hadamard(3), 1))
    v = np.reshape(x * rotation.signs(3, 11008), (4, 344, 32))
    want = np.einsum("ia,rab,jb->rij", h.T, v, scipy.linalg.hadamard(32).T).reshape(4, -1) / math.sqrt(11008)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)


def _outlier_weights(kind: str, shape=(1024, 128)):
    rng = np.random.default_rng(5)
    if kind == "student-t":
        return jnp.asarray(rng.standard_t(3, shape), jnp.float32)
    w = rng.standard_normal(shape)
    w[rng.choice(shape[0], shape[0] // 100, replace=False)] *= 10  # a few outlier input channels
    return jnp.asarray(w, jnp.float32)


@pytest.mark.parametrize("kind", ["student-t", "outlier rows"])
def test_rotation_beats_plain_rtn_on_outlier_weights_at_3_and_2_bits(kind):
    w = _outlier_weights(kind)
    for bits, group in ((3, 128), (2, 64)):
        plain = QuantSpec(bits, symmetric=False, channel_axes=(1,), group_size=group)
        for rot in (Hadamard(0), Hadamard(0, block=group)):
            rotated = dataclasses.replace(plain, rotation=rot)
            gain = sqnr_db(w, quantize_jit(w, rotated)[2]) - sqnr_db(w, quantize_jit(w, plain)[2])
            assert gain > (1.5 if bits == 3 else 0.2), (kind, bits, rot, gain)


def test_dequantize_is_r_times_the_stored_dequantization():
    w = normal(0, (384, 48))
    spec = QuantSpec(8, channel_axes=(1,), rotation=Hadamard(4))
    qa = jit_quantize(w, spec)
    assert qa.spec == spec and qa.shape == w.shape and qa.layout.transform_axis == 0
    r = _reference_matrix(4, 384)
    stored = in_stored_basis(qa)
    assert stored.spec.rotation is None and stored.value is qa.value
    # the stored integers are those of Rᵀ·W quantized as a plain spec
    np.testing.assert_array_equal(stored.q, jit_quantize(jnp.asarray(r.T @ as_f64(w), jnp.float32),
                                                         stored.spec).q)
    np.testing.assert_allclose(as_f64(_deq(qa)), r @ as_f64(_deq(stored)), atol=1e-5)
    assert sqnr_db(w, _deq(qa)) > 40  # int8: W back to quantization error


def test_bf16_weights_dequantize_to_bf16():
    w = normal(1, (256, 32), jnp.bfloat16)
    qa, _, w_hat = quantize_jit(w, QuantSpec(4, channel_axes=(1,), rotation=Hadamard()))
    assert w_hat.dtype == jnp.bfloat16 and qa.scale.dtype == jnp.float32
    assert sqnr_db(w.astype(jnp.float32), w_hat.astype(jnp.float32)) > 15


def _no_float_weight(fn, *args, shape):
    jaxpr = jax.make_jaxpr(fn)(*args)
    shapes = {tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars
              if jnp.issubdtype(v.aval.dtype, jnp.floating)}
    return tuple(shape) not in shapes


@pytest.mark.parametrize("block", [None, 128])
def test_weight_only_dot_rotates_the_activation_and_never_dequantizes_the_weight(block):
    x, w = normal(2, (16, 512)), _outlier_weights("student-t", (512, 256))
    qa = jit_quantize(w, QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=128,
                                   rotation=Hadamard(1, block=block)))
    want = as_f64(x) @ as_f64(_deq(qa))
    dot = jax.jit(jquant.dot_general, static_argnums=2)
    np.testing.assert_allclose(as_f64(dot(x, qa, DN)), want, atol=2e-5 * np.abs(want).max())
    assert _no_float_weight(lambda x, qa: jquant.dot_general(x, qa, DN), x, qa, shape=(512, 256))


@pytest.mark.parametrize("bits", [8, 4])
def test_w8a8_and_w4a8_quantize_the_rotated_activation(bits):
    x, w = normal(3, (32, 384)), _outlier_weights("student-t", (384, 64))
    x = x.at[:, :3].multiply(20.0)  # activation outlier channels
    spec = QuantSpec(bits, channel_axes=(1,), rotation=Hadamard(2))
    act = QuantSpec(8, channel_axes=(0,))
    qa = jit_quantize(w, spec)
    xr = jnp.asarray(as_f64(x) @ _reference_matrix(2, 384), jnp.float32)
    want = as_f64(quantize_jit(xr, act)[2]) @ as_f64(_deq(in_stored_basis(qa)))
    dot = jax.jit(lambda x, w, a: jquant.dot_general(x, w, DN, lhs_spec=a), static_argnums=2)
    for got in (dot(x, qa, act), jax.jit(QuantDot(act=act), static_argnums=2)(x, qa, DN)):
        np.testing.assert_allclose(as_f64(got), want, atol=1e-4 * np.abs(want).max())
    # W4A4 per token: rotating the activation makes its outlier channels harmless
    a4 = QuantSpec(4, channel_axes=(0,))
    plain = dot(x, jit_quantize(w, dataclasses.replace(spec, rotation=None)), a4)
    exact = as_f64(x) @ as_f64(w)
    assert sqnr_db(exact, dot(x, qa, a4)) > sqnr_db(exact, plain) + 3


def test_attention_kernel_in_heads_head_dim_and_its_output_projection():
    x = normal(4, (2, 8, 256))
    wq = normal(5, (256, 4, 32))
    qa = jit_quantize(wq, QuantSpec(4, channel_axes=(1, 2), group_size=64, rotation=Hadamard(9)))
    dn = (((2,), (0,)), ((), ()))
    dot = jax.jit(jquant.dot_general, static_argnums=2)
    want = np.einsum("bti,ihd->bthd", as_f64(x), as_f64(_deq(qa)))
    np.testing.assert_allclose(as_f64(dot(x, qa, dn)), want, atol=1e-5 * np.abs(want).max())
    a8 = QuantSpec(8, channel_axes=(0, 1))
    got = jax.jit(QuantDot(act=a8), static_argnums=2)(x, qa, dn)
    assert sqnr_db(want, got) > 30
    # (heads, head_dim, out): per output channel, the rotation on head_dim (the larger shared axis)
    h = normal(6, (2, 8, 4, 32))
    wo = normal(7, (4, 32, 256))
    qo = jit_quantize(wo, QuantSpec(8, channel_axes=(2,), rotation=Hadamard(1)))
    assert qo.layout.transform_axis == 1
    dn_o = (((2, 3), (0, 1)), ((), ()))
    want = np.einsum("bthd,hdo->bto", as_f64(h), as_f64(_deq(qo)))
    np.testing.assert_allclose(as_f64(dot(h, qo, dn_o)), want, atol=1e-5 * np.abs(want).max())
    assert _no_float_weight(lambda h, q: jquant.dot_general(h, q, dn_o, lhs_spec=QuantSpec(8)), h, qo, shape=wo.shape)


def test_rotation_along_a_free_axis_dequantizes_and_alike_qarrays_multiply_stored_integers():
    x, w = normal(8, (256, 128)), normal(9, (128, 32))
    # per tensor on (K, N) = (128, 32): the rotation is on K; on (32, 128) it would be on the free axis
    spec = QuantSpec(8, rotation=Hadamard(5))
    wt = jit_quantize(w.T, spec)
    assert wt.layout.transform_axis == 1
    dot = jax.jit(jquant.dot_general, static_argnums=2)
    got = dot(x, wt, (((1,), (1,)), ((), ())))
    np.testing.assert_allclose(as_f64(got), as_f64(x) @ as_f64(_deq(wt)).T, atol=1e-4)
    # activation and weight rotated alike along the contraction: Σ (R q_x)(R q_w) = Σ q_x q_w
    qx = jit_quantize(x, QuantSpec(8, channel_axes=(0,), rotation=Hadamard(5)))
    qw = jit_quantize(w, QuantSpec(8, channel_axes=(1,), rotation=Hadamard(5)))
    want = as_f64(_deq(qx)) @ as_f64(_deq(qw))
    np.testing.assert_allclose(as_f64(dot(qx, qw, DN)), want, atol=1e-4 * np.abs(want).max())
    acc = jax.jit(jquant.int_dot_general, static_argnums=2)(qx, qw, DN)
    np.testing.assert_allclose(as_f64(acc.dequantize()), want, atol=1e-4 * np.abs(want).max())
    with pytest.raises(ValueError, match="rotated"):
        jquant.int_dot_general(qx, jit_quantize(w, QuantSpec(8, channel_axes=(1,))), DN)


def test_fake_quant_forward_and_ste_gradient():
    w = _outlier_weights("student-t", (256, 64))
    spec = QuantSpec(3, symmetric=False, channel_axes=(1,), group_size=64, rotation=Hadamard(3))
    np.testing.assert_array_equal(jax.jit(jquant.fake_quant, static_argnums=1)(w, spec), quantize_jit(w, spec)[2])
    c = normal(10, w.shape)
    # MinMax clips nothing: the gradient is R·Rᵀ·c = c
    g = jax.jit(jax.grad(lambda w: jnp.sum(jquant.fake_quant(w, spec) * c)))(w)
    np.testing.assert_allclose(g, c, atol=1e-5)
    # a clipping calibration: R·(mask ⊙ Rᵀ·c), the mask taken in the rotated basis
    clip = dataclasses.replace(spec, calibration=jquant.Percentile(90.0))
    g = jax.jit(jax.grad(lambda w: jnp.sum(jquant.fake_quant(w, clip) * c)))(w)
    r = _reference_matrix(3, 256, None)
    wr = jnp.asarray(r.T @ as_f64(w), jnp.float32)
    stored = dataclasses.replace(clip, rotation=None)
    mask = np.asarray(jax.jit(jax.grad(lambda v: jnp.sum(jquant.fake_quant(v, stored))))(wr))
    assert 0 < mask.mean() < 1
    np.testing.assert_allclose(as_f64(g), r @ (mask * (r.T @ as_f64(c))), atol=1e-4)


def test_qat_quantdot_matches_serving_and_has_ste_gradients():
    x, w = normal(11, (64, 256)), normal(12, (256, 128))
    spec = QuantSpec(4, channel_axes=(1,), group_size=128, rotation=Hadamard(2))
    act = QuantSpec(8, channel_axes=(0,))
    op = QuantDot(weight=spec, act=act)
    served = jax.jit(QuantDot(act=act), static_argnums=2)(x, jit_quantize(w, spec), DN)
    y, (gx, gw) = jax.jit(lambda x, w: (op(x, w, DN), jax.grad(lambda x, w: jnp.sum(op(x, w, DN) ** 2),
                                                               argnums=(0, 1))(x, w)))(x, w)
    np.testing.assert_allclose(y, served, atol=1e-4 * float(jnp.abs(served).max()))
    # the STE: the gradient of the float dot of the (rotated, fake-quantized) operands
    r = _reference_matrix(2, 256)
    xq = as_f64(quantize_jit(jnp.asarray(as_f64(x) @ r, jnp.float32), act)[2])
    wq = as_f64(quantize_jit(jnp.asarray(r.T @ as_f64(w), jnp.float32), dataclasses.replace(spec, rotation=None))[2])
    dy = 2 * as_f64(y)
    np.testing.assert_allclose(gw, r @ (xq.T @ dy), rtol=2e-3, atol=2e-3 * float(jnp.abs(gw).max()))
    np.testing.assert_allclose(gx, dy @ wq.T @ r.T, rtol=2e-3, atol=2e-3 * float(jnp.abs(gx).max()))


def test_quant_einsum_and_quant_conv_serve_what_qat_computes():
    x, w = normal(18, (8, 128)), normal(19, (128, 16))
    spec, act = QuantSpec(4, channel_axes=(1,), rotation=Hadamard(4)), QuantSpec(8, channel_axes=(0,))
    op = jquant.QuantEinsum(weight=spec, act=act)
    einsum = jax.jit(lambda x, w: op("bi,io->bo", x, w))
    np.testing.assert_allclose(einsum(x, jit_quantize(w, spec)), einsum(x, w), atol=1e-4)
    # a conv kernel HWIO: the rotation is on I (the largest shared axis); no online rotation, the
    # served kernel is dequantized (R·Q) and QAT fake-quantizes it as R·fq(Rᵀ·W)
    img, kernel = normal(20, (2, 6, 6, 32)), normal(21, (3, 3, 32, 8), scale=0.2)
    kspec = QuantSpec(4, channel_axes=(3,), rotation=Hadamard(1))
    conv = jax.jit(lambda a, k: jquant.QuantConv(weight=kspec, act=QuantSpec(8))(
        a, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    assert jit_quantize(kernel, kspec).layout.transform_axis == 2
    np.testing.assert_allclose(conv(img, jit_quantize(kernel, kspec)), conv(img, kernel), atol=1e-4)


def test_gptq_with_rotation_beats_rotated_rtn_on_its_layer_objective():
    w = _outlier_weights("outlier rows", (128, 32))
    (x,) = correlated_batches(13, 1, 512, 128)[0]
    spec = QuantSpec(3, symmetric=False, channel_axes=(1,), group_size=64, rotation=Hadamard(6))
    qa, err = gptq_weight(w, x.T @ x, 512, spec, (0,))
    assert qa.spec == spec and err.error < 0.8 * err.rtn_error
    # its error is measured in the original basis, on the dequantized (rotated back) weight
    delta = as_f64(_deq(qa)) - as_f64(w)
    h = as_f64(x).T @ as_f64(x)
    np.testing.assert_allclose(err.error, np.trace(delta.T @ h @ delta) / np.trace(as_f64(w).T @ h @ as_f64(w)),
                               rtol=1e-3)
    with pytest.raises(ValueError, match="do not contract"):
        gptq_weight(w, jnp.eye(32), 1, QuantSpec(4, channel_axes=(1,), rotation=Hadamard()), (1,))


def test_quantize_params_with_a_policy_and_the_served_forward():
    from helpers import tanh_mlp, tanh_mlp_params
    params = tanh_mlp_params(0)
    spec = QuantSpec(4, symmetric=False, channel_axes=(1,), rotation=Hadamard(1))
    policy = jquant.Policy([jquant.Rule(r".*", spec)])
    served = jax.jit(jquant.quantize_params, static_argnums=1)(params, policy)
    assert served["w2"].spec == spec
    np.testing.assert_array_equal(jquant.dequantize_params(served)["w1"], quantize_jit(params["w1"], spec)[2])
    # served through QuantDot (the activation rotated online) = the dequantized forward
    x = normal(16, (32, 16))
    dot = lambda a, w: QuantDot()(a, w, DN)  # noqa: E731
    forward = jax.jit(lambda p, x: dot(jnp.tanh(dot(x, p["w1"])), p["w2"]))
    np.testing.assert_allclose(forward(served, x), tanh_mlp(jquant.dequantize_params(served), x), atol=1e-5)


def test_fold_rotations_moves_the_rotation_into_the_previous_dense_and_reports_the_rest():
    import flax.linen as nn
    # LayerNorm → Dense(256) → Dense(64) → relu → Dense(8), every kernel int4 g64 rotated: the
    # second Dense's input is the first's output plus its bias (foldable); the first reads a
    # LayerNorm (its γ: a product) and the last a relu (neither commutes with a rotation)
    model = nn.Sequential([nn.LayerNorm(), nn.Dense(256), nn.Dense(64), nn.relu, nn.Dense(8)])
    x = normal(20, (16, 128))
    params = model.init(jax.random.key(0), x)
    spec = QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=64, rotation=Hadamard(5))
    policy = jquant.Policy([jquant.Rule(".*kernel", spec)])
    with pytest.warns(UserWarning, match="2 rotated weight") as record:
        folded, fpolicy, where = jquant.ptq.fold_rotations(model.apply, params, policy, [(x,)])
    message = str(record[0].message)
    assert "params/layers_1/kernel (a product" in message and "params/layers_4/kernel (produced by" in message
    assert where == {"params/layers_2/kernel": ("params/layers_1/bias", "params/layers_1/kernel")} or \
        where == {"params/layers_2/kernel": ("params/layers_1/kernel", "params/layers_1/bias")}
    # the function is unchanged: (h·W₁ + b)·R·(Rᵀ·W₂)
    np.testing.assert_allclose(model.apply(folded, x), model.apply(params, x), rtol=1e-4, atol=1e-4)
    r = rotation.matrix(spec.rotation, 256)
    np.testing.assert_allclose(folded["params"]["layers_1"]["kernel"], as_f64(params["params"]["layers_1"]["kernel"]) @ r,
                               atol=1e-5)
    # the folded weight is quantized unrotated, to the very storage its rotated spec stores
    before = jquant.quantize_params(params, policy)
    after = jquant.quantize_params(folded, fpolicy)
    w2, w2_rotated = after["params"]["layers_2"]["kernel"], before["params"]["layers_2"]["kernel"]
    assert w2.spec == dataclasses.replace(spec, rotation=None)
    assert after["params"]["layers_4"]["kernel"].spec == spec  # left rotated, served rotating online
    for a, b in zip(jax.tree_util.tree_leaves(w2), jax.tree_util.tree_leaves(in_stored_basis(w2_rotated))):
        np.testing.assert_array_equal(a, b)
    # served: the folded model computes with no online rotation what the dequantized one does
    served = jax.jit(jquant.flax.quantize(model, fpolicy).apply)
    np.testing.assert_allclose(served(after, x), model.apply(jquant.dequantize_params(after), x), atol=1e-4)


def test_fold_rotations_needs_the_readers_of_an_input_rotated_alike():
    p = {"w1": normal(21, (32, 128)), "wa": normal(22, (128, 16)), "wb": normal(23, (128, 16))}
    def fn(p, x):
        h = x @ p["w1"]
        return h @ p["wa"] + h @ p["wb"]
    spec = QuantSpec(4, channel_axes=(1,), rotation=Hadamard(1))
    policy = jquant.Policy([jquant.Rule("wa", spec), jquant.Rule("wb", dataclasses.replace(spec, rotation=Hadamard(2)))])
    with pytest.warns(UserWarning, match="not rotated alike"):
        folded, fpolicy, where = jquant.ptq.fold_rotations(fn, p, policy, [(normal(24, (4, 32)),)])
    assert where == {} and fpolicy.rules == policy.rules
    np.testing.assert_array_equal(folded["w1"], p["w1"])


def test_checkpoint_and_safetensors_round_trip_bit_exact(tmp_path):
    spec = QuantSpec(3, symmetric=False, channel_axes=(1,), group_size=64,
                     rotation=Hadamard(seed=2 ** 40 + 3, block=64))
    tree = {"w": jit_quantize(normal(14, (128, 48)), spec), "b": normal(15, (48,))}
    jquant.save(tmp_path / "ckpt", tree)
    jquant.export_safetensors(tmp_path / "w.safetensors", tree)
    for got in (jquant.load(tmp_path / "ckpt"), jquant.import_safetensors(tmp_path / "w.safetensors")):
        assert got["w"].spec == spec
        np.testing.assert_array_equal(got["w"].dequantize(), tree["w"].dequantize())


def test_spec_field_repr_and_errors():
    spec = QuantSpec(4, channel_axes=(1,), group_size=128, rotation=Hadamard(seed=3, block=128))
    assert repr(spec) == ("QuantSpec(bits=4, channel_axes=(1,), group_size=128, "
                          "rotation=Hadamard(seed=3, block=128))")
    assert repr(Hadamard()) == "Hadamard(seed=0)" and hash(spec) == hash(dataclasses.replace(spec))
    assert QuantSpec(4).rotation is None
    with pytest.raises(TypeError, match="rotation"):
        QuantSpec(4, rotation="hadamard")
    with pytest.raises(TypeError, match="seed"):
        Hadamard(seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        Hadamard(seed=-1)
    with pytest.raises(ValueError, match="block=92.*Paley"):
        Hadamard(block=92)  # H_92 exists (Williamson) but has no Paley construction
    with pytest.raises(ValueError, match="order 92 .*allowed.*block=4"):
        jquant.quantize(normal(0, (92, 8)), QuantSpec(8, channel_axes=(1,), rotation=Hadamard()))
    with pytest.raises(ValueError, match="block=64.*does not divide.*96"):
        jquant.quantize(normal(0, (96, 8)), QuantSpec(8, channel_axes=(1,), rotation=Hadamard(block=64)))
    with pytest.raises(ValueError, match="every axis"):
        jquant.quantize(normal(0, (8, 8)), QuantSpec(8, channel_axes=(0, 1), rotation=Hadamard()))


def _w4a8_reference(x, w, spec, act_scale, act_zero_point, bias):
    """float64 (x·R fake-quantized on the static grid)·(R·Q(Rᵀ·w)·…)'s stored part + bias: the
    served numbers, with R dense and the documented grid q = clip(round(v/s) + z, −128, 127)."""
    r = rotation.matrix(spec.rotation, w.shape[0])
    s, z = float(act_scale), float(act_zero_point)
    xr = as_f64(x) @ r
    xq = s * (np.clip(np.round(xr / s) + z, -128, 127) - z)
    stored = np.asarray(jax.jit(in_stored_basis)(jquant.quantize(w, spec)).dequantize(), np.float64)  # Q(Rᵀ·w)
    return xq @ stored + as_f64(bias)


def test_static_activation_ranges_observe_the_rotated_activation():
    # Calibrated W4A8 with a rotated weight (Linen and NNX): the observer records the range of
    # x·R — the tensor the dot quantizes — and QAT and serving quantize x·R on that static grid
    import flax.linen as nn
    from flax import nnx

    from jquant.flax import _observers as observers

    spec = QuantSpec(4, channel_axes=(1,), group_size=32, rotation=Hadamard(seed=3))
    act = QuantSpec(8, symmetric=False)
    policy = jquant.Policy([jquant.Rule(r".*kernel", spec, act=act)])
    x = jax.nn.gelu(normal(40, (64, 128)) + 3.0 * (jnp.arange(128) % 31 == 0))  # outlier channels
    batch, other = x[:32], x[32:]
    r = rotation.matrix(spec.rotation, 128)
    expected = [float(np.min(as_f64(batch) @ r)), float(np.max(as_f64(batch) @ r))]
    assert expected[1] < float(jnp.max(batch)) * 0.8  # the rotation spreads the outliers: x's own range is wider

    qmodel = jquant.flax.quantize(nn.Dense(48), policy)
    variables = jquant.flax.calibrate(qmodel, [(batch,)], variables=qmodel.init(jax.random.key(0), x[:1]))
    stats = variables["quant_stats"]
    np.testing.assert_allclose([float(stats["act_lo"]), float(stats["act_hi"])], expected, rtol=1e-5)
    act_scale, act_zero_point = observers.static_scale([stats[k] for k, _ in observers.initial_stats()], act)
    params = variables["params"]
    reference = _w4a8_reference(other, params["kernel"], spec, act_scale, act_zero_point, params["bias"])
    qat = jax.jit(qmodel.apply)(variables, other)
    served = jax.jit(qmodel.apply)(jquant.quantize_params(variables, policy), other)
    for got in (qat, served):
        np.testing.assert_allclose(np.asarray(got, np.float64), reference, rtol=1e-4, atol=1e-4)
    dynamic = jax.jit(qmodel.apply)({"params": params}, other)
    assert float(jnp.max(jnp.abs(dynamic - qat))) > 1e-3  # the static grid is in use

    model = jquant.flax.quantize(nnx.Linear(128, 48, rngs=nnx.Rngs(1)), policy)
    jquant.flax.calibrate(model, [(batch,)])
    observer = model.dot_general
    np.testing.assert_allclose([float(observer.act_lo.get_value()), float(observer.act_hi.get_value())], expected,
                               rtol=1e-5)
    act_scale, act_zero_point = observers.static_scale(
        [v.get_value() for v in (observer.act_lo, observer.act_hi, observer.count)], act)
    reference = _w4a8_reference(other, model.kernel.get_value(), spec, act_scale, act_zero_point,
                                model.bias.get_value())
    call = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(np.asarray(call(model, other), np.float64), reference, rtol=1e-4, atol=1e-4)
    nnx.update(model, jquant.quantize_params(nnx.state(model, nnx.Param), policy))
    np.testing.assert_allclose(np.asarray(call(model, other), np.float64), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_learns_the_steps_of_the_rotated_weight(symmetric):
    # x̂ = R·s·clip(round(Rᵀw / s)) and its derivatives (NumPy float64 with the dense R), steps
    # initialised from Rᵀw, and the export dequantizes to the learned forward
    spec = QuantSpec(3, symmetric=symmetric, channel_axes=(1,), group_size=64, rotation=Hadamard(4))
    w = normal(30, (128, 24)) * (1 + 5 * (jnp.arange(128) % 17 == 0))[:, None]  # outlier input rows
    r = rotation.matrix(spec.rotation, 128)
    stored = r.T @ as_f64(w)
    step = jquant.learned.lsq_init_step(w, spec, init="absmax")
    plain = dataclasses.replace(spec, rotation=None)
    np.testing.assert_allclose(step, jquant.learned.lsq_init_step(jnp.asarray(stored, jnp.float32), plain, init="absmax"),
                               rtol=1e-6)
    step = step * 0.8  # some values beyond the grid: the clip's derivatives
    s = np.repeat(as_f64(step)[:, 0, :], 64, axis=0)
    lo, hi = (-3, 3) if symmetric else (-4, 3)
    v = stored / s
    expected = r @ (s * np.clip(np.round(v), lo, hi))
    out = jquant.learned.lsq_fake_quant(w, step, spec)
    np.testing.assert_allclose(out, expected, atol=1e-5 * np.abs(expected).max())
    c = normal(31, (128, 24))
    dw, dstep = jax.grad(lambda w, s: jnp.sum(c * jquant.learned.lsq_fake_quant(w, s, spec)), argnums=(0, 1))(w, step)
    inside = (v >= lo) & (v <= hi)
    np.testing.assert_allclose(dw, r @ (inside * (r.T @ as_f64(c))), atol=1e-5)
    coef = np.where(inside, np.round(v) - v, np.where(v < lo, lo, hi)) * jquant.learned.lsq_grad_scale(w.size, step.size, spec)
    expected_dstep = (coef * (r.T @ as_f64(c))).reshape(2, 64, 24).sum(1)[:, None, :]
    np.testing.assert_allclose(dstep, expected_dstep, rtol=1e-4, atol=1e-6)
    params, policy = {"w": w}, jquant.Policy([jquant.Rule("w", spec)])
    served = jquant.learned.quantize_params(params, {jquant.learned.LSQ_STEP: {"w": step}}, policy)
    assert served["w"].spec == spec
    np.testing.assert_allclose(served["w"].dequantize(), out, atol=1e-6 * np.abs(expected).max())
