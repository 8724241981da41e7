"""jquant.dot_general / int_dot_general against NumPy int64 and float64 references.

(Incompatible operands and the accumulator's overflow bound raise: tests/test_validation.py.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jquant
from jquant import QuantSpec

import reference
from helpers import COMPILING, DN, normal, quantize_jit

EPS32 = np.finfo(np.float32).eps


@functools.partial(jax.jit, static_argnums=(2, 3))
def _quantize_and_accumulate(x, w, lspec, rspec):
    """Both operands quantized and integer-multiplied in one compiled program (fast tests): each
    operand as (QArray, its integers q, x̂), the int32 accumulator, and the accumulator dequantized."""
    lq, rq = jquant.quantize(x, lspec), jquant.quantize(w, rspec)
    acc = jquant.int_dot_general(lq, rq, DN)
    return (lq, lq.q, lq.dequantize()), (rq, rq.q, rq.dequantize()), acc, acc.dequantize()


def _grouped_np(operand):
    """q, scale, zero-point of an operand (QArray, q, x̂) as int64/float64 NumPy arrays on the
    grouped view."""
    qa, q, _ = operand
    lay = qa.layout
    q = np.asarray(q, np.int64).reshape(lay.grouped_shape)
    z = np.zeros(lay.scale_shape, np.int64) if qa.zero_point is None else np.asarray(qa.zero_point, np.int64)
    return q, np.asarray(qa.scale, np.float64), z


def _assert_float_close(y, lhs, rhs, dn=DN):
    """|y - x̂ŵ| within float32 rounding of the float64 product: a few eps · Σ|x̂||ŵ| (operands
    (QArray, q, x̂))."""
    x, w = reference.as_f64(lhs[2]), reference.as_f64(rhs[2])
    ref, magnitude = reference.dot_general(x, w, dn), reference.dot_general(np.abs(x), np.abs(w), dn)
    assert y.shape == ref.shape
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), 8 * EPS32 * magnitude + 1e-30)


specs_lhs = st.sampled_from([
    QuantSpec(8), QuantSpec(8, channel_axes=(0,)), QuantSpec(8, symmetric=False),
    QuantSpec(8, symmetric=False, channel_axes=(0,)), QuantSpec(4, channel_axes=(0,)),
    QuantSpec(1, method="sign", channel_axes=(0,))])
specs_rhs = st.sampled_from([
    QuantSpec(8, channel_axes=(1,)), QuantSpec(4, channel_axes=(1,)), QuantSpec(3, symmetric=False, channel_axes=(1,)),
    QuantSpec(2, symmetric=False, channel_axes=(1,)), QuantSpec(8), QuantSpec(1, method="sign", channel_axes=(1,))])


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 9), k=st.sampled_from([1, 8, 24, 64]), n=st.integers(1, 9),
       lspec=specs_lhs, rspec=specs_rhs, seed=st.integers(0, 2 ** 16))
def test_int32_accumulator_equals_int64_matmul(m, k, n, lspec, rspec, seed):
    lhs, rhs, acc, y = _quantize_and_accumulate(normal(seed, (m, k)), normal(seed + 1, (k, n)), lspec, rspec)
    ql, _, zl = _grouped_np(lhs)
    qr, _, zr = _grouped_np(rhs)
    expected = (ql - zl) @ (qr - zr)  # zero-points are per row / per column here: broadcast exactly
    assert acc.value.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(acc.value), expected)
    _assert_float_close(y, lhs, rhs)


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 6), groups=st.integers(1, 4), group_size=st.sampled_from([4, 16, 32]), n=st.integers(1, 6),
       lsym=st.booleans(), rsym=st.booleans(), rbits=st.sampled_from([2, 4, 8]), lgrouped=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_per_group_contraction(m, groups, group_size, n, lsym, rsym, rbits, lgrouped, seed):
    k = groups * group_size
    lspec = QuantSpec(8, symmetric=lsym, channel_axes=(0,), group_size=group_size if lgrouped else None)
    rspec = QuantSpec(rbits, symmetric=rsym, channel_axes=(1,), group_size=group_size)
    lhs, rhs, acc, y = _quantize_and_accumulate(normal(seed, (m, k)), normal(seed + 1, (k, n)), lspec, rspec)
    assert acc.value.shape == (groups, m, n) and acc.group_axis == 0
    (lq, lints, _), (rq, rints, _) = lhs, rhs
    ql = np.asarray(lints, np.int64).reshape(m, groups, group_size)
    qr = np.asarray(rints, np.int64).reshape(groups, group_size, n)
    zl = 0 if lq.zero_point is None else np.asarray(lq.zero_point, np.int64).reshape(m, -1, 1)
    zr = 0 if rq.zero_point is None else np.asarray(rq.zero_point, np.int64).reshape(-1, 1, n)
    expected = np.einsum("mgk,gkn->gmn", ql - zl, qr - zr)
    np.testing.assert_array_equal(np.asarray(acc.value), expected)
    _assert_float_close(y, lhs, rhs)


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
    lhs, rhs, acc, y = _quantize_and_accumulate(normal(k, (1, k)), normal(k + 1, (k, 5)), lspec, rspec)
    ql, _, zl = _grouped_np(lhs)
    qr, _, zr = _grouped_np(rhs)
    np.testing.assert_array_equal(np.asarray(acc.value), (ql - zl) @ (qr - zr))
    _assert_float_close(y, lhs, rhs)


def test_largest_contraction_that_fits_is_exact():
    # asymmetric × asymmetric int8: |q - z| ≤ 255, so K = 33,025 is the largest with K·255² < 2^31
    # (one more raises: tests/test_validation.py)
    k = 33_025
    spec = QuantSpec(8, symmetric=False)
    lhs, rhs, acc, _ = _quantize_and_accumulate(-jnp.ones((1, k)), jnp.ones((k, 1)), spec, spec)
    ql, _, zl = _grouped_np(lhs)
    qr, _, zr = _grouped_np(rhs)
    assert int(acc.value[0, 0]) == int(((ql - zl) @ (qr - zr))[0, 0])


@st.composite
def dot_cases(draw):
    """Operand shapes, dimension numbers and specs for a general integer dot: 0-1 batch axes, 0-2
    free axes per side, 1-2 contracted axes, every operand's axes in a random order."""
    sizes = st.integers(1, 3)
    batch = draw(st.lists(sizes, max_size=1))
    contract = draw(st.lists(st.sampled_from([1, 5]), min_size=1, max_size=2))
    lfree = draw(st.lists(sizes, max_size=2))
    rfree = draw(st.lists(sizes, max_size=2))

    def operand(free):
        roles = [("b", i) for i in range(len(batch))] + [("c", i) for i in range(len(contract))] + \
                [("f", i) for i in range(len(free))]
        order = draw(st.permutations(roles))
        size = {"b": batch, "c": contract, "f": free}
        shape = tuple(size[r][i] for r, i in order)
        return order, shape

    lorder, lshape = operand(lfree)
    rorder, rshape = operand(rfree)
    dn = ((tuple(lorder.index(("c", i)) for i in range(len(contract))),
           tuple(rorder.index(("c", i)) for i in range(len(contract)))),
          (tuple(lorder.index(("b", i)) for i in range(len(batch))),
           tuple(rorder.index(("b", i)) for i in range(len(batch)))))

    def spec(order):
        # per-channel on any subset of the batch and free axes: scales constant along contractions
        keep = [a for a, (r, _) in enumerate(order) if r != "c"]
        axes = tuple(sorted(draw(st.lists(st.sampled_from(keep), unique=True, max_size=len(keep))))) if keep else ()
        if draw(st.integers(0, 4)) == 0:
            return QuantSpec(1, method="sign", channel_axes=axes)
        return QuantSpec(draw(st.integers(2, 8)), symmetric=draw(st.booleans()), channel_axes=axes)

    return lshape, rshape, dn, spec(lorder), spec(rorder)


