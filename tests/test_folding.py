"""jquant.ptq folding: which norms and linears a per-input-channel scale folds into (found in any
JAX function's jaxpr), what cannot fold and why, and folds into a previous linear and its bias."""

import jax
import jax.numpy as jnp
import numpy as np

import jquant.ptq
from jquant import Policy, QuantSpec, Rule
from jquant._src import paths
from jquant._src.ptq.folding import fold_groups

from helpers import block_params, outlier_batches, transformer_block as block


def test_fold_groups_find_norms_and_report_what_cannot_fold():
    params = block_params(0)
    leaves = {paths.path_to_str(p): i
              for i, (p, _) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0])}
    wanted = {leaves[f"{n}/kernel"] for n in ("q", "k", "v", "o", "up", "down")}
    groups = {tuple(sorted(leaf for leaf, _ in g.weights)): g
              for g in fold_groups(block, params, outlier_batches(1, 1)[0], wanted)}
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
