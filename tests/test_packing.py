"""jquant.packing (sub-byte storage) against a NumPy bit-layout reference, and QArray storage size."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jquant import QuantSpec
from jquant._src import packing

from helpers import jit_quantize

SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=9)


def _pack_reference(codes, bits):
    """The documented layout in NumPy: each row of the last axis is a little-endian bit stream;
    bit t of element j sits at stream position b·j + t = bit (p mod 8) of byte (p div 8); the
    final byte's unused bits are 0; 0-d packs as shape (1,)."""
    codes = np.atleast_1d(np.asarray(codes, np.int64))
    n = codes.shape[-1]
    out = np.zeros(codes.shape[:-1] + (math.ceil(n * bits / 8),), np.int64)
    for j in range(n):
        for t in range(bits):
            p = bits * j + t
            out[..., p // 8] |= ((codes[..., j] >> t) & 1) << (p % 8)
    return out.astype(np.uint8)


@functools.partial(jax.jit, static_argnums=1)
def _pack_and_unpack(codes, bits):
    """Pack, and unpack what was packed, in one compiled program (one compilation per shape)."""
    packed = packing.pack(codes, bits)
    return packed, packing.unpack(packed, bits, codes.shape)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([1, 2, 3, 4]), SHAPES, st.data())
def test_pack_unpack_round_trip_and_layout(bits, shape, data):
    codes = data.draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, 2 ** bits - 1)))
    packed, unpacked = _pack_and_unpack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8
    expected_shape = (shape[:-1] + (math.ceil(shape[-1] * bits / 8),)) if shape else (1,)
    assert packed.shape == expected_shape == packing.packed_shape(shape, bits)
    np.testing.assert_array_equal(np.asarray(packed), _pack_reference(codes, bits))
    assert unpacked.shape == shape
    np.testing.assert_array_equal(np.asarray(unpacked), codes)


def test_pack_eager_odd_lengths():
    for bits in (1, 2, 3, 4):
        for n in (1, 3, 7, 9):
            codes = np.arange(n * 2).reshape(2, n) % 2 ** bits
            packed = packing.pack(jnp.asarray(codes), bits)
            np.testing.assert_array_equal(np.asarray(packed), _pack_reference(codes, bits))
            np.testing.assert_array_equal(np.asarray(packing.unpack(packed, bits, (2, n))), codes)


def test_packed_bits_and_limits():
    assert [packing.is_packed(b) for b in range(1, 9)] == [True] * 4 + [False] * 4
    for bits in (0, 9):
        with pytest.raises(ValueError, match=rf"bits={bits} out of range for storage; allowed: 1\.\.8"):
            packing.is_packed(bits)
    for bits in (5, 8):
        with pytest.raises(ValueError, match=rf"bits={bits}: pack handles 1\.\.4 \(5\.\.8 are stored unpacked"):
            packing.pack(jnp.zeros((4,), jnp.uint8), bits)


@pytest.fixture(scope="module")
def kernel():
    return jnp.asarray(np.random.default_rng(0).standard_normal((1024, 1024)), jnp.float32)


def _qarrays(kernel, bits_list, **kw):
    return {b: jit_quantize(kernel, QuantSpec(b, channel_axes=(1,), **kw)) for b in bits_list}


def test_storage_size_per_channel(kernel):
    qa = _qarrays(kernel, [8, 4, 3, 2])
    assert qa[4].nbytes <= 0.55 * qa[8].nbytes
    assert qa[3].nbytes <= 0.42 * qa[8].nbytes
    assert qa[2].nbytes <= 0.30 * qa[8].nbytes
    for q in qa.values():
        # nbytes counts what is really stored: integer storage + scales (+ zero points)
        leaves = jax.tree_util.tree_leaves(q)
        assert q.nbytes == sum(leaf.nbytes for leaf in leaves)
        assert q.bits_per_weight == 8 * q.nbytes / q.size
        assert q.size == 1024 * 1024
    # value storage alone: b/8 bytes per weight
    assert qa[8].value.nbytes == 1024 * 1024
    assert qa[4].value.nbytes == 1024 * 1024 // 2
    assert qa[3].value.nbytes == 1024 * 1024 * 3 // 8
    assert qa[2].value.nbytes == 1024 * 1024 // 4


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_value_dtype_and_bits_per_weight(bits, symmetric):
    x = jnp.asarray(np.random.default_rng(bits).standard_normal((6, 10)), jnp.float32)
    spec = QuantSpec(bits, symmetric=symmetric, channel_axes=(0,), group_size=5)
    qa = jit_quantize(x, spec)
    if bits <= 4:
        assert qa.value.dtype == jnp.uint8
        assert qa.value.shape == packing.packed_shape((6, 10), bits)
    else:
        assert qa.value.dtype == jnp.int8
        assert qa.value.shape == (6, 10)
    value_bytes = 6 * math.ceil(10 * bits / 8) if bits <= 4 else 60
    n_scales = 6 * 2
    expected_bytes = value_bytes + 4 * n_scales + (0 if symmetric else n_scales)  # f32 scale, int8 z
    assert qa.nbytes == expected_bytes
    assert qa.bits_per_weight == pytest.approx(8 * expected_bytes / 60)
    # unpacking gives back signed integers in range
    q = np.asarray(qa.q)
    assert q.dtype == np.int8 and q.shape == (6, 10)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax


def test_sign_is_one_bit_per_weight_plus_scales():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((64, 33)), jnp.float32)
    qa = jit_quantize(x, QuantSpec(1, method="sign", channel_axes=(0,)))
    assert qa.value.dtype == jnp.uint8 and qa.value.shape == (64, 5)  # ceil(33 / 8)
    np.testing.assert_array_equal(np.asarray(qa.q), np.where(np.asarray(x) >= 0, 1, -1))
    assert qa.bits_per_weight == pytest.approx(8 * (64 * 5 + 4 * 64) / (64 * 33))