def _centred(qa, q):
    """q - z in int64 (per-channel zero-points broadcast over the operand)."""
    q = np.asarray(q, np.int64)
    if qa.zero_point is None:
        return q
    z = np.asarray(qa.zero_point, np.int64).reshape(qa.layout.scale_shape)
    return q - np.broadcast_to(z, q.shape)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _quantize_and_dot(key, lshape, rshape, dn, lspec, rspec):
    kx, kw = jax.random.split(key)
    lq = jquant.quantize(jax.random.normal(kx, lshape), lspec)
    rq = jquant.quantize(jax.random.normal(kw, rshape), rspec)
    return (lq, lq.q), (rq, rq.q), jquant.int_dot_general(lq, rq, dn)


@COMPILING
@given(dot_cases(), st.integers(0, 2 ** 16))
def test_integer_dot_with_any_dimension_numbers_is_exact(case, seed):
    """Batch axes, several contracted axes, any axis order: Σ (q_l - z_l)(q_r - z_r) equals NumPy's
    int64 result bit for bit, laid out as (batch, lhs free, rhs free)."""
    lshape, rshape, dn, lspec, rspec = case
    lq, rq, acc = _quantize_and_dot(jax.random.key(seed), lshape, rshape, dn, lspec, rspec)
    assert acc.value.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(acc.value), reference.dot_general(_centred(*lq), _centred(*rq), dn))


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
    lhs, rhs = quantize_jit(normal(0, lhs_shape), lspec), quantize_jit(normal(1, rhs_shape), rspec)
    y = jax.jit(lambda a, b: jquant.dot_general(a, b, dn))(lhs[0], rhs[0])
    assert y.dtype == jnp.float32
    _assert_float_close(y, lhs, rhs, dn)


