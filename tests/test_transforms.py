"""quantize_params / dequantize_params / fake_quant_params on Flax and plain trees.

(Errors naming the leaf path and rule, NaN/Inf weights, a policy that is not a Policy:
tests/test_validation.py; the report of a quantized tree: tests/test_report.py.)
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jquant
from jquant._src import paths
from jquant import Policy, QuantSpec, Rule
from jquant._src.paths import is_qarray


class Block(nn.Module):
    """A small pre-norm transformer block: attention (DenseGeneral kernels) and an MLP."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=128)(h, h)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(128)(nn.gelu(nn.Dense(512)(h)))


@pytest.fixture(scope="module")
def model_and_params():
    model = Block()
    x = jax.random.normal(jax.random.key(1), (2, 16, 128))
    params = model.init(jax.random.key(0), x)
    return model, params, x


def _kernels(tree):
    return {p: l for p, l in paths.leaves_with_paths(tree) if p.endswith("kernel")}


def test_int8_per_channel_keeps_the_block_function(model_and_params):
    model, params, x = model_and_params
    qparams = jquant.quantize_params(params, jquant.int8_weights())
    assert all(is_qarray(k) for k in _kernels(qparams).values()) and len(_kernels(qparams)) == 6
    y = model.apply(params, x)
    yq = jax.jit(model.apply)(jquant.dequantize_params(qparams), x)
    cos = jnp.sum(y * yq) / (jnp.linalg.norm(y) * jnp.linalg.norm(yq))
    assert cos >= 0.9995
    # quantization did change the function
    assert float(jnp.max(jnp.abs(y - yq))) > 0


def test_structure_dtypes_and_untouched_leaves(model_and_params):
    _, params, _ = model_and_params
    tree = {"params": params["params"], "step": jnp.array(7, jnp.int32), "ema": jnp.ones((4,), jnp.bfloat16)}
    policy = Policy([Rule(r".*query/kernel", None), Rule(r".*", QuantSpec(8))])
    qtree = jquant.quantize_params(tree, policy)
    flat_in = paths.leaves_with_paths(tree)
    flat_out = dict(paths.leaves_with_paths(qtree))
    for path, leaf in flat_in:
        out = flat_out[path]
        if path.endswith("query/kernel") or path == "step":
            assert out is leaf  # None rule and non-float leaves stay exactly as they were
        else:
            assert is_qarray(out), path
    back = jquant.dequantize_params(qtree)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for (path, a), (_, b) in zip(flat_in, paths.leaves_with_paths(back)):
        assert a.shape == b.shape and a.dtype == b.dtype, path


def test_fake_quant_params_matches_quantize_then_dequantize_and_has_gradients(model_and_params):
    model, params, x = model_and_params
    policy = jquant.int4_weights(group_size=32)
    fq = jax.jit(jquant.fake_quant_params, static_argnums=1)(params, policy)
    dq = jquant.dequantize_params(jquant.quantize_params(params, policy))
    for (p, a), (_, b) in zip(paths.leaves_with_paths(fq), paths.leaves_with_paths(dq)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(jquant.fake_quant_params(p, policy), x) ** 2)))(params)
    for path, g in _kernels(grads).items():
        assert float(jnp.sum(jnp.abs(g))) > 0, path


def test_under_jit_nan_is_not_inspected_but_propagates():
    bad = {"kernel": jnp.ones((4, 8)).at[1, 2].set(jnp.nan)}
    q = jax.jit(jquant.quantize_params, static_argnums=1)(bad, jquant.int8_weights())
    out = np.asarray(q["kernel"].dequantize())
    assert np.isnan(out[:, 2]).all() and np.isfinite(np.delete(out, 2, axis=1)).all()


def test_unused_rule_warns():
    params = {"dense": {"kernel": jnp.ones((4, 4))}}
    policy = Policy([Rule(r".*kernal", QuantSpec(8))])
    with pytest.warns(UserWarning, match="matched no float leaf"):
        jquant.quantize_params(params, policy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jquant.quantize_params(params, policy, warn_unused=False)
