"""jquant.ptq AWQ / SmoothQuant: scales folded into params leave the float function unchanged,
and make quantization lose less."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant._src import paths
import jquant.ptq
from jquant import Policy, QuantSpec, Rule
from jquant._src.ptq.folding import fold_groups

D = 32


def _layer_norm(x, p):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.var(x, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def _block(p, x):
    h = _layer_norm(x, p["ln1"])
    q, k, v = h @ p["q"]["kernel"], h @ p["k"]["kernel"], h @ p["v"]["kernel"]
    x = x + jax.nn.softmax(q @ k.T / np.sqrt(D)) @ v @ p["o"]["kernel"]
    h = _layer_norm(x, p["ln2"])
    u = jax.nn.gelu(h @ p["up"]["kernel"] + p["up"]["bias"])
    return x + u @ p["down"]["kernel"]


def _params(seed):
    rng = np.random.default_rng(seed)

    def w(*shape):
        return jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32)

    return {"ln1": {"scale": jnp.asarray(1 + 3 * rng.random(D), jnp.float32), "bias": w(D)},
            "ln2": {"scale": jnp.asarray(1 + rng.random(D), jnp.float32), "bias": w(D)},
            "q": {"kernel": w(D, D)}, "k": {"kernel": w(D, D)}, "v": {"kernel": w(D, D)}, "o": {"kernel": w(D, D)},
            "up": {"kernel": w(D, 4 * D), "bias": w(4 * D)}, "down": {"kernel": w(4 * D, D)}}


def _batches(seed, n, rows=32):
    rng = np.random.default_rng(seed)
    channel_scale = np.ones(D)
    channel_scale[:3] = 20.0  # activation outliers in a few channels, as in real transformers
    return [(jnp.asarray(rng.standard_normal((rows, D)) * channel_scale, jnp.float32),) for _ in range(n)]


POLICY = Policy([Rule(r".*kernel", QuantSpec(3, symmetric=False, channel_axes=(1,), group_size=16))])


def test_fold_groups_find_norms_and_report_what_cannot_fold():
    params = _params(0)
    leaves = {paths.path_to_str(p): i
              for i, (p, _) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0])}
    wanted = {leaves[f"{n}/kernel"] for n in ("q", "k", "v", "o", "up", "down")}
    groups = {tuple(sorted(leaf for leaf, _ in g.weights)): g for g in fold_groups(_block, params, _batches(1, 1)[0],
                                                                                   wanted)}
    qkv = groups[tuple(sorted(leaves[f"{n}/kernel"] for n in "qkv"))]
    assert sorted(qkv.folds) == sorted([(leaves["ln1/scale"], 0), (leaves["ln1/bias"], 0)])
    assert sorted(groups[(leaves["up/kernel"],)].folds) == sorted([(leaves["ln2/scale"], 0), (leaves["ln2/bias"], 0)])
    assert groups[(leaves["o/kernel"],)].folds == () and groups[(leaves["o/kernel"],)].reason
    assert groups[(leaves["down/kernel"],)].folds == ()


def test_fold_into_the_previous_linear_and_its_bias():
    def fn(p, x):
        return (x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"]

    rng = np.random.default_rng(2)
    params = {"a": {"kernel": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
                    "bias": jnp.asarray(rng.standard_normal(16), jnp.float32)},
              "b": {"kernel": jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)}}
    x = jnp.asarray(rng.standard_normal((64, 8)) * np.linspace(0.1, 10, 8), jnp.float32)
    smoothed, _ = jquant.ptq.smoothquant(fn, params, Policy([Rule("b/kernel", QuantSpec(8))]), [(x,)])
    np.testing.assert_allclose(np.asarray(fn(smoothed, x)), np.asarray(fn(params, x)), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(smoothed["a"]["kernel"]), np.asarray(params["a"]["kernel"]))
    assert not np.allclose(np.asarray(smoothed["a"]["bias"]), np.asarray(params["a"]["bias"]))


def test_awq_keeps_the_function_and_beats_round_to_nearest():
    params, batches = _params(3), _batches(4, 5)
    *calibration, (held_out,) = batches
    with pytest.warns(UserWarning, match=r"2 weight\(s\) not scaled.*o/kernel.*down/kernel"):
        scaled, errors = jquant.ptq.awq(_block, params, POLICY, calibration)
    np.testing.assert_allclose(np.asarray(_block(scaled, held_out)), np.asarray(_block(params, held_out)),
                               rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(_block(params, held_out)))))
    assert set(errors) == {"q/kernel", "k/kernel", "v/kernel", "up/kernel"}
    assert all(awq <= rtn for awq, rtn in errors.values())
    assert any(awq < 0.8 * rtn for awq, rtn in errors.values())
    reference = _block(params, held_out)

    def error(tree):
        return float(jnp.mean((_block(jquant.dequantize_params(tree), held_out) - reference) ** 2))

    assert error(jquant.quantize_params(scaled, POLICY)) < error(jquant.quantize_params(params, POLICY))


def test_smoothquant_balances_activation_and_weight_ranges():
    params, batches = _params(5), _batches(6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        smoothed, errors = jquant.ptq.smoothquant(_block, params, POLICY, batches, alpha=0.5)
    x = np.concatenate([np.asarray(b[0]) for b in batches])
    h_before = np.asarray(_layer_norm(jnp.asarray(x), params["ln1"]))
    h_after = np.asarray(_layer_norm(jnp.asarray(x), smoothed["ln1"]))
    w_after = np.max([np.abs(np.asarray(smoothed[n]["kernel"])).max(1) for n in "qkv"], axis=0)
    w_before = np.max([np.abs(np.asarray(params[n]["kernel"])).max(1) for n in "qkv"], axis=0)
    # α = 1/2: both sides end at √(max|X| · max|W|) per channel
    balanced = np.sqrt(np.abs(h_before).max(0) * w_before)
    np.testing.assert_allclose(np.abs(h_after).max(0), balanced, rtol=1e-3)
    np.testing.assert_allclose(w_after, balanced, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(_block(smoothed, batches[0][0])), np.asarray(_block(params, batches[0][0])),
                               rtol=1e-4, atol=1e-3)


def test_scaling_rejects_bad_options():
    with pytest.raises(ValueError, match="grid"):
        jquant.ptq.awq(_block, _params(0), POLICY, _batches(0, 1), grid=0)
    with pytest.raises(ValueError, match="alpha"):
        jquant.ptq.smoothquant(_block, _params(0), POLICY, _batches(0, 1), alpha=1.5)
    with pytest.raises(ValueError, match="batches is empty"):
        jquant.ptq.awq(_block, _params(0), POLICY, [])
