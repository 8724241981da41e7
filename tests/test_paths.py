"""Leaf paths: keys joined with "/", array-like boxes (NNX Variables) add no name, one helper puts
the path into errors."""

import jax.numpy as jnp
import pytest
from flax import nnx

import jquant
from jquant import Policy, QuantSpec, Rule
from jquant._src import paths


class Block(nnx.Module):
    def __init__(self):
        self.attn = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
        self.layers = nnx.List([nnx.Linear(8, 8, rngs=nnx.Rngs(i)) for i in range(2)])


def test_a_box_adds_no_name_so_a_state_and_its_plain_tree_have_the_same_paths():
    state = nnx.state(Block(), nnx.Param)
    plain = {"attn": {"bias": jnp.zeros(8), "kernel": jnp.zeros((8, 8))},
             "layers": [{"bias": jnp.zeros(8), "kernel": jnp.zeros((8, 8))} for _ in range(2)]}
    names = [p for p, _ in paths.leaves_with_paths(state)]
    assert names == [p for p, _ in paths.leaves_with_paths(plain)]
    assert names == ["attn/bias", "attn/kernel", "layers/0/bias", "layers/0/kernel", "layers/1/bias",
                     "layers/1/kernel"]
    assert [full for _, full, _ in paths.boxed_leaves(state)][0] == "attn/bias/value"


def test_map_with_paths_keeps_the_boxes():
    state = nnx.state(Block(), nnx.Param)
    quantized = jquant.quantize_params(state, Policy([Rule(r"layers/1/kernel", QuantSpec(8))]))
    assert isinstance(quantized["layers"][1]["kernel"], nnx.Variable)
    assert isinstance(quantized["layers"][1]["kernel"].get_value(), jquant.QArray)
    assert not isinstance(quantized["layers"][0]["kernel"].get_value(), jquant.QArray)


def test_at_path_names_the_leaf_once_and_keeps_the_type():
    err = paths.at_path("a/kernel", TypeError("bad"), "rule 0: ")
    assert isinstance(err, TypeError) and str(err) == "a/kernel: rule 0: bad"
    assert paths.at_path("a/kernel", err) is err
    with pytest.raises(ValueError, match=r"^dense/kernel: rule 0 .* does not fit shape \(4, 8\)"):
        jquant.quantize_params({"dense": {"kernel": jnp.ones((4, 8))}},
                               Policy([Rule(".*kernel", QuantSpec(4, group_size=3))]))
