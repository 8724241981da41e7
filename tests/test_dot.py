"""jquant.dot_general / int_dot_general against NumPy int64 and float64 references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jquant
from jquant import QuantSpec

DN = (((1,), (0,)), ((), ()))
EPS32 = np.finfo(np.float32).eps


def _normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _quantize_and_accumulate(x, w, lspec, rspec):
    """Both operands quantized and integer-multiplied in one compiled program (fast tests)."""
    lq, rq = jquant.quantize(x, lspec), jquant.quantize(w, rspec)
    acc = jquant.int_dot_general(lq, rq, DN)
    return lq, rq, acc, acc.dequantize()


def _grouped_np(qa):
    """q, scale, zero-point of a QArray as float64/int64 NumPy arrays on the grouped view."""
    lay = qa.layout
    q = np.asarray(qa.q, np.int64).reshape(lay.grouped_shape)
    z = np.zeros(lay.scale_shape, np.int64) if qa.zero_point is None else np.asarray(qa.zero_point, np.int64)
    return q, np.asarray(qa.scale, np.float64), z


def _matmul_reference(lq, rq):
    """Exact int64 bracket per rhs group and float64 result, for lhs (M, K) × rhs (K, N)."""
    x = np.asarray(lq.dequantize(), np.float64)
    w = np.asarray(rq.dequantize(), np.float64)
    return x @ w, np.abs(x) @ np.abs(w)


def _assert_float_close(y, lq, rq):
    """|y - x̂ŵ| within float32 rounding of the float64 product: a few eps · Σ|x̂||ŵ|."""
    ref, magnitude = _matmul_reference(lq, rq)
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), 8 * EPS32 * magnitude + 1e-30)


specs_lhs = st.sampled_from([
    QuantSpec(8), QuantSpec(8, channel_axes=(0,)), QuantSpec(8, symmetric=False),
    QuantSpec(8, symmetric=False, channel_axes=(0,)), QuantSpec(4, channel_axes=(0,)),
    QuantSpec(1, method="sign", channel_axes=(0,))])
specs_rhs = st.sampled_from([
    QuantSpec(8, channel_axes=(1,)), QuantSpec(4, channel_axes=(1,)), QuantSpec(3, symmetric=False, channel_axes=(1,)),
    QuantSpec(2, symmetric=False, channel_axes=(1,)), QuantSpec(8), QuantSpec(1, method="sign", channel_axes=(1,))])


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 9), k=st.sampled_from([1, 8, 24, 64]), n=st.integers(1, 9),
       lspec=specs_lhs, rspec=specs_rhs, seed=st.integers(0, 2 ** 16))
def test_int32_accumulator_equals_int64_matmul(m, k, n, lspec, rspec, seed):
    rng = np.random.default_rng(seed)
    lq, rq, acc, y = _quantize_and_accumulate(_normal(rng, (m, k)), _normal(rng, (k, n)), lspec, rspec)
    ql, _, zl = _grouped_np(lq)
    qr, _, zr = _grouped_np(rq)
    expected = (ql - zl) @ (qr - zr)  # zero-points are per row / per column here: broadcast exactly
    assert acc.value.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(acc.value), expected)
    _assert_float_close(y, lq, rq)


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 6), groups=st.integers(1, 4), group_size=st.sampled_from([4, 16, 32]), n=st.integers(1, 6),
       lsym=st.booleans(), rsym=st.booleans(), rbits=st.sampled_from([2, 4, 8]), lgrouped=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_per_group_contraction(m, groups, group_size, n, lsym, rsym, rbits, lgrouped, seed):
    rng = np.random.default_rng(seed)
    k = groups * group_size
    lspec = QuantSpec(8, symmetric=lsym, channel_axes=(0,), group_size=group_size if lgrouped else None)
    rspec = QuantSpec(rbits, symmetric=rsym, channel_axes=(1,), group_size=group_size)
    lq, rq, acc, y = _quantize_and_accumulate(_normal(rng, (m, k)), _normal(rng, (k, n)), lspec, rspec)
    assert acc.value.shape == (groups, m, n) and acc.group_axis == 0
    ql = np.asarray(lq.q, np.int64).reshape(m, groups, group_size)
    qr = np.asarray(rq.q, np.int64).reshape(groups, group_size, n)
    zl = 0 if lq.zero_point is None else np.asarray(lq.zero_point, np.int64).reshape(m, -1, 1)
    zr = 0 if rq.zero_point is None else np.asarray(rq.zero_point, np.int64).reshape(-1, 1, n)
    expected = np.einsum("mgk,gkn->gmn", ql - zl, qr - zr)
    np.testing.assert_array_equal(np.asarray(acc.value), expected)
    _assert_float_close(y, lq, rq)


@pytest.mark.parametrize("k,chunks", [(512, 1), (4096, 8), (1536, 3), (4099, 1), (2 ** 16, 128)])
@pytest.mark.parametrize("lspec,rspec", [
    (QuantSpec(8, channel_axes=(0,)), QuantSpec(8, channel_axes=(1,))),
    (QuantSpec(8, symmetric=False), QuantSpec(4, symmetric=False, channel_axes=(1,))),
])
def test_single_row_split_contraction_is_exact(k, chunks, lspec, rspec):
    """M = 1 takes the chunked path (K cut into batch entries, partial int32 sums added): the
    int32 result equals the int64 product bit for bit, including a K with no usable divisor."""
    from jquant._src.dot import _gemv_chunks
    assert _gemv_chunks(k) == chunks
    rng = np.random.default_rng(k)
    lq, rq, acc, y = _quantize_and_accumulate(_normal(rng, (1, k)), _normal(rng, (k, 5)), lspec, rspec)
    ql, _, zl = _grouped_np(lq)
    qr, _, zr = _grouped_np(rq)
    np.testing.assert_array_equal(np.asarray(acc.value), (ql - zl) @ (qr - zr))
    _assert_float_close(y, lq, rq)


@pytest.mark.parametrize("lhs_shape,rhs_shape,dn,lspec,rspec", [
    # batched matmul: batch axis 0 on both, per-(batch,row) and per-(batch,column) scales
    ((3, 5, 16), (3, 16, 7), (((2,), (1,)), ((0,), (0,))), QuantSpec(8, channel_axes=(0, 1)),
     QuantSpec(8, symmetric=False, channel_axes=(0, 2))),
    # contraction over axis 0 of both (the xᵀ·g weight-gradient layout)
    ((16, 5), (16, 7), (((0,), (0,)), ((), ())), QuantSpec(8, symmetric=False, channel_axes=(1,)),
     QuantSpec(8, channel_axes=(1,))),
    # rhs stored (N, K); lhs with two free axes
    ((2, 5, 32), (7, 32), (((2,), (1,)), ((), ())), QuantSpec(8, symmetric=False, channel_axes=(0, 1)),
     QuantSpec(4, channel_axes=(0,), group_size=8)),
    # vector × matrix, no free lhs axis
    ((32,), (32, 7), (((0,), (0,)), ((), ())), QuantSpec(8), QuantSpec(8, channel_axes=(1,))),
    # two contracted axes (conv-like HWI × O)
    ((4, 3, 3, 2), (3, 3, 2, 5), (((1, 2, 3), (0, 1, 2)), ((), ())), QuantSpec(8, channel_axes=(0,)),
     QuantSpec(8, channel_axes=(3,))),
])
def test_general_dimension_numbers(lhs_shape, rhs_shape, dn, lspec, rspec):
    rng = np.random.default_rng(0)
    lq = jquant.quantize(_normal(rng, lhs_shape), lspec)
    rq = jquant.quantize(_normal(rng, rhs_shape), rspec)
    y = jax.jit(lambda a, b: jquant.dot_general(a, b, dn))(lq, rq)
    x64, w64 = np.asarray(lq.dequantize(), np.float64), np.asarray(rq.dequantize(), np.float64)
    ref = _np_dot_general(x64, w64, dn)
    mag = _np_dot_general(np.abs(x64), np.abs(w64), dn)
    assert y.shape == ref.shape and y.dtype == jnp.float32
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), 8 * EPS32 * mag + 1e-30)


def _np_dot_general(x, w, dn):
    """lax.dot_general semantics in NumPy float64 (einsum with explicit subscripts)."""
    (lc, rc), (lb, rb) = dn
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    ls = [next(letters) for _ in range(x.ndim)]
    rs = [next(letters) for _ in range(w.ndim)]
    for a, b in zip(lc + lb, rc + rb):
        rs[b] = ls[a]
    out = [ls[a] for a in lb] + [ls[a] for a in range(x.ndim) if a not in lc + lb] + \
          [rs[b] for b in range(w.ndim) if b not in rc + rb]
    return np.einsum(f"{''.join(ls)},{''.join(rs)}->{''.join(out)}", x, w)


def test_dynamic_quantization_of_float_operands():
    rng = np.random.default_rng(1)
    x, w = _normal(rng, (6, 32)), _normal(rng, (32, 5))
    lspec, rspec = QuantSpec(8, symmetric=False, channel_axes=(0,)), QuantSpec(4, channel_axes=(1,))
    y = jax.jit(lambda a, b: jquant.dot_general(a, b, DN, lhs_spec=lspec, rhs_spec=rspec))(x, w)
    lq, rq = jquant.quantize(x, lspec), jquant.quantize(w, rspec)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jquant.dot_general(lq, rq, DN)))
    _assert_float_close(y, lq, rq)
    # quantization really changed the result
    assert np.max(np.abs(np.asarray(y) - np.asarray(x @ w))) > 1e-3


def test_weight_only_dequantizes_the_qarray():
    rng = np.random.default_rng(2)
    x = _normal(rng, (4, 32)).astype(jnp.bfloat16)
    rq = jquant.quantize(_normal(rng, (32, 8)).astype(jnp.bfloat16), QuantSpec(4, channel_axes=(1,), group_size=8))
    y = jquant.dot_general(x, rq, DN)
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(jax.lax.dot_general(x, rq.dequantize(), DN), np.float32))
    assert y.dtype == jnp.bfloat16


def test_output_dtype_follows_operands_and_preferred_type():
    rng = np.random.default_rng(3)
    lq = jquant.quantize(_normal(rng, (2, 8)).astype(jnp.bfloat16), QuantSpec(8))
    rq = jquant.quantize(_normal(rng, (8, 3)).astype(jnp.bfloat16), QuantSpec(8))
    assert jquant.dot_general(lq, rq, DN).dtype == jnp.bfloat16
    assert jquant.dot_general(lq, rq, DN, preferred_element_type=jnp.float32).dtype == jnp.float32
    with pytest.raises(ValueError, match="float dtype"):
        jquant.dot_general(lq, rq, DN, preferred_element_type=jnp.int32)


def test_requantize_matches_quantizing_the_float_result():
    rng = np.random.default_rng(4)
    lq = jquant.quantize(_normal(rng, (5, 16)), QuantSpec(8, channel_axes=(0,)))
    rq = jquant.quantize(_normal(rng, (16, 4)), QuantSpec(8, channel_axes=(1,)))
    acc = jquant.int_dot_general(lq, rq, DN)
    out_spec = QuantSpec(8, symmetric=False)
    yq = jquant.requantize(acc, out_spec, scale=0.05, zero_point=3)
    y = np.asarray(acc.dequantize(), np.float64)
    expected = np.clip(np.round(y / np.float64(np.float32(0.05))) + 3, -128, 127)
    ties = np.abs(np.abs(y / 0.05 - np.floor(y / 0.05)) - 0.5) < 1e-4
    assert np.all((np.asarray(yq.q) == expected) | ties)
    assert isinstance(yq, jquant.QArray) and yq.shape == (5, 4)


@pytest.mark.parametrize("lspec,rspec,lhs_shape,rhs_shape,match", [
    (QuantSpec(8, channel_axes=(1,)), QuantSpec(8), (4, 16), (16, 3), "varies along a contracted axis"),
    (QuantSpec(8), QuantSpec(8, channel_axes=(0,)), (4, 16), (16, 3), "varies along a contracted axis"),
    (QuantSpec(8, group_size=8, group_axis=1, channel_axes=(0,)), QuantSpec(8, group_size=4, channel_axes=(1,)),
     (4, 16), (16, 3), "do not line up"),
    (QuantSpec(8, group_size=2, group_axis=0), QuantSpec(8), (4, 16), (16, 3), "not contracted"),
    (QuantSpec(8), QuantSpec(8), (4, 16), (8, 3), "differ in size"),
])
def test_incompatible_operands_raise(lspec, rspec, lhs_shape, rhs_shape, match):
    rng = np.random.default_rng(5)
    lq = jquant.quantize(_normal(rng, lhs_shape), lspec)
    rq = jquant.quantize(_normal(rng, rhs_shape), rspec)
    with pytest.raises(ValueError, match=match):
        jquant.dot_general(lq, rq, DN)


def test_overflow_bound_is_enforced():
    # asymmetric × asymmetric int8: |q - z| ≤ 255, so K = 33,026 gives 33,026·255² ≥ 2^31
    k = 33_026
    lq = jquant.quantize(jnp.ones((1, k)), QuantSpec(8, symmetric=False))
    rq = jquant.quantize(jnp.ones((k, 1)), QuantSpec(8, symmetric=False))
    with pytest.raises(ValueError, match="overflow"):
        jquant.int_dot_general(lq, rq, DN)
    # ... and one less fits, with an exact result
    k -= 1
    lq = jquant.quantize(-jnp.ones((1, k)), QuantSpec(8, symmetric=False))
    rq = jquant.quantize(jnp.ones((k, 1)), QuantSpec(8, symmetric=False))
    acc = jquant.int_dot_general(lq, rq, DN)
    ql, _, zl = _grouped_np(lq)
    qr, _, zr = _grouped_np(rq)
    assert int(acc.value[0, 0]) == int(((ql - zl) @ (qr - zr))[0, 0])


def test_spec_for_a_qarray_operand_is_rejected():
    lq = jquant.quantize(jnp.ones((2, 4)), QuantSpec(8))
    with pytest.raises(ValueError, match="already a QArray"):
        jquant.dot_general(lq, jnp.ones((4, 2)), DN, lhs_spec=QuantSpec(8))
