"""Property-based tests (hypothesis) of promises that span the formats, extending the
example-based tests:

* error bound with a fixed (calibrated) scale: |x̂ - x| ≤ s/2 for x inside the clip range;
* idempotence: quantizing x̂ again with the same scale (and zero-point, codebook) changes nothing;
* storage: a QArray's integers survive packing for every bit width, shape and method.

(Properties of one module live with it: the integer dot with any dimension numbers in
tests/test_dot.py, the STE's clip mask in tests/test_ste.py.)

Example counts come from the hypothesis profile (tests/conftest.py: "ci" by default,
HYPOTHESIS_PROFILE=thorough for more). Shapes are drawn from small sets so that the number of
XLA compilations stays bounded.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jquant
from jquant import QuantSpec
from jquant._src import packing
from jquant._src import numerics

from helpers import COMPILING, fixed_ranges, per_element, quantize_jit, uniform_specs
from reference import as_f64

SHAPES = [(8,), (3, 8), (4, 6), (2, 3, 4)]


@given(st.sampled_from(SHAPES).flatmap(lambda s: st.tuples(st.just(s), uniform_specs(s))), st.data())
def test_error_is_at_most_half_a_step_inside_the_clip_range(shape_spec, data):
    shape, spec = shape_spec
    scale, zero_point = data.draw(fixed_ranges(shape, spec))
    s, z = per_element(scale, zero_point, shape, spec)
    # the clip range [s(Qmin - z + offset) - s/2, s(Qmax - z + offset) + s/2] (mid-tread: a half step rounds
    # back in; mid-rise: floor keeps [s·Qmin, s·(Qmax+1)) ), sampled as a fraction of it
    u = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(0.0, 1.0)))
    if spec.midrise:
        lo, hi = s * spec.qmin, s * (spec.qmax + 1)
    else:
        lo, hi = s * (spec.qmin - z - 0.5), s * (spec.qmax - z + 0.5)
    x = jnp.asarray(lo + u * (hi - lo), jnp.float32)
    _, q, x_hat = quantize_jit(x, spec, scale, zero_point)
    err = np.abs(as_f64(x_hat) - as_f64(x))
    # float32: x·(1/s) is within ~2 ulp of x/s, and x̂ = s·(q - z) rounds once
    slack = 4 * np.finfo(np.float32).eps * (np.abs(as_f64(x)) + s * (2 ** spec.bits))
    assert np.all(err <= s / 2 + slack), f"max excess {np.max(err - s / 2)} at q={np.asarray(q)[np.argmax(err - s / 2)]}"
    assert np.all((spec.qmin <= np.asarray(q)) & (np.asarray(q) <= spec.qmax))


ALL_METHODS = st.sampled_from(["symmetric", "asymmetric", "midrise", "sign", "kmeans", "nf4"])


def _any_spec(kind, bits, shape):
    channel = dict(channel_axes=(0,)) if len(shape) > 1 else {}
    return {
        "symmetric": QuantSpec(bits, **channel), "asymmetric": QuantSpec(bits, symmetric=False, **channel),
        "midrise": QuantSpec(bits, midrise=True, **channel), "sign": QuantSpec(1, method="sign", **channel),
        "kmeans": QuantSpec(min(bits, 3), method="kmeans", **channel), "nf4": QuantSpec(4, method="nf4", **channel),
    }[kind]


@functools.partial(jax.jit, static_argnums=1)
def _twice(x, spec):
    first = jquant.quantize(x, spec)
    x_hat = first.dequantize()
    again = jquant.quantize(x_hat, spec, scale=first.scale, zero_point=first.zero_point)
    return first, x_hat, again, again.dequantize()


@given(st.sampled_from(SHAPES), ALL_METHODS, st.integers(2, 8), st.sampled_from(["float32", "float16"]), st.data())
def test_quantizing_a_dequantized_tensor_again_changes_nothing(shape, kind, bits, dtype, data):
    spec = _any_spec(kind, bits, shape)
    x = data.draw(hnp.arrays(np.float32, shape, elements=st.floats(-100, 100, width=32)))
    first, x_hat, again, x_hat2 = _twice(jnp.asarray(x, dtype), spec)
    np.testing.assert_array_equal(as_f64(x_hat2), as_f64(x_hat))
    np.testing.assert_array_equal(np.asarray(again.scale), np.asarray(first.scale))
    if kind not in ("kmeans", "sign"):  # k-means may hold equal levels; sign maps the group's 0.0 to +1 either way
        np.testing.assert_array_equal(np.asarray(again.value), np.asarray(first.value))


@st.composite
def storage_cases(draw):
    bits = draw(st.integers(1, 8))
    shape = tuple(draw(st.lists(st.sampled_from([1, 3, 8, 9]), min_size=0, max_size=3)))
    if bits == 1:
        spec = QuantSpec(1, method="sign")
    elif draw(st.booleans()) and bits <= 4:
        spec = QuantSpec(bits, method="kmeans") if bits < 4 or draw(st.booleans()) else QuantSpec(4, method="nf4")
    else:
        spec = QuantSpec(bits, symmetric=draw(st.booleans()))
    return shape, spec


@COMPILING
@given(storage_cases(), st.integers(0, 2 ** 16))
def test_stored_integers_survive_packing(shape_spec, seed):
    shape, spec = shape_spec
    x = jax.random.normal(jax.random.key(seed), shape) * 3
    qa, q, codes = _storage(x, spec)
    # the integers read back from storage (unpacked for ≤ 4 bits) are the ones quantize computed
    np.testing.assert_array_equal(np.asarray(q), np.asarray(codes))
    if spec.bits <= 4:
        assert qa.value.dtype == jnp.uint8 and qa.value.shape == packing.packed_shape(shape, spec.bits)
        assert qa.nbytes >= math.ceil(math.prod(shape) * spec.bits / 8)
    else:
        assert qa.value.dtype == jnp.int8 and qa.value.shape == shape


@functools.partial(jax.jit, static_argnums=1)
def _storage(x, spec):
    """(QArray, its .q, the integers computed directly without packing)."""
    qa = jquant.quantize(x, spec)
    lay = numerics.layout(x.shape, spec)
    # The format's own integers, straight from the stored scale (no packing in between).
    return qa, qa.q, spec.method.encode(x, spec, lay, qa.scale, qa.zero_point, fixed=True)