def test_dynamic_quantization_of_float_operands():
    x, w = normal(1, (6, 32)), normal(2, (32, 5))
    lspec, rspec = QuantSpec(8, symmetric=False, channel_axes=(0,)), QuantSpec(4, channel_axes=(1,))
    y = jax.jit(lambda a, b: jquant.dot_general(a, b, DN, lhs_spec=lspec, rhs_spec=rspec))(x, w)
    lhs, rhs = quantize_jit(x, lspec), quantize_jit(w, rspec)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jquant.dot_general(lhs[0], rhs[0], DN)))
    _assert_float_close(y, lhs, rhs)
    # quantization really changed the result
    assert np.max(np.abs(np.asarray(y) - np.asarray(x @ w))) > 1e-3


@pytest.mark.parametrize("per_token", [True, False])
def test_a_nan_activation_poisons_exactly_the_outputs_it_reaches(per_token):
    # (64, 1024) rows are where XLA:CPU's vectorised max reduction used to drop the NaN
    x, w = np.array(normal(9, (64, 1024))), normal(10, (1024, 256))
    x[3, 700] = np.nan
    lspec = QuantSpec(8, channel_axes=(0,)) if per_token else QuantSpec(8)
    y = np.asarray(jax.jit(lambda a, b: jquant.dot_general(a, b, DN, lhs_spec=lspec, rhs_spec=QuantSpec(8, channel_axes=(1,))))(
        jnp.asarray(x), w))
    reached = np.zeros(y.shape, bool)
    reached[3 if per_token else slice(None)] = True  # a per-tensor scale carries the NaN everywhere
    np.testing.assert_array_equal(np.isnan(y), reached)


@pytest.mark.parametrize("spec", [QuantSpec(8, channel_axes=(-1,)), QuantSpec(8, symmetric=False, channel_axes=(-1,), group_size=128),
                                  QuantSpec(4, symmetric=False, channel_axes=(-1,), group_size=64), QuantSpec(1, method="sign", channel_axes=(-1,)),
                                  QuantSpec(8), QuantSpec(4, method="nf4", channel_axes=(-1,), group_size=64),
                                  QuantSpec(3, method="kmeans", channel_axes=(-1,))], ids=repr)
@pytest.mark.parametrize("lhs_shape,dtype", [((1, 1024), jnp.float32), ((2, 8, 1024), jnp.float32), ((16, 1024), jnp.bfloat16)])
def test_chunked_weight_only_equals_dequantize_then_dot(spec, lhs_shape, dtype):
    x, w = normal(12, lhs_shape, dtype), normal(13, (1024, 96), dtype)
    qa = jquant.quantize(w, spec)
    dn = (((len(lhs_shape) - 1,), (0,)), ((), ()))
    y = jax.jit(lambda a, b: jquant.dot_general(a, b, dn))(x, qa)
    assert y.dtype == dtype and y.shape == lhs_shape[:-1] + (96,)
    assert "while" in jax.jit(lambda a, b: jquant.dot_general(a, b, dn)).lower(x, qa).as_text()  # the chunked path
    ref = np.asarray(x, np.float64) @ np.asarray(qa.dequantize(), np.float64)
    bound = (2e-2 if dtype == jnp.bfloat16 else 1e-5) * np.max(np.abs(ref))
    assert np.max(np.abs(np.asarray(y, np.float64) - ref)) <= bound


