"""GPTQ: one weight against a NumPy float64 reference (`gptq_weight`), and whole parameter trees
of any JAX function, Linen or NNX model (`jquant.ptq.gptq`, weight by weight in the order the
computation meets them)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jquant
import jquant.ptq
from jquant import Policy, QuantSpec, Rule
from jquant._src import paths
from jquant._src.ptq.gptq import gptq_weight

from helpers import Mlp, NnxMlp, correlated_batches, normal, tanh_mlp, tanh_mlp_params


# --- one weight, against NumPy float64 --------------------------------------------------------

def _reference_gptq(w, xtx, rows, bits, damp=0.01):
    """GPTQ as in the paper (per-output-channel symmetric grid fixed from the original weights),
    float64, one input channel at a time."""
    w = np.asarray(w, np.float64).copy()
    h = 2 * np.asarray(xtx, np.float64) / rows
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    upper = np.linalg.cholesky(np.linalg.inv(h)).T
    qmax = 2 ** (bits - 1) - 1
    scale = np.max(np.abs(w), axis=0) / qmax
    for k in range(w.shape[0]):
        q = scale * np.clip(np.round(w[k] / scale), -qmax, qmax)
        err = (w[k] - q) / upper[k, k]
        w[k + 1:] -= np.outer(upper[k, k + 1:], err)
        w[k] = q
    return w


def test_gptq_weight_matches_the_numpy_reference():
    w = normal(0, (32, 12))
    x = np.asarray(correlated_batches(1, 1, 200, 32)[0][0], np.float64)
    xtx = x.T @ x
    spec = QuantSpec(4, channel_axes=(1,))
    got = gptq_weight(w, jnp.asarray(xtx, jnp.float32), 200, spec, (0,))[0].dequantize()
    expected = _reference_gptq(w, xtx, 200, 4)
    step = np.max(np.abs(np.asarray(w)), axis=0) / 7
    # float32 vs float64 error feedback can flip a rounding near a tie, which then propagates to
    # later rows: require almost all values to agree exactly on the grid.
    same = np.isclose(np.asarray(got, np.float64), expected, rtol=0, atol=1e-4 * step.max())
    assert same.mean() > 0.97
    assert np.array_equal(same[:4], np.ones_like(same[:4]))  # the first rows see no drift


@pytest.mark.parametrize("spec,act_order", [
    (QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=16), False),
    (QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=16), True),
    (QuantSpec(3, channel_axes=(1,)), False),
    (QuantSpec(3, midrise=True, channel_axes=(1,)), True),
    (QuantSpec(3, method="kmeans", channel_axes=(1,)), False),
    (QuantSpec(4, method="nf4", channel_axes=(1,), group_size=16), True),
    (QuantSpec(1, method="sign", channel_axes=(1,)), False),
    (QuantSpec(8, method="fp8_e4m3", channel_axes=(1,)), True),
    (QuantSpec(4, method="mxfp4", channel_axes=(1,), group_size=32), False),
    (QuantSpec(4, method="nvfp4", channel_axes=(1,), group_size=16), False),
], ids=repr)
def test_gptq_beats_round_to_nearest_for_every_spec(spec, act_order):
    w = normal(5, (64, 24))
    x = np.asarray(correlated_batches(6, 1, 256, 64)[0][0], np.float64)
    qa, result = gptq_weight(w, jnp.asarray(x.T @ x, jnp.float32), 256, spec, (0,), act_order=act_order)
    assert qa.spec == spec and qa.shape == w.shape
    w_hat = np.asarray(qa.dequantize(), np.float64)
    rtn = np.asarray(jquant.quantize(w, spec).dequantize(), np.float64)

    def output_error(v):
        return np.sum((x @ (v - np.asarray(w, np.float64))) ** 2) / np.sum((x @ np.asarray(w, np.float64)) ** 2)

    assert output_error(w_hat) < 0.8 * output_error(rtn)
    assert result.error == pytest.approx(output_error(w_hat), rel=1e-3)
    assert result.rtn_error == pytest.approx(output_error(rtn), rel=1e-3)
    again = jquant.quantize(qa.dequantize(), spec, scale=qa.scale, zero_point=qa.zero_point) \
        if spec.method.name != "kmeans" else jquant.quantize(qa.dequantize(), spec, scale=qa.scale)
    np.testing.assert_array_equal(np.asarray(again.dequantize()), np.asarray(qa.dequantize()))


def test_first_group_keeps_the_round_to_nearest_grid_and_later_groups_are_refit():
    w = normal(7, (64, 8))
    x = np.asarray(correlated_batches(8, 1, 128, 64)[0][0], np.float64)
    spec = QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=16)
    qa = gptq_weight(w, jnp.asarray(x.T @ x, jnp.float32), 128, spec, (0,))[0]
    rtn = jquant.quantize(w, spec)
    np.testing.assert_array_equal(np.asarray(qa.scale)[0], np.asarray(rtn.scale)[0])
    assert not np.array_equal(np.asarray(qa.scale)[1:], np.asarray(rtn.scale)[1:])


def test_dead_inputs_get_zero_weights():
    w = normal(9, (16, 4))
    x = np.asarray(normal(10, (64, 16)), np.float64)
    x[:, 3] = 0
    qa = gptq_weight(w, jnp.asarray(x.T @ x, jnp.float32), 64, QuantSpec(4, channel_axes=(1,)), (0,))[0]
    assert np.all(np.asarray(qa.dequantize())[3] == 0)
    assert np.all(np.isfinite(np.asarray(qa.dequantize())))


def test_float_target_matches_the_numpy_reference_and_reports_the_error_against_the_float_output():
    """GPTAQ's target: Ŵ fits X·W from the quantized model's inputs X̃ (here X plus drift)."""
    w = normal(20, (64, 12))
    x = np.asarray(correlated_batches(21, 1, 256, 64)[0][0], np.float64)
    x_tilde = x + 0.3 * np.asarray(normal(22, x.shape), np.float64) * x.std(axis=0)
    xtx, cross, ref_xtx = x_tilde.T @ x_tilde, x_tilde.T @ x, x.T @ x
    spec = QuantSpec(4, channel_axes=(1,))
    as32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    qa, result = gptq_weight(w, as32(xtx), 256, spec, (0,), reference=(as32(cross), as32(ref_xtx)))
    w64 = np.asarray(w, np.float64)
    h, c = 2 * xtx / 256, 2 * cross / 256
    target = w64 + np.linalg.solve(h + 0.01 * np.mean(np.diag(h)) * np.eye(64), (c - h) @ w64)
    got, expected = np.asarray(qa.dequantize(), np.float64), _reference_gptq(target, xtx, 256, 4)
    step = np.max(np.abs(target), axis=0) / 7
    same = np.isclose(got, expected, rtol=0, atol=1e-4 * step.max())
    assert same.mean() > 0.97 and same[:4].all()

    def error_vs_float(v):
        return np.sum((x_tilde @ v - x @ w64) ** 2) / np.sum((x @ w64) ** 2)

    plain = np.asarray(gptq_weight(w, as32(xtx), 256, spec, (0,))[0].dequantize(), np.float64)
    assert error_vs_float(got) < 0.5 * error_vs_float(plain)  # the drift is corrected, not just rounding
    assert result.error == pytest.approx(error_vs_float(got), rel=1e-3)
    rtn = np.asarray(jquant.quantize(w, spec).dequantize(), np.float64)
    assert result.rtn_error == pytest.approx(error_vs_float(rtn), rel=1e-3)
    # With the same inputs in both models the target is W itself: plain GPTQ, bit for bit.
    same_inputs = gptq_weight(w, as32(ref_xtx), 256, spec, (0,), reference=(as32(ref_xtx), as32(ref_xtx)))[0]
    unchanged = gptq_weight(w, as32(ref_xtx), 256, spec, (0,))[0]
    np.testing.assert_array_equal(np.asarray(same_inputs.q), np.asarray(unchanged.q))


# --- whole models -----------------------------------------------------------------------------

def test_gptq_on_a_flax_apply_returns_a_quantize_params_tree():
    model = Mlp(hidden=64, outputs=32, activation=nn.gelu)
    *batches, (held_out,) = correlated_batches(11, 5, 32, 32)  # one input distribution
    params = model.init(jax.random.key(0), batches[0][0])
    policy = Policy([Rule(r".*kernel", QuantSpec(3, symmetric=False, channel_axes=(1,), group_size=16))])
    tree, errors = jquant.ptq.gptq(model.apply, params, policy, batches, progress=False)
    rtn = jquant.quantize_params(params, policy)
    assert jax.tree_util.tree_structure(tree, is_leaf=paths.is_qarray) == \
        jax.tree_util.tree_structure(rtn, is_leaf=paths.is_qarray)
    assert isinstance(tree["params"]["Dense_0"]["kernel"], jquant.QArray)
    assert tree["params"]["Dense_0"]["bias"] is params["params"]["Dense_0"]["bias"]
    assert set(errors) == {"params/Dense_0/kernel", "params/Dense_1/kernel"}
    assert all(e.error < e.rtn_error for e in errors.values())
    x = held_out
    ref = model.apply(params, x)

    def error(t):
        return float(jnp.mean((model.apply(jquant.dequantize_params(t), x) - ref) ** 2))

    assert error(tree) < 0.8 * error(rtn)


def test_sequential_gptq_sees_the_quantized_earlier_layers():
    params, batches = tanh_mlp_params(12), correlated_batches(14, 2, 64, 16)
    policy = Policy([Rule("w.", QuantSpec(3, channel_axes=(1,)))])
    seq = jquant.ptq.gptq(tanh_mlp, params, policy, batches, progress=False).params
    par = jquant.ptq.gptq(tanh_mlp, params, policy, batches, progress=False, sequential=False).params
    np.testing.assert_array_equal(np.asarray(seq["w1"].dequantize()), np.asarray(par["w1"].dequantize()))
    assert not np.array_equal(np.asarray(seq["w2"].dequantize()), np.asarray(par["w2"].dequantize()))


def test_float_target_corrects_the_earlier_layers_error_on_a_rotated_3bit_mlp():
    """A GELU MLP (K = 128 and 256), 3-bit g128 with a Hadamard rotation: fitting each weight to
    the float model's output lowers the held-out output error against the float model (with
    calibration rows ≫ K: the correction is a least-squares fit of the weight)."""
    params = {"w1": normal(30, (128, 256), scale=128 ** -0.5), "w2": normal(31, (256, 128), scale=256 ** -0.5)}

    def fn(p, x):
        return jax.nn.gelu(x @ p["w1"]) @ p["w2"]

    *batches, (held_out,) = correlated_batches(33, 9, 512, 128)
    policy = Policy([Rule("w.", QuantSpec(3, symmetric=False, channel_axes=(1,), group_size=128,
                                          rotation=jquant.Hadamard()))])
    plain = jquant.ptq.gptq(fn, params, policy, batches, progress=False)
    fitted = jquant.ptq.gptq(fn, params, policy, batches, float_target=True, progress=False)
    np.testing.assert_array_equal(np.asarray(fitted.params["w1"].q), np.asarray(plain.params["w1"].q))
    ref = fn(params, held_out)

    def error(tree):
        return float(jnp.sum((fn(jquant.dequantize_params(tree), held_out) - ref) ** 2) / jnp.sum(ref ** 2))

    assert error(fitted.params) < 0.85 * error(plain.params)
    assert fitted.errors["w2"].error < plain.errors["w2"].rtn_error
    with pytest.raises(ValueError, match="float_target=True needs sequential=True"):
        jquant.ptq.gptq(fn, params, policy, batches, float_target=True, sequential=False, progress=False)


def test_float_target_warns_about_too_few_calibration_rows():
    params, batches = tanh_mlp_params(12), correlated_batches(14, 2, 16, 16)  # 32 rows < 4·K = 64
    policy = Policy([Rule("w.", QuantSpec(3, channel_axes=(1,)))])
    with pytest.warns(UserWarning, match=r"w. has 32 calibration rows for K = 16 inputs") as record:
        jquant.ptq.gptq(tanh_mlp, params, policy, batches, float_target=True, progress=False)
    assert [str(w.message).split()[3] for w in record] == ["w1", "w2"]


def test_gptq_errors_name_the_path():
    def fn(p, tokens):
        return p["embedding"][tokens] @ p["kernel"]

    params = {"embedding": normal(0, (10, 8)), "kernel": normal(1, (8, 4))}
    batches = [(jnp.arange(5),)]
    with pytest.raises(ValueError, match=r"embedding: GPTQ .* never contracts it .*gather"):
        jquant.ptq.gptq(fn, params, Policy([Rule(".*", QuantSpec(4))]), batches, progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        jquant.ptq.gptq(fn, params, Policy([Rule("kernel", QuantSpec(4))]), [], progress=False)
    quantized = jquant.quantize_params(params, Policy([Rule("kernel", QuantSpec(4))]))
    with pytest.raises(TypeError, match="kernel: GPTQ takes float params"):
        jquant.ptq.gptq(fn, quantized, Policy([Rule("kernel", QuantSpec(4))]), batches, progress=False)
    with pytest.raises(ValueError, match=r"kernel: GPTQ: .*does not fit shape \(8, 4\): .*group_size=3 does not divide"):
        jquant.ptq.gptq(fn, params, Policy([Rule("kernel", QuantSpec(4, channel_axes=(1,), group_size=3))]), batches,
                        progress=False)
    with pytest.raises(ValueError, match="damp"):
        gptq_weight(params["kernel"], jnp.eye(8), 8, QuantSpec(4), (0,), damp=0.0)


def test_gptq_on_an_nnx_call():
    graphdef, state = nnx.split(NnxMlp(32, 64, 16, nnx.Rngs(0)))

    def fn(state, x):
        return nnx.merge(graphdef, state)(x)

    policy = Policy([Rule(r".*kernel", QuantSpec(4, channel_axes=(1,)))])
    tree, errors = jquant.ptq.gptq(fn, state, policy, correlated_batches(18, 2, 32, 32), progress=False)
    assert isinstance(tree["hidden"]["kernel"].get_value(), jquant.QArray)
    assert set(errors) == {"hidden/kernel", "out/kernel"} and all(e.error < e.rtn_error for e in errors.values())
