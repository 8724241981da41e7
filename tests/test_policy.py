"""Rule / Policy: matching, hashing, inspection tools, presets.

(Invalid rules and policies: tests/test_validation.py; leaf paths: tests/test_paths.py.)
"""

import jax
import jax.numpy as jnp
import pytest

import jquant
from jquant import Policy, QuantSpec, Rule

from helpers import Mlp


@pytest.fixture(scope="module")
def params():
    return Mlp(hidden=32, outputs=4).init(jax.random.key(0), jnp.ones((1, 16)))  # params/Dense_0, params/Dense_1


def test_first_match_wins_and_fullmatch(params):
    policy = Policy([Rule(r".*_1/kernel", None), Rule(r".*kernel", QuantSpec(8)), Rule(r"kernel", QuantSpec(4))])
    assert policy.rule_for("params/Dense_1/kernel")[0] == 0
    assert policy.rule_for("params/Dense_0/kernel")[0] == 1
    assert policy.rule_for("params/Dense_0/kernel_extra") is None  # fullmatch, not search
    assignments = dict(policy.assignments(params))
    assert assignments == {"params/Dense_0/bias": None, "params/Dense_0/kernel": 1,
                           "params/Dense_1/bias": None, "params/Dense_1/kernel": 0}
    assert policy.unmatched_rules(params) == [policy.rules[2]]  # shadowed by rule 1
    text = policy.explain(params)
    assert "params/Dense_1/kernel: rule 0" in text and "unused: Rule('kernel'" in text


def test_policy_is_hashable_and_a_static_jit_argument(params):
    a = Policy([Rule(r".*kernel", QuantSpec(8, channel_axes=(-1,)))])
    b = Policy((Rule(r".*kernel", QuantSpec(8, channel_axes=(-1,))),))
    assert a == b and hash(a) == hash(b)
    assert len(repr(a)) < 120
    fn = jax.jit(jquant.fake_quant_params, static_argnums=1)
    out = fn(params, a)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)


def test_presets_match_kernels_only(params):
    for policy in (jquant.int8_weights(), jquant.int4_weights(group_size=8), jquant.w8a8()):
        assigned = dict(policy.assignments(params))
        # rules 0 and 1 are the 3-D attention kernels' (tests/test_flax.py), 2 every other kernel
        assert assigned["params/Dense_0/kernel"] == 2 and assigned["params/Dense_0/bias"] is None
    assert jquant.w8a8().rules[0].act == QuantSpec(8)
    emb = jquant.int8_weights(embeddings=True)
    assert emb.rule_for("params/Embed_0/embedding")[1].spec.channel_axes == (0,)


def test_rank_guarded_and_optional_rules():
    policy = Policy([Rule(r"(.*/)?out/kernel", QuantSpec(8, channel_axes=(0, -1)), ndim=3, optional=True),
                     Rule(r"(.*/)?kernel", QuantSpec(8, channel_axes=(-1,)))])
    assert policy.rule_for("attn/out/kernel", 3)[0] == 0
    assert policy.rule_for("mlp/out/kernel", 2)[0] == 1
    assert policy.rule_for("attn/out/kernel")[0] == 1  # rank unknown: a guarded rule does not match
    two_d = {"mlp": {"out": {"kernel": jnp.ones((8, 4))}}}
    assert jquant.quantize_params(two_d, policy)["mlp"]["out"]["kernel"].scale.shape == (1, 4)
    assert policy.unmatched_rules(two_d) == []  # optional, and another rule matched
    with pytest.warns(UserWarning, match=r"2 policy rule\(s\) matched no float leaf"):  # nothing matched at all
        jquant.quantize_params({"w": jnp.ones((8, 4))}, policy)
    assert "ndim=3, optional=True" in repr(policy.rules[0])


def test_rules_match_the_whole_path_as_given():
    policy = Policy([Rule(r"Dense_0/kernel", QuantSpec(8)), Rule(r"(.*/)?Dense_1/kernel", QuantSpec(4))])
    assert policy.rule_for("Dense_0/kernel")[0] == 0
    assert policy.rule_for("params/Dense_0/kernel") is None  # no prefix is implied
    assert policy.rule_for("params/Dense_1/kernel")[0] == 1 and policy.rule_for("Dense_1/kernel")[0] == 1


def test_one_rule_is_a_policy_and_a_quantized_tree_says_so():
    policy = Policy(Rule(r"w", QuantSpec(8)))
    assert policy == Policy([Rule(r"w", QuantSpec(8))])
    quantized = jquant.quantize_params({"w": jnp.ones((4, 8))}, policy)
    with pytest.warns(UserWarning, match=r"matched no float leaf: Rule\('w'.*it matches 'w', already a QArray"):
        jquant.quantize_params(quantized, policy)
