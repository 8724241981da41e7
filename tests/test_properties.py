"""Property-based tests (hypothesis) of jquant's promises, extending the example-based tests:

* error bound with a fixed (calibrated) scale: |x̂ - x| ≤ s/2 for x inside the clip range;
* idempotence: quantizing x̂ again with the same scale (and zero-point, codebook) changes nothing;
* storage: a QArray's integers survive packing for every bit width, shape and method;
* the integer dot with arbitrary dimension numbers (batch, several contracted axes, any axis
  order) equals a NumPy int64 reference bit for bit;
* STE: the gradient is exactly the documented clip mask, with fixed per-channel scales.

Example counts come from the hypothesis profile (tests/conftest.py: "ci" by default,
HYPOTHESIS_PROFILE=thorough for more). Shapes are drawn from small sets so that the number of
XLA compilations stays bounded.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jquant
from jquant import QuantSpec
from jquant._src import packing
from jquant._src import numerics
from jquant._src.formats import uniform

import reference

SHAPES = [(8,), (3, 8), (4, 6), (2, 3, 4)]
# For tests whose every example compiles a new program (a new shape): a third of the profile's count.
COMPILING = settings(max_examples=max(8, settings.default.max_examples // 3))


def _f64(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


@st.composite
def uniform_specs(draw, shape, midrise=True):
    """A uniform spec that fits `shape`: per-tensor, per-channel (first axis) or per-group (last)."""
    bits = draw(st.integers(2, 8))
    kind = draw(st.sampled_from(["symmetric", "asymmetric"] + (["midrise"] if midrise else [])))
    kw = dict(bits=bits, symmetric=kind != "asymmetric", midrise=kind == "midrise")
    granularity = draw(st.sampled_from(["tensor", "channel", "group"])) if len(shape) > 1 else "tensor"
    if granularity == "channel":
        kw["channel_axes"] = (0,)
    elif granularity == "group":
        kw.update(channel_axes=(0,), group_size=draw(st.sampled_from([1, 2, shape[-1]])), group_axis=-1)
    return QuantSpec(**kw)


@st.composite
def fixed_ranges(draw, shape, spec):
    """A fixed scale (scale-shaped, in [1e-3, 10]) and zero-point for `spec` on `shape`."""
    scale_shape = reference.scale_shape(shape, spec)
    scale = draw(hnp.arrays(np.float32, scale_shape, elements=st.floats(float(np.float32(1e-3)), 10.0, width=32)))
    zero_point = None
    if not spec.symmetric:
        zero_point = draw(hnp.arrays(np.int8, scale_shape, elements=st.integers(spec.qmin, spec.qmax)))
    return scale, zero_point


@functools.partial(jax.jit, static_argnums=1)
def _round_trip(x, spec, scale, zero_point):
    qa = jquant.quantize(x, spec, scale=scale, zero_point=zero_point)
    return qa, qa.q, qa.dequantize()


@given(st.sampled_from(SHAPES).flatmap(lambda s: st.tuples(st.just(s), uniform_specs(s))), st.data())
def test_error_is_at_most_half_a_step_inside_the_clip_range(shape_spec, data):
    shape, spec = shape_spec
    scale, zero_point = data.draw(fixed_ranges(shape, spec))
    s = reference.expand(scale.astype(np.float64), shape, spec)
    z = 0.0 if zero_point is None else reference.expand(zero_point.astype(np.float64), shape, spec)
    # the clip range [s(Qmin - z + offset) - s/2, s(Qmax - z + offset) + s/2] (mid-tread: a half step rounds
    # back in; mid-rise: floor keeps [s·Qmin, s·(Qmax+1)) ), sampled as a fraction of it
    u = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(0.0, 1.0)))
    if spec.midrise:
        lo, hi = s * spec.qmin, s * (spec.qmax + 1)
    else:
        lo, hi = s * (spec.qmin - z - 0.5), s * (spec.qmax - z + 0.5)
    x = jnp.asarray(lo + u * (hi - lo), jnp.float32)
    _, q, x_hat = _round_trip(x, spec, scale, zero_point)
    err = np.abs(_f64(x_hat) - _f64(x))
    # float32: x·(1/s) is within ~2 ulp of x/s, and x̂ = s·(q - z) rounds once
    slack = 4 * np.finfo(np.float32).eps * (np.abs(_f64(x)) + s * (2 ** spec.bits))
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
    np.testing.assert_array_equal(_f64(x_hat2), _f64(x_hat))
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


def _int64_dot(left, right, dn):
    """Σ (q_l - z_l)(q_r - z_r) in int64 with NumPy, laid out as (batch, lhs free, rhs free);
    `left`, `right` are (QArray, its integers q)."""
    def centred(qa, q):
        q = np.asarray(q, np.int64)
        if qa.zero_point is None:
            return q
        z = np.asarray(qa.zero_point, np.int64).reshape(qa.layout.scale_shape)
        return q - np.broadcast_to(z, q.shape)

    (lq, lints), (rq, rints) = left, right
    (lc, rc), (lb, rb) = dn
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    lsub, rsub = [None] * lq.ndim, [None] * rq.ndim
    for a, b in zip(lc + lb, rc + rb):
        lsub[a] = rsub[b] = next(letters)
    lfree = [a for a in range(lq.ndim) if lsub[a] is None]
    rfree = [a for a in range(rq.ndim) if rsub[a] is None]
    for a in lfree:
        lsub[a] = next(letters)
    for a in rfree:
        rsub[a] = next(letters)
    out = [lsub[a] for a in lb] + [lsub[a] for a in lfree] + [rsub[a] for a in rfree]
    return np.einsum(f"{''.join(lsub)},{''.join(rsub)}->{''.join(out)}", centred(lq, lints), centred(rq, rints))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _quantize_and_dot(key, lshape, rshape, dn, lspec, rspec):
    kx, kw = jax.random.split(key)
    lq = jquant.quantize(jax.random.normal(kx, lshape), lspec)
    rq = jquant.quantize(jax.random.normal(kw, rshape), rspec)
    return (lq, lq.q), (rq, rq.q), jquant.int_dot_general(lq, rq, dn)


@COMPILING
@given(dot_cases(), st.integers(0, 2 ** 16))
def test_integer_dot_with_any_dimension_numbers_is_exact(case, seed):
    lshape, rshape, dn, lspec, rspec = case
    lq, rq, acc = _quantize_and_dot(jax.random.key(seed), lshape, rshape, dn, lspec, rspec)
    assert acc.value.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(acc.value), _int64_dot(lq, rq, dn))


@functools.partial(jax.jit, static_argnums=1)
def _grad(x, spec, scale, zero_point):
    return jax.grad(lambda v: jnp.sum(jquant.fake_quant(v, spec, scale=scale, zero_point=zero_point)))(x)


@given(st.sampled_from([(3, 8), (4, 6)]).flatmap(lambda s: st.tuples(st.just(s), uniform_specs(s))), st.data())
def test_ste_gradient_is_the_clip_mask(shape_spec, data):
    shape, spec = shape_spec
    scale, zero_point = data.draw(fixed_ranges(shape, spec))
    s = reference.expand(scale.astype(np.float64), shape, spec)
    z = 0.0 if zero_point is None else reference.expand(zero_point.astype(np.float64), shape, spec)
    # x/s spread over twice the grid so that both clip ends are crossed
    t = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(-2.0 ** spec.bits, 2.0 ** spec.bits)))
    x = jnp.asarray(t * s, jnp.float32)
    grad = np.asarray(_grad(x, spec, scale, zero_point))
    ratio = _f64(x) / s
    integer = np.floor(ratio) if spec.midrise else reference.round_half_even(ratio)
    expected = ((spec.qmin <= integer + z) & (integer + z <= spec.qmax)).astype(np.float32)
    # float32's x·(1/s) may round the other way within an ulp of a decision boundary
    boundary = reference.near_tie(ratio) if not spec.midrise else np.abs(ratio - np.round(ratio)) <= 1e-5 * np.abs(ratio)
    ok = (grad == expected) | boundary
    assert set(np.unique(grad)) <= {0.0, 1.0}
    assert np.all(ok), f"gradient {grad[~ok]} where the mask says {expected[~ok]} (x/s = {ratio[~ok]})"