@pytest.mark.parametrize("policy", [jquant.int8_weights(), jquant.int4_weights(group_size=64)], ids=["int8", "int4"])
@pytest.mark.parametrize("lhs_shape,w_shape,dn", [
    ((1, 1, 512), (512, 8, 64), (((2,), (0,)), ((), ()))),  # attention query/key/value (in, heads, head_dim)
    ((2, 3, 8, 64), (8, 64, 512), (((2, 3), (0, 1)), ((), ()))),  # attention out (heads, head_dim, out)
], ids=["qkv", "out"])
def test_chunked_weight_only_takes_attention_kernels(policy, lhs_shape, w_shape, dn):
    # the presets' per-head layouts: contracted axes merged into one K, chunked like a Dense kernel
    rule = next(r for r in policy.rules if r.matches("attn/out/kernel" if w_shape[0] == 8 else "attn/query/kernel",
                                                     len(w_shape)))
    x, qa = normal(14, lhs_shape), jquant.quantize(normal(15, w_shape), rule.spec)
    fn = jax.jit(lambda a, b: jquant.dot_general(a, b, dn))
    assert "while" in fn.lower(x, qa).as_text()
    ref = np.asarray(jax.lax.dot_general(np.asarray(x, np.float64), np.asarray(qa.dequantize(), np.float64), dn))
    assert np.max(np.abs(np.asarray(fn(x, qa), np.float64) - ref)) <= 1e-5 * np.max(np.abs(ref))


@pytest.mark.parametrize("spec", [QuantSpec(8, channel_axes=(-1,)),
                                  QuantSpec(4, method="nf4", channel_axes=(-1,), group_size=64)], ids=repr)
def test_weight_only_serving_holds_no_float_copy_of_the_weight(spec):
    # 4096²: a float copy would be 64 MiB; the chunked dot holds one 512-row float chunk (8 MiB)
    qa = jax.eval_shape(lambda w: jquant.quantize(w, spec), jax.ShapeDtypeStruct((4096, 4096), jnp.float32))
    float_bytes = 4096 * 4096 * 4

    def decode(x, qa, steps=8):  # a generation loop: the same weight at every step
        return jax.lax.fori_loop(0, steps, lambda i, h: jnp.tanh(jquant.dot_general(h, qa, DN)), x)

    for fn, x in ((lambda x, qa: jquant.dot_general(x, qa, DN), jax.ShapeDtypeStruct((1, 4096), jnp.float32)),
                  (decode, jax.ShapeDtypeStruct((1, 4096), jnp.float32)),
                  (lambda x, qa: jquant.dot_general(x, qa, DN), jax.ShapeDtypeStruct((64, 4096), jnp.float32))):
        compiled = jax.jit(fn).lower(x, qa).compile()
        assert compiled.memory_analysis().temp_size_in_bytes < float_bytes / 4
        assert "f32[4096,4096]" not in compiled.as_text()


def test_weight_only_dequantizes_the_qarray():
    x = normal(3, (4, 32), jnp.bfloat16)
    rq = jquant.quantize(normal(4, (32, 8), jnp.bfloat16), QuantSpec(4, channel_axes=(1,), group_size=8))
    y = jquant.dot_general(x, rq, DN)
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(jax.lax.dot_general(x, rq.dequantize(), DN), np.float32))
    assert y.dtype == jnp.bfloat16


def test_output_dtype_follows_operands_and_preferred_type():
    # (an integer preferred_element_type raises: tests/test_validation.py)
    lq = jquant.quantize(normal(5, (2, 8), jnp.bfloat16), QuantSpec(8))
    rq = jquant.quantize(normal(6, (8, 3), jnp.bfloat16), QuantSpec(8))
    assert jquant.dot_general(lq, rq, DN).dtype == jnp.bfloat16
    assert jquant.dot_general(lq, rq, DN, preferred_element_type=jnp.float32).dtype == jnp.float32


