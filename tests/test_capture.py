"""jquant.ptq capture: finding where any JAX function contracts each weight (through transposes,
einsum and nested jits), and the input statistics of those contractions over batches."""

import jax
import jax.numpy as jnp
import numpy as np

from jquant._src.ptq.capture import find_sites, statistics_program

from helpers import normal


def test_sites_follow_weights_through_transposes_einsum_and_nested_calls():
    params = {"a": normal(0, (8, 16)), "b": normal(1, (4, 16)), "c": normal(2, (16, 3, 5)),
              "emb": normal(3, (10, 8))}

    @jax.jit
    def inner(x, w):  # a nested pjit
        return x @ w.T

    def fn(p, x, tokens):
        h = jnp.einsum("bi,io->bo", x + p["emb"][tokens], p["a"])
        g = jax.nn.relu(inner(h, p["b"].T.T))
        return jnp.tensordot(jnp.concatenate([g, g, g, g], axis=1), p["c"], axes=[[1], [0]])

    leaves = jax.tree_util.tree_leaves(params)  # order: a, b, c, emb
    sites, other = find_sites(fn, params, (normal(4, (2, 8)), jnp.arange(2)), range(4))
    assert [s.weight_axes for s in sites[0]] == [(0,)]
    assert [s.weight_axes for s in sites[1]] == [(1,)]  # x @ w.T contracts the weight's axis 1
    assert [s.weight_axes for s in sites[2]] == [(0,)]
    assert 3 not in sites and "gather" in " ".join(other[3])
    assert len(leaves) == 4


def test_input_statistics_are_x_transpose_x_over_all_batches_and_sites():
    params = {"w": normal(0, (6, 4))}

    def fn(p, x, y):
        return jnp.sum(x @ p["w"]) + jnp.sum(jnp.einsum("bsi,io->bso", y, p["w"]))

    batches = [(normal(1, (5, 6)), normal(2, (2, 3, 6))), (normal(3, (4, 6)), normal(4, (1, 2, 6)))]
    stats = statistics_program(fn, params, {0: (0,)})(params, batches)[0]
    rows = np.concatenate([np.asarray(b[0], np.float64) for b in batches]
                          + [np.asarray(b[1], np.float64).reshape(-1, 6) for b in batches])
    np.testing.assert_allclose(np.asarray(stats.xtx), rows.T @ rows, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(stats.abs_sum), np.abs(rows).sum(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.abs_max), np.abs(rows).max(0), rtol=1e-6)
    assert stats.rows == rows.shape[0]


def test_reference_statistics_pair_the_rows_of_both_models_and_only_limits_the_work():
    params = {"w1": normal(5, (6, 8)), "w2": normal(6, (8, 3))}
    reference = {"w1": params["w1"] + 0.1 * normal(7, (6, 8)), "w2": params["w2"]}

    def fn(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    batches = [(normal(8, (5, 6)),), (normal(9, (7, 6)),)]
    statistics = statistics_program(fn, params, {0: (0,), 1: (0,)})
    stats = statistics(params, batches, reference=reference, only={1})
    assert set(stats) == {1}  # leaf 0's products are not computed
    x = np.concatenate([np.asarray(b[0], np.float64) for b in batches])
    h = np.tanh(x @ np.asarray(params["w1"], np.float64))
    h_ref = np.tanh(x @ np.asarray(reference["w1"], np.float64))
    np.testing.assert_allclose(np.asarray(stats[1].xtx), h.T @ h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats[1].cross), h.T @ h_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats[1].reference_xtx), h_ref.T @ h_ref, rtol=1e-5, atol=1e-5)
    assert stats[1].rows == 12 and statistics(params, batches)[1].cross is None
