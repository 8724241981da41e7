"""search_policy: an exact knapsack over measured sensitivities, within the budget."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import QuantSpec
from jquant._src.ptq.search import _knapsack


@pytest.mark.parametrize("seed", range(5))
def test_knapsack_is_exact_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    items = [tuple(None if rng.random() < 0.15 else (int(rng.integers(1, 40)), float(rng.random()))
                   for _ in range(3)) for _ in range(5)]
    items = [item if any(o is not None for o in item) else ((5, 1.0),) + item[1:] for item in items]
    budget = int(rng.integers(30, 120))
    best = None
    for combo in itertools.product(*[range(len(item)) for item in items]):
        options = [item[j] for item, j in zip(items, combo)]
        if any(o is None for o in options) or sum(o[0] for o in options) > budget:
            continue
        value = sum(o[1] for o in options)
        best = value if best is None or value < best else best
    if best is None:
        with pytest.raises(ValueError):
            _knapsack(items, budget, ["x"] * len(items))
        return
    chosen = _knapsack(items, budget, ["x"] * len(items))
    assert sum(items[i][j][0] for i, j in enumerate(chosen)) <= budget
    assert sum(items[i][j][1] for i, j in enumerate(chosen)) == pytest.approx(best)


def _mlp(p, x):
    h = jnp.tanh(x @ p["a"]["kernel"])
    h = jnp.tanh(h @ p["b"]["kernel"])
    return h @ p["c"]["kernel"]


def _setup():
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": jnp.asarray(rng.standard_normal((32, 128)) / 6, jnp.float32)},
              "b": {"kernel": jnp.asarray(rng.standard_normal((128, 128)) / 11, jnp.float32)},
              "c": {"kernel": jnp.asarray(rng.standard_normal((128, 8)) / 11, jnp.float32)}}
    batches = [(jnp.asarray(rng.standard_normal((64, 32)), jnp.float32),) for _ in range(2)]
    return params, batches


CANDIDATES = [QuantSpec(8, channel_axes=(1,)), QuantSpec(4, channel_axes=(1,), group_size=32),
              QuantSpec(2, method="kmeans", channel_axes=(1,))]


def test_searched_policy_fits_the_budget_and_beats_uniform_policies():
    params, batches = _setup()
    policy, table = jquant.ptq.search_policy(_mlp, params, batches, 4.0, CANDIDATES)
    assert table.bits_per_weight <= 4.0 and table.bytes <= table.budget_bytes
    assert [r.pattern for r in policy.rules] == ["a/kernel", "b/kernel", "c/kernel"]
    tree = jquant.quantize_params(params, policy)
    stored = sum(tree[n]["kernel"].nbytes for n in "abc")
    assert stored == table.bytes
    reference = [_mlp(params, *b) for b in batches]

    def distortion(p):
        p = jquant.dequantize_params(p)
        return sum(float(jquant.ptq.relative_mse(_mlp(p, *b), r)) for b, r in zip(batches, reference))

    searched = distortion(tree)
    compared = 0
    # every uniform policy within the same budget (here only 2-bit k-means: 4-bit g32 takes 5 bits)
    for spec in CANDIDATES:
        uniform = jquant.quantize_params(params, jquant.Policy([jquant.Rule(r".*kernel", spec)]))
        if sum(uniform[n]["kernel"].nbytes for n in "abc") <= table.budget_bytes:
            assert searched <= distortion(uniform)
            compared += 1
    assert compared == 1 and len({r.chosen for r in table.rows}) > 1  # really mixed
    assert "chosen" in str(table) and "bits/weight" in str(table)


def test_search_errors_are_clear():
    params, batches = _setup()
    with pytest.raises(ValueError, match="below the smallest choice"):
        jquant.ptq.search_policy(_mlp, params, batches, 0.5, CANDIDATES)
    with pytest.raises(ValueError, match="matches no float leaf"):
        jquant.ptq.search_policy(_mlp, params, batches, 4.0, CANDIDATES, include="nothing")
    with pytest.raises(ValueError, match=r"a/kernel: none of the candidates fits"):
        jquant.ptq.search_policy(_mlp, params, batches, 4.0, [QuantSpec(4, channel_axes=(1,), group_size=64)])
    with pytest.raises(ValueError, match="batches is empty"):
        jquant.ptq.search_policy(_mlp, params, [], 4.0, CANDIDATES)
