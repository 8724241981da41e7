"""QuantSpec: validation messages, hashability (jit static argument), short repr, integer range."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jquant
from jquant import MSE, Percentile, QuantSpec

import reference


@pytest.mark.parametrize("kwargs, field, allowed, error", [
    (dict(bits=0), "bits", "2..8", ValueError),
    (dict(bits=9), "bits", "2..8", ValueError),
    (dict(bits=-3), "bits", "2..8", ValueError),
    (dict(bits=1), "bits", "method='sign'", ValueError),            # 1-bit uniform: points to sign
    (dict(bits=8.0), "bits", "int", TypeError),
    (dict(bits="8"), "bits", "int", TypeError),
    (dict(bits=5, method="kmeans"), "bits", "too large for method='kmeans' (2^bits levels per group); allowed: 1..4",
     ValueError),
    (dict(bits=0, method="kmeans"), "bits", "out of range", ValueError),
    (dict(bits=3, method="nf4"), "bits", "method='nf4'; NormalFloat-4 is 4-bit (bits=4)", ValueError),
    (dict(symmetric="False"), "symmetric", "True or False", TypeError),
    (dict(bits=1, method="sign", calibration=Percentile(99.0)), "calibration", "method='uniform'", ValueError),
    (dict(bits=True), "bits", "int", TypeError),
    (dict(bits=2, method="sign"), "bits", "bits=1", ValueError),
    (dict(bits=1, method="sign", symmetric=False), "symmetric", "symmetric", ValueError),
    (dict(bits=2, method="kmeans", symmetric=False), "symmetric", "no zero-point", ValueError),
    (dict(method="ternary"), "method", "uniform, sign", ValueError),
    (dict(method=4), "method", "uniform, sign", TypeError),
    (dict(group_size=0), "group_size", "positive", ValueError),
    (dict(group_size=-4), "group_size", "positive", ValueError),
    (dict(group_size=2.5), "group_size", "positive int", TypeError),
    (dict(group_axis=0), "group_axis", "group_size", ValueError),
    (dict(group_size=2, group_axis=1, channel_axes=(1,)), "group_axis", "channel axis", ValueError),
    (dict(group_size=2, group_axis=-1, channel_axes=-1), "group_axis", "channel axis", ValueError),
    (dict(group_size=2, group_axis=1.0), "group_axis", "int", TypeError),
    (dict(channel_axes=(0, 0)), "channel_axes", "repeated", ValueError),
    (dict(channel_axes=(0, 1.5)), "channel_axes", "ints", TypeError),
    (dict(channel_axes=None), "channel_axes", "tuple of ints", TypeError),
    (dict(bits=4, symmetric=False, midrise=True), "midrise", "symmetric=True", ValueError),
    (dict(bits=1, method="sign", midrise=True), "midrise", "symmetric uniform", ValueError),
    (dict(bits=3, method="kmeans", calibration=MSE()), "calibration", "method='uniform'", ValueError),
    (dict(bits=8, calibration="mse"), "calibration", "MinMax()", TypeError),
])
def test_bad_spec_raises_naming_field_and_allowed(kwargs, field, allowed, error):
    with pytest.raises(error) as info:
        QuantSpec(**kwargs)
    message = str(info.value)
    assert f"QuantSpec.{field}" in message
    assert allowed in message
    value = kwargs.get(field)
    if value is not None and not isinstance(value, tuple):
        assert repr(value) in message or str(value) in message  # the value given is echoed


@pytest.mark.parametrize("shape, kwargs, fragments", [
    ((4, 4), dict(channel_axes=(2,)), ["QuantSpec.channel_axes=2", "-2..1"]),
    ((4, 4), dict(channel_axes=(-3,)), ["QuantSpec.channel_axes=-3", "-2..1"]),
    ((), dict(channel_axes=(0,)), ["QuantSpec.channel_axes=0", "0-d"]),
    ((4, 4), dict(channel_axes=(1, -1)), ["QuantSpec.channel_axes", "same axis"]),
    ((4, 6), dict(group_size=4), ["QuantSpec.group_size=4", "size 6", "divisor of 6"]),
    ((4, 6), dict(group_size=3, group_axis=0), ["QuantSpec.group_size=3", "size 4", "divisor of 4"]),
    ((4, 6), dict(group_size=2, group_axis=2), ["QuantSpec.group_axis=2", "-2..1"]),
    ((4, 6), dict(group_size=2, group_axis=-1, channel_axes=(1,)), ["QuantSpec.group_axis=-1", "channel axis"]),
    ((4, 6), dict(group_size=2, channel_axes=(0, 1)), ["QuantSpec.group_size=2", "channel axis"]),
])
def test_spec_that_does_not_fit_the_tensor_raises_in_quantize(shape, kwargs, fragments):
    spec = QuantSpec(**kwargs)  # valid on its own
    with pytest.raises(ValueError) as info:
        jquant.quantize(jnp.zeros(shape), spec)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_channel_axes_int_is_normalized_to_tuple():
    assert QuantSpec(channel_axes=1).channel_axes == (1,)
    assert QuantSpec(channel_axes=1) == QuantSpec(channel_axes=(1,))
    assert QuantSpec(channel_axes=[0, 2]).channel_axes == (0, 2)
    assert hash(QuantSpec(channel_axes=[0, 2])) == hash(QuantSpec(channel_axes=(0, 2)))


def test_frozen():
    spec = QuantSpec(8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 4


VALID_SPECS = st.one_of(
    st.builds(QuantSpec, bits=st.integers(2, 8), symmetric=st.booleans(),
              channel_axes=st.lists(st.integers(-3, 2), unique=True, max_size=2).map(tuple),
              group_size=st.none() | st.integers(1, 256)),
    st.builds(QuantSpec, bits=st.just(1), method=st.just("sign"),
              channel_axes=st.lists(st.integers(0, 2), unique=True, max_size=2).map(tuple)),
    st.builds(QuantSpec, bits=st.integers(2, 8), channel_axes=st.just((0,)), group_size=st.integers(1, 64),
              group_axis=st.integers(1, 3)),
)


@settings(max_examples=60, deadline=None)
@given(VALID_SPECS)
def test_hashable_and_repr_round_trips_on_one_short_line(spec):
    copy = QuantSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})
    assert copy == spec and hash(copy) == hash(spec) and copy is not spec
    assert len({spec, copy}) == 1
    text = repr(spec)
    assert "\n" not in text and len(text) <= 100
    assert eval(text, {"QuantSpec": QuantSpec}) == spec


def test_specs_with_calibration_and_midrise_are_hashable_with_a_short_repr():
    spec = QuantSpec(4, midrise=True, channel_axes=(1,), group_size=16, calibration=MSE(num_ratios=30, norm=2.4))
    assert hash(spec) == hash(QuantSpec(4, midrise=True, channel_axes=(1,), group_size=16,
                                        calibration=MSE(num_ratios=30, norm=2.4)))
    assert "MSE(num_ratios=30" in repr(spec) and "midrise=True" in repr(spec)


def test_repr_shows_only_non_defaults():
    assert repr(QuantSpec()) == "QuantSpec(bits=8)"
    text = repr(QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=32))
    assert text == "QuantSpec(bits=4, symmetric=False, channel_axes=(1,), group_size=32)"


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_integer_range(bits, symmetric):
    spec = QuantSpec(bits, symmetric=symmetric)
    assert (spec.qmin, spec.qmax) == reference.qrange(bits, symmetric)
    assert spec.integer_magnitude == (spec.qmax if symmetric else spec.qmax - spec.qmin)
    assert (QuantSpec(1, method="sign").qmin, QuantSpec(1, method="sign").qmax) == (-1, 1)


def test_spec_is_a_jit_static_argument():
    traces = []

    def dequantized(x, spec):
        traces.append(spec)
        return jquant.quantize(x, spec).dequantize()

    run = jax.jit(dequantized, static_argnums=1)
    x = jnp.linspace(-1.0, 1.0, 16)
    a = run(x, QuantSpec(4, channel_axes=()))
    b = run(x, QuantSpec(4))  # equal spec, new object: cached, no retrace
    assert len(traces) == 1
    assert bool(jnp.all(a == b))
    c = run(x, QuantSpec(2))  # a different spec retraces and changes the result
    assert len(traces) == 2
    assert not bool(jnp.all(a == c))
    assert bool(jnp.all(a == jquant.quantize(x, QuantSpec(4)).dequantize()))
