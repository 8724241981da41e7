"""jquant.numerics (through jquant.quantize / QArray) against the NumPy float64 reference.

jquant computes in float32 for f32/bf16/f16 input; the reference computes in float64 from the
same (exactly upcast) input values. So: scales agree to float32 rounding; q agrees exactly except
where x/s (or lo/s for the zero point) is within 1e-5 of a .5 tie, where float32 may pick the
other neighbour (off by one); x̂ agrees to the rounding of the output dtype. The mid-rise grid
(x̂ = s·(floor(x/s) + ½), which the reference does not model) is checked against its own formula
at the end.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jquant
from jquant import MSE, QuantSpec
from jquant._src import numerics
from jquant._src.formats import uniform

import reference
from helpers import normal, quantize_jit
from reference import as_f64

SETTINGS = settings(max_examples=40, deadline=None)
DTYPES = ("float32", "bfloat16", "float16")


def _flush_tiny(v: float) -> float:
    # Scales of groups whose absmax is near the float32 underflow are subnormal and lose
    # precision (documented: they may underflow to 0); keep generated data clear of that.
    return 0.0 if abs(v) < 1e-6 else v


ELEMENTS = st.one_of(
    st.just(0.0),
    st.integers(-64, 64).map(lambda k: k / 4),  # exact values: zero groups, exact and near ties
    st.floats(-1e4, 1e4, width=32, allow_subnormal=False).map(_flush_tiny),
)


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def shapes_and_specs(draw, methods=("uniform", "uniform", "sign"), bits=(2, 3, 4, 5, 8)):
    """A shape of rank 0..3 (size-1 dims included) and a valid spec for it: per-tensor,
    per-channel (axes given positive or negative) or per-group (explicit or default group axis)."""
    rank = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 4, 6, 8]), min_size=rank, max_size=rank)))
    method = draw(st.sampled_from(methods))
    if method == "sign":
        kw = dict(bits=1, method="sign")
    else:
        kw = dict(bits=draw(st.sampled_from(bits)), symmetric=draw(st.booleans()))
    granularity = draw(st.sampled_from(["tensor", "channel", "group", "group"])) if rank else "tensor"
    if granularity == "tensor":
        return shape, QuantSpec(**kw)
    group = granularity == "group"
    axes = draw(st.lists(st.integers(0, rank - 1), unique=True, min_size=not group, max_size=rank - group))
    kw["channel_axes"] = tuple(a - rank if draw(st.booleans()) else a for a in axes)
    shared = [a for a in range(rank) if a not in axes]
    if group:
        if draw(st.booleans()):
            axis = draw(st.sampled_from(shared))
            kw["group_axis"] = axis - rank if draw(st.booleans()) else axis
        else:
            largest = max(shape[a] for a in shared)
            axis = [a for a in shared if shape[a] == largest][-1]
        kw["group_size"] = draw(st.sampled_from(_divisors(shape[axis])))
    return shape, QuantSpec(**kw)


def assert_matches_reference(x, spec, qa, scale=None, zero_point=None):
    """`qa` = jquant.quantize(x, spec, scale=..., zero_point=...) (a QArray, or the triple from
    `quantize_jit`) agrees with the reference. Returns the reference (per-element arrays)."""
    qa, q, x_hat = qa if isinstance(qa, tuple) else (qa, qa.q, qa.dequantize())
    shape = tuple(x.shape)
    xf = as_f64(x)  # exactly the values jquant sees after its (exact) upcast
    qmin, qmax = reference.qrange(spec.bits, spec.symmetric, spec.method.name)
    if scale is not None:
        scale = reference.expand(np.broadcast_to(as_f64(scale), reference.scale_shape(shape, spec)), shape, spec)
        if zero_point is not None:
            zero_point = reference.expand(
                np.broadcast_to(np.asarray(zero_point, np.float64), reference.scale_shape(shape, spec)), shape, spec)
    ref = reference.quantize(xf, spec, scale, zero_point)

    # scale: documented shape, float32, one value per group, float32 rounding of the reference
    assert qa.scale.shape == reference.scale_shape(shape, spec)
    assert qa.scale.dtype == jnp.float32
    s = reference.expand(np.asarray(qa.scale, np.float64), shape, spec)
    rtol = 1e-6
    if spec.method.name == "sign":  # a float32 sum of n positive terms: error up to ~n ulp
        rtol += 6e-8 * max(1, math.prod(shape))
    np.testing.assert_allclose(s, ref.scale, rtol=rtol, atol=0, err_msg="scale")

    # zero point: None when symmetric; else integer-valued, in range, = reference but near a tie
    if spec.symmetric:
        assert qa.zero_point is None
        z = np.zeros(shape)
    else:
        assert qa.zero_point.shape == reference.scale_shape(shape, spec)
        assert jnp.issubdtype(qa.zero_point.dtype, jnp.integer)
        z = reference.expand(np.asarray(qa.zero_point, np.float64), shape, spec)
        assert np.all((qmin <= z) & (z <= qmax))
        z_ok = (z == ref.zero_point) | (reference.near_tie(ref.zero_point_unrounded) & (np.abs(z - ref.zero_point) <= 1))
        assert np.all(z_ok), f"zero point {z[~z_ok]} vs reference {ref.zero_point[~z_ok]}"

    # q: in range; = clip(round(x/s) + z) with jquant's own (validated) z, off by one only at ties
    q = np.asarray(q, np.float64)
    assert q.shape == shape
    assert np.all((qmin <= q) & (q <= qmax))
    if spec.method.name == "sign":
        np.testing.assert_array_equal(q, ref.q)
    else:
        expected = np.clip(np.round(ref.t) + z, qmin, qmax)
        q_ok = (q == expected) | (reference.near_tie(ref.t) & (np.abs(q - expected) <= 1))
        assert np.all(q_ok), f"q {q[~q_ok]} vs reference {expected[~q_ok]} at x={xf[~q_ok]}"

    # x̂ = s (q - z): original dtype and shape, output-dtype rounding of the float64 value,
    # saturating at ±max (the grid may reach half a step past data at the float limit)
    assert x_hat.dtype == x.dtype and x_hat.shape == shape
    info = jnp.finfo(x.dtype)
    expected = np.clip(ref.scale * (q - z), -float(info.max), float(info.max))
    np.testing.assert_allclose(as_f64(x_hat), expected, rtol=float(info.eps) / 2 + 1e-6,
                               atol=float(info.smallest_subnormal), err_msg="x_hat")
    return ref


@SETTINGS
@given(shapes_and_specs(), st.sampled_from(DTYPES), st.data())
def test_quantize_matches_reference(shape_spec, dtype, data):
    shape, spec = shape_spec
    x = jnp.asarray(data.draw(hnp.arrays(np.float32, shape, elements=ELEMENTS)), dtype)
    qa, q, x_hat = quantize_jit(x, spec)
    ref = assert_matches_reference(x, spec, (qa, q, x_hat))
    assert not np.any(np.isnan(as_f64(x_hat)))
    # the error is at most half a step inside the clip range, which contains x when the scale is
    # computed from x (not for sign, which is not a rounding quantizer)
    if spec.method.name == "uniform":
        err = np.abs(as_f64(x_hat) - as_f64(x))
        step = ref.scale
        assert np.all(err <= step * (0.5 + 1e-4) + np.abs(as_f64(x)) * float(jnp.finfo(x.dtype).eps))


@SETTINGS
@given(shapes_and_specs(), st.sampled_from(DTYPES), st.data())
def test_zero_groups_have_zero_scale_and_dequantize_to_exact_zero(shape_spec, dtype, data):
    shape, spec = shape_spec
    x = data.draw(hnp.arrays(np.float32, shape, elements=ELEMENTS))
    ids = reference.group_ids(shape, spec)
    zeroed = np.isin(ids, data.draw(st.lists(st.sampled_from(np.unique(ids).tolist()), min_size=1)))
    x = jnp.asarray(np.where(zeroed, 0.0, x), dtype)
    qa, q, x_hat = outputs = quantize_jit(x, spec)
    x_hat = as_f64(x_hat)
    s = reference.expand(np.asarray(qa.scale), shape, spec)
    assert np.all(s[zeroed] == 0)
    assert np.all(x_hat[zeroed] == 0)
    assert not np.any(np.isnan(x_hat))
    if spec.method.name == "uniform":
        z = 0 if spec.symmetric else reference.expand(np.asarray(qa.zero_point), shape, spec)
        np.testing.assert_array_equal(np.asarray(q)[zeroed], np.broadcast_to(z, shape)[zeroed])
    assert_matches_reference(x, spec, outputs)


def test_all_zero_tensor():
    for spec in (QuantSpec(8), QuantSpec(4, symmetric=False), QuantSpec(1, method="sign"),
                 QuantSpec(3, symmetric=False, channel_axes=(0,), group_size=2)):
        qa, _, x_hat = quantize_jit(jnp.zeros((2, 4)), spec)
        assert np.all(np.asarray(qa.scale) == 0)
        assert np.all(np.asarray(x_hat) == 0)


@pytest.mark.parametrize("shape, channel_axes, group_size, group_axis", [
    ((8, 4), (1,), 2, 0),            # Dense kernel (in, out): the contraction axis
    ((3, 3, 16, 8), (3,), 4, 2),     # conv HWIO: I is the largest shared axis
    ((16, 4, 8), (), 8, 0),          # attention (in, heads, head_dim)
    ((4, 4), (), 2, 1),              # equal sizes: the last one
    ((4, 6, 6), (0,), 3, 2),         # equal sizes among the shared axes
    ((2, 8), (-1,), 2, 0),
])
def test_default_group_axis_is_largest_shared_axis(shape, channel_axes, group_size, group_axis):
    x = normal(0, shape)
    default = QuantSpec(4, channel_axes=channel_axes, group_size=group_size)
    explicit = QuantSpec(4, channel_axes=channel_axes, group_size=group_size, group_axis=group_axis)
    assert reference.channel_and_group_axes(shape, default)[1] == group_axis
    (qa, *outputs), (qe, *_) = quantize_jit(x, default), quantize_jit(x, explicit)
    assert qa.scale.shape == qe.scale.shape == reference.scale_shape(shape, explicit)
    np.testing.assert_array_equal(np.asarray(qa.scale), np.asarray(qe.scale))
    assert_matches_reference(x, default, (qa, *outputs))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("step_exponent", [-6, 0, 3])
def test_round_half_to_even_symmetric(bits, step_exponent):
    # absmax = Qmax·s with s a power of two, so s and every x / s below are exact: x / s = k + 1/2
    s = 2.0 ** step_exponent
    _, qmax = reference.qrange(bits)
    k = np.arange(-qmax, qmax)
    x = np.concatenate([[qmax * s], (k + 0.5) * s]).astype(np.float32)
    qa = jquant.quantize(jnp.asarray(x), QuantSpec(bits))
    assert float(qa.scale.reshape(())) == s
    q = np.asarray(qa.q)[1:]
    assert np.all(q % 2 == 0), "ties must round to the even neighbour"
    assert np.all(np.abs(q - (k + 0.5)) == 0.5)
    np.testing.assert_array_equal(q, np.round(k + 0.5))


@pytest.mark.parametrize("bits, below", [(8, 100), (4, 3), (2, 1)])
def test_round_half_to_even_asymmetric(bits, below):
    # lo = -below·s, hi = (levels - below)·s with s = 2^-4: span/levels = s exactly, z = Qmin + below
    s = 2.0 ** -4
    qmin, qmax = reference.qrange(bits, symmetric=False)
    levels = qmax - qmin
    k = np.arange(-below, levels - below)
    x = np.concatenate([[-below * s, (levels - below) * s], (k + 0.5) * s]).astype(np.float32)
    qa = jquant.quantize(jnp.asarray(x), QuantSpec(bits, symmetric=False))
    assert float(qa.scale.reshape(())) == s
    z = int(np.asarray(qa.zero_point).reshape(()))
    assert z == qmin + below
    offsets = np.asarray(qa.q, np.int64)[2:] - z
    in_range = (k + 0.5 + z) < qmax  # the last tie rounds up past Qmax and is clipped
    assert np.all(offsets[in_range] % 2 == 0)
    np.testing.assert_array_equal(offsets[in_range], np.round(k + 0.5)[in_range])


@SETTINGS
@given(st.sampled_from([2, 3, 4, 5, 6, 7, 8]), st.booleans(), st.sampled_from(DTYPES), st.data())
def test_integer_ranges_and_exact_zero(bits, symmetric, dtype, data):
    qmin, qmax = reference.qrange(bits, symmetric)
    assert (QuantSpec(bits, symmetric=symmetric).qmin, QuantSpec(bits, symmetric=symmetric).qmax) == (qmin, qmax)
    x = data.draw(hnp.arrays(np.float32, (3, 16), elements=ELEMENTS))
    x[:, 0] = 0.0
    x[:, 1] = -5.0  # every row spans negative and positive: both ends of the grid are used
    x[:, 2] = 5.0
    x = jnp.asarray(x, dtype)
    qa = jquant.quantize(x, QuantSpec(bits, symmetric=symmetric, channel_axes=(0,)))
    q = np.asarray(qa.q)
    assert q.min() >= qmin and q.max() <= qmax
    assert q.min() == qmin or q.max() == qmax
    x_hat = np.asarray(qa.dequantize().astype(jnp.float32))
    assert np.all(x_hat[:, 0] == 0.0)  # 0.0 is on the grid (z is an integer)
    if not symmetric:
        z = np.asarray(qa.zero_point)
        assert np.issubdtype(z.dtype, np.integer)
        assert np.all((qmin <= z) & (z <= qmax))
        np.testing.assert_array_equal(q[:, :1], z)
        assert np.all(x_hat[np.asarray(x.astype(jnp.float32)) == 0] == 0)


def test_int8_ranges():
    x = jnp.asarray(np.linspace(-3.0, 1.0, 401), jnp.float32)
    sym = jquant.quantize(x, QuantSpec(8))
    assert np.asarray(sym.q).min() == -127  # -absmax
    assert np.asarray(sym.q).max() == round(127 / 3)
    xs = jnp.asarray([-2.0, 2.0, 0.5], jnp.float32)
    np.testing.assert_array_equal(np.asarray(jquant.quantize(xs, QuantSpec(8)).q), [-127, 127, 32])
    asym = jquant.quantize(x, QuantSpec(8, symmetric=False))
    assert np.asarray(asym.q).min() == -128 and np.asarray(asym.q).max() == 127
    assert asym.zero_point.dtype == jnp.int8
    assert float(jquant.dequantize(asym)[np.argmin(np.abs(np.asarray(x)))]) == 0.0


@pytest.mark.parametrize("channel_axes, floor_db", [((1,), 40.9), ((0,), 42.9)])
def test_int8_per_channel_sqnr_on_gaussian(channel_axes, floor_db):
    x = np.asarray(normal(0, (4096, 256)))
    spec = QuantSpec(8, channel_axes=channel_axes)
    qa = jquant.quantize(jnp.asarray(x), spec)
    sqnr = reference.sqnr_db(x, qa.dequantize())
    ref = reference.quantize(x, spec)
    assert sqnr == pytest.approx(reference.sqnr_db(x, ref.x_hat), abs=0.01)
    # the uniform-noise model: error variance s²/12 per element
    model = 10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum(ref.scale ** 2 / 12))
    assert sqnr == pytest.approx(model, abs=0.1)
    assert sqnr >= floor_db


NAN_SPECS = [
    QuantSpec(8, channel_axes=(-1,)), QuantSpec(4, symmetric=False, channel_axes=(-1,)), QuantSpec(8),
    QuantSpec(8, channel_axes=(0,)), QuantSpec(4, channel_axes=(-1,), group_size=4),
    QuantSpec(8, channel_axes=(-1,), calibration=MSE(num_ratios=8)),
    QuantSpec(8, symmetric=False, channel_axes=(-1,), calibration=jquant.Percentile(99.0)),
    QuantSpec(1, method="sign", channel_axes=(-1,)), QuantSpec(3, method="kmeans", channel_axes=(-1,)),
    QuantSpec(4, method="nf4", channel_axes=(-1,), group_size=4),
]


# XLA:CPU's vectorised max/min reductions drop NaN from (256, 64) on (a column max of a 4096² kernel
# too); (4, 8) is what small tests see. The NaN sits in a middle row and in the last one.
@pytest.mark.parametrize("shape", [(4, 8), (256, 64)])
@pytest.mark.parametrize("spec", NAN_SPECS, ids=repr)
def test_nan_poisons_only_its_group(spec, shape):
    x = np.array(normal(1, shape))
    x[1, 2] = x[shape[0] - 1, shape[1] - 1] = np.nan
    ids = reference.group_ids(x.shape, spec)
    poisoned = np.isin(ids, ids[np.isnan(x)])
    for quantize in (jquant.quantize, jax.jit(jquant.quantize, static_argnums=1)):  # (eager = jit: test_determinism)
        qa = quantize(jnp.asarray(x), spec)
        x_hat = np.asarray(qa.dequantize())
        assert np.all(np.isnan(x_hat[poisoned]))
        assert not np.any(np.isnan(x_hat[~poisoned]))
        clean = quantize(jnp.asarray(np.where(poisoned, 0.0, x)), spec).dequantize()
        np.testing.assert_array_equal(x_hat[~poisoned], np.asarray(clean)[~poisoned])
        if not spec.symmetric:  # the zero point stays a valid integer
            z = np.asarray(qa.zero_point)
            assert np.all((spec.qmin <= z) & (z <= spec.qmax))
    fq = np.asarray(jax.jit(jquant.fake_quant, static_argnums=1)(jnp.asarray(x), spec))
    assert np.array_equal(np.isnan(fq), poisoned)


@given(st.sampled_from([(300,), (7, 1030), (256, 64), (33, 5, 70), (2, 130, 2, 65)]).flatmap(
    lambda shape: st.tuples(st.just(shape), st.sets(st.integers(0, len(shape) - 1), min_size=1),
                            st.lists(st.integers(0, math.prod(shape) - 1), max_size=3))),
       st.sampled_from(["absmax", "min", "max"]))
def test_extrema_propagate_nan_at_every_size(case, kind):
    shape, axes, nans = case
    x = np.array(normal(3, shape)).reshape(-1)
    x[nans] = np.nan
    x = x.reshape(shape)
    ref = {"absmax": lambda v: np.max(np.abs(v), axis=tuple(axes), keepdims=True),
           "min": lambda v: np.min(v, axis=tuple(axes), keepdims=True),
           "max": lambda v: np.max(v, axis=tuple(axes), keepdims=True)}[kind](x)
    got = numerics.extrema(jnp.asarray(x), tuple(sorted(axes)), kind)
    np.testing.assert_array_equal(np.asarray(got), ref)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("inf", [np.inf, -np.inf])
def test_inf_makes_its_group_non_finite(symmetric, inf):
    x = np.array(normal(2, (3, 5)))
    x[0, 1] = inf
    qa = jquant.quantize(jnp.asarray(x), QuantSpec(8, symmetric=symmetric, channel_axes=(0,)))
    x_hat = np.asarray(qa.dequantize())
    assert not np.any(np.isfinite(x_hat[0])), "the corrupted group must not look plausible"
    assert np.all(np.isfinite(x_hat[1:]))


@pytest.mark.parametrize("bits", [8, 4])
def test_huge_values_asymmetric_keep_finite_scale(bits):
    x = np.array([[-3e38, 3e38, 0.0, 1e38], [-3e38, -1e38, 0.0, -2e38], [0, 3e38, 3e38, 0]], np.float32)
    spec = QuantSpec(bits, symmetric=False, channel_axes=(0,))
    qa = jquant.quantize(jnp.asarray(x), spec)
    assert np.all(np.isfinite(np.asarray(qa.scale)))
    x_hat = np.asarray(qa.dequantize())
    assert np.all(np.isfinite(x_hat))
    assert np.all(x_hat[x == 0] == 0)
    ref = assert_matches_reference(jnp.asarray(x), spec, qa)
    assert np.all(np.abs(x_hat - x.astype(np.float64)) <= ref.scale * 0.5 * (1 + 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_values_symmetric(dtype):
    big = 3e38 if dtype == "float32" else float(jnp.finfo(dtype).max)
    x = jnp.asarray([-big, big / 3, 0.0, big], dtype)
    qa = jquant.quantize(x, QuantSpec(8))
    assert np.all(np.isfinite(np.asarray(qa.scale)))
    assert np.all(np.isfinite(as_f64(qa.dequantize())))
    assert_matches_reference(x, QuantSpec(8), qa)


def test_sign_scale_of_huge_values_is_finite():
    x = jnp.asarray([3e38, -3e38, 1.0], jnp.float32)
    qa = jquant.quantize(x, QuantSpec(1, method="sign"))
    assert np.all(np.isfinite(np.asarray(qa.scale)))
    np.testing.assert_allclose(np.asarray(qa.scale).ravel(), [2e38], rtol=1e-6)


@SETTINGS
@given(shapes_and_specs(methods=("uniform",)), st.sampled_from(DTYPES), st.data())
def test_fixed_scale_and_zero_point(shape_spec, dtype, data):
    shape, spec = shape_spec
    x = jnp.asarray(data.draw(hnp.arrays(np.float32, shape, elements=ELEMENTS)), dtype)
    scale_shape = reference.scale_shape(shape, spec)
    qmin, qmax = reference.qrange(spec.bits, spec.symmetric)
    # a scalar or a full scale-shaped array; values in a range that clips part of the data
    if data.draw(st.booleans()):
        scale = data.draw(st.floats(float(np.float32(1e-3)), 1e3, width=32))
    else:
        scale = data.draw(hnp.arrays(np.float32, scale_shape, elements=st.floats(float(np.float32(1e-3)), 1e3, width=32)))
    zero_point = None
    if not spec.symmetric:
        zero_point = data.draw(st.one_of(
            st.integers(qmin, qmax),
            hnp.arrays(np.int8, scale_shape, elements=st.integers(qmin, qmax))))
    qa, q, x_hat = outputs = quantize_jit(x, spec, scale, zero_point)
    ref = assert_matches_reference(x, spec, outputs, scale=scale, zero_point=zero_point)
    # values beyond the range saturate at the ends of the grid
    q = np.asarray(q, np.float64)
    above = ref.t + ref.zero_point > qmax + 0.5 + 1e-3
    below = ref.t + ref.zero_point < qmin - 0.5 - 1e-3
    assert np.all(q[above] == qmax) and np.all(q[below] == qmin)


def test_fixed_scale_clips_at_the_grid_ends():
    x = jnp.asarray([-5.0, -1.27, -0.004, 0.0, 0.006, 1.0, 1.3, 5.0], jnp.float32)
    qa = jquant.quantize(x, QuantSpec(8), scale=0.01)
    ref = reference.quantize(as_f64(x), QuantSpec(8), scale=float(np.float32(0.01)))
    np.testing.assert_array_equal(np.asarray(qa.q), ref.q)
    assert ref.q[0] == -127 and ref.q[-1] == 127 and ref.q[-2] == 127
    np.testing.assert_allclose(np.asarray(qa.dequantize()), ref.x_hat, rtol=1e-6)


GRIDS = [QuantSpec(b, symmetric=sym, channel_axes=(1,)) for b in range(2, 9) for sym in (True, False)]
MIDRISE_GRIDS = [QuantSpec(b, midrise=True, channel_axes=(1,)) for b in range(2, 8)]


@pytest.mark.parametrize("spec", GRIDS, ids=repr)
def test_data_up_to_the_float_max_on_every_grid(spec):
    # the largest scales a grid can get: `divide` skips its huge-scale shift exactly where
    # `reciprocal_is_normal` says no computed scale can need it; both paths must match the reference
    # (mid-rise grids: not against the reference, which has no mid-rise; test_degenerate.py's float_max data)
    big = float(jnp.finfo(jnp.float32).max)
    rng = np.random.default_rng(spec.bits)
    columns = [np.array([big, -big, big / 3, -big / 7]), np.array([big, 0.0, 1.0, -2.0]),
               rng.uniform(-1, 1, 4) * big, np.array([-big, -big / 2, -1e30, 0.0])]
    x = jnp.asarray(np.stack(columns, axis=1).astype(np.float32))
    for qa in (jquant.quantize(x, spec), jax.jit(jquant.quantize, static_argnums=1)(x, spec)):
        assert_matches_reference(x, spec, qa)
        np.testing.assert_array_equal(np.asarray(jquant.fake_quant(x, spec)), np.asarray(qa.dequantize()))


def test_the_shift_free_division_is_chosen_only_where_it_is_exact():
    wide = [s for s in GRIDS + MIDRISE_GRIDS if uniform.reciprocal_is_normal(s, jnp.float32)]
    narrow = [s for s in GRIDS + MIDRISE_GRIDS if s not in wide]
    assert {(s.bits, s.symmetric, s.midrise) for s in narrow} == {
        (2, True, False), (3, True, False), (2, False, False), (3, False, False), (2, True, True), (3, True, True)}
    big = np.float32(jnp.finfo(jnp.float32).max)
    tiny = float(jnp.finfo(jnp.float32).tiny)
    for spec in wide:  # the largest computed scale has a normal reciprocal
        scale, _ = uniform.scale_from_range(-big, big, spec)
        assert 1 / float(scale) >= tiny and float(jnp.float32(1) / scale) >= tiny, spec


# --- the mid-rise grid ------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_midrise_matches_reference_and_round_trips_packing(bits):
    x = np.asarray(normal(5, (4, 96)) * np.array([[0.1], [1.0], [10.0], [0.0]], np.float32))
    spec = QuantSpec(bits, midrise=True, channel_axes=(0,))
    qa = jquant.quantize(x, spec)
    x64 = x.astype(np.float64)
    absmax = np.max(np.abs(x64), axis=1, keepdims=True)
    s = absmax / 2 ** (bits - 1)
    t = x64 / np.where(s == 0, 1, s)
    away_from_boundaries = np.abs(t - np.round(t)) > 1e-4
    expected_q = np.clip(np.floor(t), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    q = np.asarray(qa.q)
    assert q.min() >= -2 ** (bits - 1) and q.max() <= 2 ** (bits - 1) - 1
    np.testing.assert_array_equal(q[away_from_boundaries], expected_q[away_from_boundaries])
    np.testing.assert_allclose(np.asarray(qa.scale)[:, 0], s[:, 0], rtol=1e-6)
    x_hat = np.asarray(qa.dequantize(), np.float64)
    np.testing.assert_allclose(x_hat, np.asarray(qa.scale, np.float64) * (q + 0.5) * (s > 0), rtol=1e-6)
    assert np.all(np.abs(x_hat - x64) <= s / 2 * (1 + 1e-5))  # every value within half a step
    assert np.all(x_hat[3] == 0)  # the all-zero row
    fq = np.asarray(jquant.fake_quant(jnp.asarray(x), spec))
    np.testing.assert_array_equal(fq, np.asarray(qa.dequantize()))


def test_midrise_has_one_more_level_than_midtread():
    x = normal(6, (1 << 14,))
    mid_tread = reference.mse(x, jquant.quantize(x, QuantSpec(2, calibration=MSE())).dequantize())
    mid_rise = reference.mse(x, jquant.quantize(x, QuantSpec(2, midrise=True, calibration=MSE())).dequantize())
    assert len(np.unique(np.asarray(jquant.quantize(x, QuantSpec(2, midrise=True)).q))) == 4
    assert mid_rise < 0.7 * mid_tread
