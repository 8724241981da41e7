"""Rule / Policy: matching, validation, hashing, inspection tools, presets."""

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

import jquant
from jquant._src import paths
from jquant import Policy, QuantSpec, Rule
from jquant._src.paths import path_to_str


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, name="hidden")(x))
        return nn.Dense(4, name="out")(x)


@pytest.fixture(scope="module")
def params():
    return Mlp().init(jax.random.key(0), jnp.ones((1, 16)))


def test_invalid_regex_fails_at_construction():
    with pytest.raises(ValueError, match=r"not a valid regular expression"):
        Rule("(.*kernel", QuantSpec(8))


def test_first_match_wins_and_fullmatch(params):
    policy = Policy([Rule(r".*out/kernel", None), Rule(r".*kernel", QuantSpec(8)), Rule(r"kernel", QuantSpec(4))])
    assert policy.rule_for("params/out/kernel")[0] == 0
    assert policy.rule_for("params/hidden/kernel")[0] == 1
    assert policy.rule_for("params/hidden/kernel_extra") is None  # fullmatch, not search
    assignments = dict(policy.assignments(params))
    assert assignments == {"params/hidden/bias": None, "params/hidden/kernel": 1,
                           "params/out/bias": None, "params/out/kernel": 0}
    assert policy.unmatched_rules(params) == [policy.rules[2]]  # shadowed by rule 1
    text = policy.explain(params)
    assert "params/out/kernel: rule 0" in text and "unused: Rule('kernel'" in text


def test_policy_is_hashable_and_a_static_jit_argument(params):
    a = Policy([Rule(r".*kernel", QuantSpec(8, channel_axes=(-1,)))])
    b = Policy((Rule(r".*kernel", QuantSpec(8, channel_axes=(-1,))),))
    assert a == b and hash(a) == hash(b)
    assert len(repr(a)) < 120
    fn = jax.jit(jquant.fake_quant_params, static_argnums=1)
    out = fn(params, a)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)


def test_paths_of_nested_containers_and_nnx_values():
    tree = {"a": [jnp.ones(2), (jnp.ones(3),)], "b": {"c": jnp.ones(1)}}
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    assert [path_to_str(p) for p, _ in flat] == ["a/0", "a/1/0", "b/c"]
    from flax import nnx
    state = nnx.state(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    assert sorted(p for p, _ in paths.leaves_with_paths(state)) == ["bias", "kernel"]


def test_presets_match_kernels_only(params):
    for policy in (jquant.int8_weights(), jquant.int4_weights(group_size=8), jquant.w8a8()):
        assigned = dict(policy.assignments(params))
        assert assigned["params/hidden/kernel"] == 0 and assigned["params/hidden/bias"] is None
    assert jquant.w8a8().rules[0].act == QuantSpec(8)
    emb = jquant.int8_weights(embeddings=True)
    assert emb.rule_for("params/Embed_0/embedding")[1].spec.channel_axes == (0,)


def test_leading_params_collection_is_optional():
    policy = Policy([Rule(r"Dense_0/kernel", QuantSpec(8))])
    assert policy.rule_for("params/Dense_0/kernel")[0] == 0
    assert policy.rule_for("Dense_0/kernel")[0] == 0
    assert policy.rule_for("other/Dense_0/kernel") is None