def test_requantize_matches_quantizing_the_float_result():
    lq = jquant.quantize(normal(7, (5, 16)), QuantSpec(8, channel_axes=(0,)))
    rq = jquant.quantize(normal(8, (16, 4)), QuantSpec(8, channel_axes=(1,)))
    acc = jquant.int_dot_general(lq, rq, DN)
    out_spec = QuantSpec(8, symmetric=False)
    yq = jquant.requantize(acc, out_spec, scale=0.05, zero_point=3)
    y = np.asarray(acc.dequantize(), np.float64)
    expected = np.clip(np.round(y / np.float64(np.float32(0.05))) + 3, -128, 127)
    ties = np.abs(np.abs(y / 0.05 - np.floor(y / 0.05)) - 0.5) < 1e-4
    assert np.all((np.asarray(yq.q) == expected) | ties)
    assert isinstance(yq, jquant.QArray) and yq.shape == (5, 4)


@pytest.mark.parametrize("bits", [2, 4, 7])
def test_midrise_integer_dot_is_exact(bits):
    lhs, rhs, acc, _ = _quantize_and_accumulate(normal(9, (5, 64)), normal(10, (64, 6)), QuantSpec(8),
                                                QuantSpec(bits, midrise=True, channel_axes=(1,)))
    expected = reference.as_f64(lhs[2]) @ reference.as_f64(rhs[2])
    np.testing.assert_allclose(np.asarray(acc.dequantize(jnp.float32)), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mid-rise"):
        jquant.int_dot_general(lhs[0], jquant.quantize(normal(10, (64, 6)), QuantSpec(8, midrise=True)), DN)


@pytest.mark.parametrize("spec", [QuantSpec(8, channel_axes=(-1,)), QuantSpec(4, symmetric=False, channel_axes=(-1,), group_size=128),
                                  QuantSpec(4, method="nvfp4", channel_axes=(-1,), group_size=16)], ids=repr)
def test_chunked_weight_only_keeps_the_saturation_at_the_float_limit(spec):
    # a column at the float limit: s·(q − z) of its grid ends would overflow without the clip
    # that `dequantize` applies; the chunked dot (which skips the clip where no scale needs it)
    # takes it here and agrees with dequantize-then-dot, finite
    w = np.array(normal(16, (1024, 96)))
    w[:, 5] = np.where(w[:, 5] > 0, 1, -1) * np.finfo(np.float32).max
    qa = jquant.quantize(jnp.asarray(w), spec)
    x = 1e-30 * normal(17, (1, 1024))
    y = jax.jit(lambda a, b: jquant.dot_general(a, b, DN))(x, qa)
    ref = np.asarray(x, np.float64) @ np.asarray(qa.dequantize(), np.float64)
    assert np.all(np.isfinite(np.asarray(y)))
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-5 * np.max(np.abs(ref)))
    # ordinary weights need no clip (NVFP4: its format sees the tensor scale), so the dot skips it
    ordinary = jquant.quantize(normal(16, (1024, 96)), spec)
    assert not bool(spec.method.saturates(ordinary.scale, ordinary.zero_point, spec))


@pytest.mark.parametrize("spec", [QuantSpec(8, channel_axes=(-1,)), QuantSpec(4, channel_axes=(-1,)),
                                  QuantSpec(4, symmetric=False, channel_axes=(-1,), group_size=128)], ids=repr)
def test_weight_only_decoding_is_accurate_for_activations_with_a_large_mean(spec):
    # ReLU/GELU outputs (all positive, mean ≫ spread) into a 4096-deep kernel, one row: a weight-only
    # dot that multiplied the integers and subtracted z·Σx afterwards would cancel catastrophically;
    # the chunked dequantized dot stays at float rounding
    w = 0.02 * normal(18, (4096, 512)) + 0.01
    qa = jquant.quantize(w, spec)
    x = jnp.abs(normal(19, (1, 4096))) + 3.0
    y = jax.jit(lambda a, b: jquant.dot_general(a, b, DN))(x, qa)
    ref = np.asarray(x, np.float64) @ np.asarray(qa.dequantize(), np.float64)
    assert np.max(np.abs(np.asarray(y, np.float64) - ref)) <= 1e-6 * np.max(np.abs(ref))
