"""Validation battery: every bad spec, tree or operand raises ValueError/TypeError whose message
names the parameter (or the leaf path, where a tree is involved), the value given and what is
allowed. One table, one test; a new check is one more row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import Policy, QuantSpec, Rule

from helpers import DN


def _tree(kernel):
    return {"encoder": {"dense": {"kernel": kernel, "bias": jnp.zeros(kernel.shape[-1:])}}}


def _quantize_tree(kernel, spec):
    return lambda: jquant.quantize_params(_tree(kernel), Policy([Rule(r".*kernel", spec)]))


def _qa(shape, spec, seed=0):
    return jquant.quantize(jax.random.normal(jax.random.key(seed), shape), spec)


def _dot(lhs, rhs, dn=DN, **kwargs):
    return lambda: jquant.dot_general(lhs(), rhs(), dn, **kwargs)


NAN_KERNEL = jnp.ones((4, 8)).at[1, 2].set(jnp.nan)
INF_KERNEL = jnp.ones((4, 8)).at[3, 0].set(-jnp.inf).at[0, 0].set(jnp.inf)
X = jnp.ones((4, 16))

CASES = {
    # --- a spec that does not fit a leaf of a tree: leaf path, rule, field, allowed ------------
    "group size does not divide": (_quantize_tree(jnp.ones((100, 8)), QuantSpec(4, channel_axes=(-1,), group_size=64)),
                                   ValueError, ["encoder/dense/kernel: rule 0", "group_size=64",
                                                "does not divide axis 0 of size 100", "divisor of 100"]),
    "channel axis out of range": (_quantize_tree(jnp.ones((4, 8)), QuantSpec(8, channel_axes=(2,))), ValueError,
                                  ["encoder/dense/kernel", "channel_axes=2", "allowed: -2..1"]),
    "negative channel axis out of range": (_quantize_tree(jnp.ones((4, 8)), QuantSpec(8, channel_axes=(-3,))),
                                           ValueError, ["encoder/dense/kernel", "channel_axes=-3", "-2..1"]),
    "group axis out of range": (_quantize_tree(jnp.ones((4, 8)), QuantSpec(4, group_size=2, group_axis=3)),
                                ValueError, ["encoder/dense/kernel", "group_axis=3", "allowed: -2..1"]),
    "every axis a channel axis": (_quantize_tree(jnp.ones((4, 8)), QuantSpec(4, channel_axes=(0, 1), group_size=2)),
                                  ValueError, ["encoder/dense/kernel", "group_size=2", "channel axis"]),
    "channel axis of a 0-d leaf": (lambda: jquant.quantize_params({"scalar": jnp.ones(())},
                                                                  Policy([Rule("scalar", QuantSpec(8, channel_axes=0))])),
                                   ValueError, ["scalar", "channel_axes=0", "0-d"]),
    "policy not a Policy": (lambda: jquant.quantize_params(_tree(jnp.ones((4, 8))), [Rule(".*", QuantSpec())]),
                            TypeError, ["policy", "jquant.Policy", "list"]),
    "invalid regex": (lambda: Rule("(.*kernel", QuantSpec()), ValueError,
                      ["Rule.pattern '(.*kernel'", "not a valid regular expression"]),
    "pattern not a string": (lambda: Rule(3, QuantSpec()), TypeError, ["Rule.pattern", "str"]),
    "rule rank not an int": (lambda: Rule(".*", QuantSpec(), ndim="3"), TypeError, ["Rule.ndim", "int ≥ 0", "'3'"]),
    "rule spec not a QuantSpec": (lambda: Rule(".*", {"bits": 8}), TypeError, ["Rule.spec", "QuantSpec or None"]),
    "policy of non-rules": (lambda: Policy([(".*", QuantSpec())]), TypeError, ["Policy rule 0", "jquant.Rule"]),
    "policy of a non-rule": (lambda: Policy(3), TypeError, ["Policy takes a Rule or a list of Rules", "int"]),
    "quantize a QArray": (lambda: jquant.quantize(jquant.quantize(X, QuantSpec(8)), QuantSpec(4)), TypeError,
                          ["quantize expects a float array", "QArray", "dequantize"]),
    "fake_quant a QArray": (lambda: jquant.fake_quant(jquant.quantize(X, QuantSpec(8)), QuantSpec(4)), TypeError,
                            ["fake_quant expects a float array", "QArray"]),
    "a QArray as a float array": (lambda: jnp.dot(X, jquant.quantize(X.T, QuantSpec(8))), TypeError,
                                  ["QArray was given where a float array is needed", "dequantize", "jquant.flax.quantize"]),
    "a QArray to NumPy": (lambda: np.asarray(jquant.quantize(X, QuantSpec(8))), TypeError,
                          ["QArray was given where a float array is needed"]),

    # --- NaN / Inf in weights: the leaf path and the count -------------------------------------
    "NaN in a weight": (lambda: jquant.quantize_params(_tree(NAN_KERNEL), jquant.int8_weights()), ValueError,
                        ["encoder/dense/kernel: 1 non-finite", "NaN/Inf"]),
    "Inf in a weight": (lambda: jquant.quantize_params(_tree(INF_KERNEL), jquant.int8_weights()), ValueError,
                        ["encoder/dense/kernel", "2 non-finite", "NaN/Inf"]),
    "NaN in a weight under jit": (lambda: jquant.checked(lambda t: jquant.quantize_params(t, jquant.int8_weights()))(
        _tree(NAN_KERNEL)), ValueError, ["encoder/dense/kernel", "1 non-finite", "NaN/Inf"]),

    # --- quantize / fake_quant arguments -------------------------------------------------------
    **{f"{dtype} input": (lambda dtype=dtype: jquant.quantize(jnp.ones((4, 4), dtype), QuantSpec()), TypeError,
                          ["quantize expects a float array", f"got dtype {dtype}"])
       for dtype in ("int32", "int8", "uint8", "bool")},
    "spec not a QuantSpec": (lambda: jquant.quantize(X, 8), TypeError, ["quantize", "spec", "jquant.QuantSpec", "int"]),
    "fake_quant spec not a QuantSpec": (lambda: jquant.fake_quant(X, {"bits": 8}), TypeError,
                                        ["fake_quant", "jquant.QuantSpec", "dict"]),
    "fixed scale of the wrong shape": (lambda: jquant.quantize(X, QuantSpec(8, channel_axes=(1,)), scale=jnp.ones(3)),
                                       ValueError, ["scale of shape (3,)", "scale shape (1, 16)", "(4, 16)"]),
    "fixed zero-point out of range": (lambda: jquant.quantize(X, QuantSpec(4, symmetric=False), scale=0.1,
                                                              zero_point=9), ValueError,
                                      ["zero_point", "integers in [-8, 7]", "9"]),
    "fixed zero-point not an integer": (lambda: jquant.quantize(X, QuantSpec(4, symmetric=False), scale=0.1,
                                                                zero_point=1.5), ValueError, ["zero_point", "1.5"]),
    "fixed zero-point of the wrong shape": (
        lambda: jquant.quantize(X, QuantSpec(4, symmetric=False, channel_axes=(0,)), scale=0.1,
                                zero_point=jnp.zeros((3, 1), jnp.int8)),
        ValueError, ["zero_point of shape (3, 1)", "scale shape (4, 1)"]),
    "zero-point for a symmetric spec": (lambda: jquant.quantize(X, QuantSpec(8), scale=0.1, zero_point=0),
                                        ValueError, ["zero_point", "symmetric"]),
    "zero-point without a scale": (lambda: jquant.quantize(X, QuantSpec(8, symmetric=False), zero_point=0),
                                   ValueError, ["zero_point", "without scale"]),
    "fixed scale without the zero-point of an asymmetric spec": (
        lambda: jquant.quantize(X, QuantSpec(8, symmetric=False), scale=0.1), ValueError,
        ["a fixed scale for QuantSpec(bits=8, symmetric=False)", "needs a zero_point"]),
    "codebook of the wrong shape": (lambda: jquant.quantize(X, QuantSpec(2, method="kmeans"), scale=jnp.ones(4)),
                                    ValueError, ["fixed codebook", "shape (1, 1, 4)", "got (4,)"]),

    # --- incompatible dot_general operands -----------------------------------------------------
    "contracted sizes differ": (_dot(lambda: _qa((4, 16), QuantSpec(8)), lambda: _qa((8, 3), QuantSpec(8))),
                                ValueError, ["lhs axis 1 (size 16)", "rhs axis 0 (size 8)", "differ in size"]),
    "scale varies along the contraction": (
        _dot(lambda: _qa((4, 16), QuantSpec(8, channel_axes=(1,))), lambda: _qa((16, 3), QuantSpec(8))),
        ValueError, ["lhs scale varies along a contracted axis", "per-channel on a free axis"]),
    "rhs scale varies along the contraction": (
        _dot(lambda: _qa((4, 16), QuantSpec(8)), lambda: _qa((16, 3), QuantSpec(8, channel_axes=(0,)))),
        ValueError, ["rhs scale varies along a contracted axis",
                     "QuantSpec(bits=8, channel_axes=(0,)) on shape (16, 3)"]),
    "groups do not line up": (
        _dot(lambda: _qa((4, 16), QuantSpec(8, channel_axes=(0,), group_size=8, group_axis=1)),
             lambda: _qa((16, 3), QuantSpec(8, channel_axes=(1,), group_size=4))),
        ValueError, ["groups do not line up", "same group size"]),
    "groups on a free axis": (
        _dot(lambda: _qa((4, 16), QuantSpec(8, group_size=2, group_axis=0)), lambda: _qa((16, 3), QuantSpec(8))),
        ValueError, ["lhs is grouped along axis 0", "not contracted", "along a contracting axis"]),
    "codebook operand on the integer path": (  # two QArrays: dot_general takes the integer path
        _dot(lambda: _qa((4, 16), QuantSpec(8)), lambda: _qa((16, 3), QuantSpec(2, method="kmeans"))),
        ValueError, ["int_dot_general: rhs uses method='kmeans'", "no integer grid", "integer formats: uniform"]),
    "float operand on the integer path": (lambda: jquant.int_dot_general(X, _qa((16, 3), QuantSpec(8)), DN),
                                          TypeError, ["int_dot_general", "lhs must be a QArray"]),
    "dimension number out of range": (
        _dot(lambda: _qa((4, 16), QuantSpec(8)), lambda: _qa((16, 3), QuantSpec(8)), (((2,), (0,)), ((), ()))),
        ValueError, ["dimension_numbers", "lhs axis 2", "rank 2", "allowed: -2..1"]),
    "dimension numbers repeat an axis": (
        _dot(lambda: _qa((4, 16), QuantSpec(8)), lambda: _qa((16, 16), QuantSpec(8)), (((1, 1), (0, 1)), ((), ()))),
        ValueError, ["dimension_numbers", "lhs names an axis twice"]),
    "dimension numbers of unequal length": (
        _dot(lambda: _qa((4, 16), QuantSpec(8)), lambda: _qa((16, 3), QuantSpec(8)), (((1,), ()), ((), ()))),
        ValueError, ["dimension_numbers", "different numbers of axes"]),
    "spec for a QArray operand": (_dot(lambda: _qa((4, 16), QuantSpec(8)), lambda: jnp.ones((16, 3)),
                                       lhs_spec=QuantSpec(8)), ValueError, ["lhs_spec given", "already a QArray"]),
    "operand spec that does not fit": (
        _dot(lambda: X, lambda: _qa((16, 3), QuantSpec(8, channel_axes=(1,))),
             lhs_spec=QuantSpec(8, channel_axes=(0,), group_size=5)),
        ValueError, ["dot_general: lhs of shape (4, 16)", "lhs_spec=", "group_size=5", "divisor of 16"]),
    "integer output type": (_dot(lambda: _qa((4, 16), QuantSpec(8)), lambda: _qa((16, 3), QuantSpec(8)),
                                 preferred_element_type=jnp.int32), ValueError,
                            ["preferred_element_type=int32", "float dtype", "int_dot_general"]),
    "int32 accumulator could overflow": (
        lambda: jquant.int_dot_general(jquant.quantize(jnp.ones((1, 33_026)), QuantSpec(8, symmetric=False)),
                                       jquant.quantize(jnp.ones((33_026, 1)), QuantSpec(8, symmetric=False)), DN),
        ValueError, ["int32 accumulator could overflow", "K=33026", "255", "allowed: K ≤ 33025", "group_size"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_a_message_that_names_it(name):
    call, error, fragments = CASES[name]
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{missing} not in: {message}"


def test_zero_point_under_jit_is_clipped_not_wrapped():
    # Values are unknown under jit, so an out-of-range zero-point cannot raise; it saturates at the
    # grid's end instead of wrapping around in the int8 cast (200 would become -56).
    x = jnp.linspace(-1.0, 1.0, 8)
    spec = QuantSpec(4, symmetric=False)
    qa = jax.jit(lambda z: jquant.quantize(x, spec, scale=0.1, zero_point=z))(jnp.asarray(200))
    assert int(qa.zero_point.reshape(())) == spec.qmax
    np.testing.assert_array_equal(np.asarray(qa.q), np.asarray(jquant.quantize(x, spec, scale=0.1, zero_point=7).q))


def test_valid_inputs_pass():
    # the edges of each allowed range are accepted
    for kwargs in (dict(bits=2), dict(bits=8, symmetric=False), dict(bits=1, method="sign"), dict(bits=1, method="kmeans"),
                   dict(bits=4, method="kmeans"), dict(bits=4, method="nf4")):
        QuantSpec(**kwargs)
    jquant.quantize(X, QuantSpec(4, symmetric=False), scale=0.1, zero_point=-8)
    jquant.quantize(X, QuantSpec(4, symmetric=False), scale=0.1, zero_point=7.0)
    # the largest K the int32 accumulator takes: test_dot.py::test_largest_contraction_that_fits_is_exact
