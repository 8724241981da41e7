"""jquant.ptq: finding weights' inputs in any JAX function, and GPTQ against a NumPy reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant._src import paths
import jquant.ptq
from jquant import Policy, QuantSpec, Rule
from jquant._src.ptq.capture import find_sites, statistics_program
from jquant._src.ptq.gptq import gptq_weight


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _correlated_batches(seed, n, rows, dim):
    mix = _normal(seed, (dim, dim))
    return [(_normal(seed + 1 + i, (rows, dim)) @ mix,) for i in range(n)]


# --- capture ----------------------------------------------------------------------------------

def test_sites_follow_weights_through_transposes_einsum_and_nested_calls():
    params = {"a": _normal(0, (8, 16)), "b": _normal(1, (4, 16)), "c": _normal(2, (16, 3, 5)),
              "emb": _normal(3, (10, 8))}

    @jax.jit
    def inner(x, w):  # a nested pjit
        return x @ w.T

    def fn(p, x, tokens):
        h = jnp.einsum("bi,io->bo", x + p["emb"][tokens], p["a"])
        g = jax.nn.relu(inner(h, p["b"].T.T))
        return jnp.tensordot(jnp.concatenate([g, g, g, g], axis=1), p["c"], axes=[[1], [0]])

    leaves = jax.tree_util.tree_leaves(params)  # order: a, b, c, emb
    sites, other = find_sites(fn, params, (_normal(4, (2, 8)), jnp.arange(2)), range(4))
    assert [s.weight_axes for s in sites[0]] == [(0,)]
    assert [s.weight_axes for s in sites[1]] == [(1,)]  # x @ w.T contracts the weight's axis 1
    assert [s.weight_axes for s in sites[2]] == [(0,)]
    assert 3 not in sites and "gather" in " ".join(other[3])
    assert len(leaves) == 4


def test_input_statistics_are_x_transpose_x_over_all_batches_and_sites():
    params = {"w": _normal(0, (6, 4))}

    def fn(p, x, y):
        return jnp.sum(x @ p["w"]) + jnp.sum(jnp.einsum("bsi,io->bso", y, p["w"]))

    batches = [(_normal(1, (5, 6)), _normal(2, (2, 3, 6))), (_normal(3, (4, 6)), _normal(4, (1, 2, 6)))]
    stats = statistics_program(fn, params, {0: (0,)})(params, batches)[0]
    rows = np.concatenate([np.asarray(b[0], np.float64) for b in batches]
                          + [np.asarray(b[1], np.float64).reshape(-1, 6) for b in batches])
    np.testing.assert_allclose(np.asarray(stats.xtx), rows.T @ rows, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(stats.abs_sum), np.abs(rows).sum(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.abs_max), np.abs(rows).max(0), rtol=1e-6)
    assert stats.rows == rows.shape[0]


# --- GPTQ on one weight, against NumPy float64 ------------------------------------------------

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
    w = _normal(0, (32, 12))
    x = np.asarray(_correlated_batches(1, 1, 200, 32)[0][0], np.float64)
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
], ids=repr)
def test_gptq_beats_round_to_nearest_for_every_spec(spec, act_order):
    w = _normal(5, (64, 24))
    x = np.asarray(_correlated_batches(6, 1, 256, 64)[0][0], np.float64)
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
    w = _normal(7, (64, 8))
    x = np.asarray(_correlated_batches(8, 1, 128, 64)[0][0], np.float64)
    spec = QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=16)
    qa = gptq_weight(w, jnp.asarray(x.T @ x, jnp.float32), 128, spec, (0,))[0]
    rtn = jquant.quantize(w, spec)
    np.testing.assert_array_equal(np.asarray(qa.scale)[0], np.asarray(rtn.scale)[0])
    assert not np.array_equal(np.asarray(qa.scale)[1:], np.asarray(rtn.scale)[1:])


def test_dead_inputs_get_zero_weights():
    w = _normal(9, (16, 4))
    x = np.asarray(_normal(10, (64, 16)), np.float64)
    x[:, 3] = 0
    qa = gptq_weight(w, jnp.asarray(x.T @ x, jnp.float32), 64, QuantSpec(4, channel_axes=(1,)), (0,))[0]
    assert np.all(np.asarray(qa.dequantize())[3] == 0)
    assert np.all(np.isfinite(np.asarray(qa.dequantize())))


# --- GPTQ on whole models ---------------------------------------------------------------------

class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(64)(x))
        return nn.Dense(32)(x)


def test_gptq_on_a_flax_apply_returns_a_quantize_params_tree():
    model = _MLP()
    *batches, (held_out,) = _correlated_batches(11, 5, 32, 32)  # one input distribution
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
    def fn(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    params = {"w1": _normal(12, (16, 16), 0.3), "w2": _normal(13, (16, 8), 0.3)}
    batches = _correlated_batches(14, 2, 64, 16)
    policy = Policy([Rule("w.", QuantSpec(3, channel_axes=(1,)))])
    seq = jquant.ptq.gptq(fn, params, policy, batches, progress=False).params
    par = jquant.ptq.gptq(fn, params, policy, batches, progress=False, sequential=False).params
    np.testing.assert_array_equal(np.asarray(seq["w1"].dequantize()), np.asarray(par["w1"].dequantize()))
    assert not np.array_equal(np.asarray(seq["w2"].dequantize()), np.asarray(par["w2"].dequantize()))


def test_gptq_errors_name_the_path():
    def fn(p, tokens):
        return p["embedding"][tokens] @ p["kernel"]

    params = {"embedding": _normal(0, (10, 8)), "kernel": _normal(1, (8, 4))}
    batches = [(jnp.arange(5),)]
    with pytest.raises(ValueError, match=r"embedding: GPTQ .* never contracts it .*gather"):
        jquant.ptq.gptq(fn, params, Policy([Rule(".*", QuantSpec(4))]), batches, progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        jquant.ptq.gptq(fn, params, Policy([Rule("kernel", QuantSpec(4))]), [], progress=False)
    quantized = jquant.quantize_params(params, Policy([Rule("kernel", QuantSpec(4))]))
    with pytest.raises(TypeError, match="kernel: GPTQ takes float params"):
        jquant.ptq.gptq(fn, quantized, Policy([Rule("kernel", QuantSpec(4))]), batches, progress=False)
    with pytest.raises(ValueError, match="damp"):
        gptq_weight(params["kernel"], jnp.eye(8), 8, QuantSpec(4), (0,), damp=0.0)


def test_per_layer_errors_show_in_the_report():
    def fn(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    params = {"w1": _normal(15, (16, 16), 0.3), "w2": _normal(16, (16, 8), 0.3)}
    policy = Policy([Rule("w.", QuantSpec(4, channel_axes=(1,)))])
    tree, errors = jquant.ptq.gptq(fn, params, policy, _correlated_batches(17, 2, 64, 16), progress=False)
    rep = jquant.report(params, tree, policy, errors=errors)
    assert [r.output_error for r in rep.rows] == [errors["w1"].error, errors["w2"].error]
    assert "output error" in str(rep)


def test_gptq_on_an_nnx_call():
    from flax import nnx

    class Mlp(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(32, 64, rngs=rngs), nnx.Linear(64, 16, rngs=rngs)

        def __call__(self, x):
            return self.b(jax.nn.relu(self.a(x)))

    graphdef, state = nnx.split(Mlp(nnx.Rngs(0)))

    def fn(state, x):
        return nnx.merge(graphdef, state)(x)

    policy = Policy([Rule(r".*kernel", QuantSpec(4, channel_axes=(1,)))])
    tree, errors = jquant.ptq.gptq(fn, state, policy, _correlated_batches(18, 2, 32, 32), progress=False)
    assert isinstance(tree["a"]["kernel"].get_value(), jquant.QArray)
    assert set(errors) == {"a/kernel", "b/kernel"} and all(e.error < e.rtn_error for e in errors.values())
