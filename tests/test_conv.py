"""jquant.conv_general_dilated / int_conv_general_dilated against NumPy int64 and float64 references."""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import jquant
from jquant import QuantSpec
from jquant._src import conv as conv_module

import reference
from helpers import int8_convs, normal

EPS32 = np.finfo(np.float32).eps
LAYOUTS = {1: [("NWC", "WIO", "NWC"), ("NCW", "OIW", "NCW"), ("WNC", "OWI", "CWN")],
           2: [("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW"), ("HWCN", "IOHW", "CHWN")]}


def _centred(qa, q):
    """q − z as int64 (the integers the convolution multiplies)."""
    q = np.asarray(q, np.int64)
    return q if qa.zero_point is None else q - np.asarray(qa.zero_point, np.int64)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _quantize_and_convolve(x, w, lspec, rspec, conv_args, route):
    """Both operands quantized and convolved in one compiled program (`route` only keys the
    compilation cache: the caller patches `conv._route`): (QArray, q, x̂) per operand, the int32
    accumulator and the float result."""
    del route
    strides, padding, lhs_dil, rhs_dil, dn, groups = conv_args
    lq, rq = jquant.quantize(x, lspec), jquant.quantize(w, rspec)
    acc = jquant.int_conv_general_dilated(lq, rq, strides, padding, lhs_dil, rhs_dil, dn, groups)
    y = jquant.conv_general_dilated(lq, rq, strides, padding, lhs_dil, rhs_dil, dn, groups)
    return (lq, lq.q, lq.dequantize()), (rq, rq.q, rq.dequantize()), acc, y


def _check(x, w, lspec, rspec, conv_args, route):
    """int32 accumulator == NumPy int64 conv of q − z; float result within f32 rounding of the
    float64 conv of the dequantized operands."""
    chunks = {"int": lambda rhs, dn: "int", "dot": lambda rhs, dn: "dot", "float dot": lambda rhs, dn: "float dot",
              "taps": lambda rhs, dn: "taps",
              "float": lambda rhs, dn: 1,  # float: in one conv or one per feature (the int32 accumulator)
              "float per feature": lambda rhs, dn: rhs.shape[dn.rhs_spec[1]], "chosen": None}[route]
    if route == "chosen":  # as `conv._route` chooses
        lhs, rhs, acc, y = _quantize_and_convolve(x, w, lspec, rspec, conv_args, route)
    else:
        with mock.patch.object(conv_module, "_route", lambda lhs, rhs, dn, groups, exact=True: chunks(rhs, dn)):
            lhs, rhs, acc, y = _quantize_and_convolve(x, w, lspec, rspec, conv_args, route)
    strides, padding, lhs_dil, rhs_dil, dn, groups = conv_args
    nsp = x.ndim - 2
    specs = lax.conv_dimension_numbers(x.shape, w.shape, dn)
    lhs_dil, rhs_dil = lhs_dil or (1,) * nsp, rhs_dil or (1,) * nsp
    if isinstance(padding, str):
        in_sp = [(x.shape[a] - 1) * d + 1 for a, d in zip(specs.lhs_spec[2:], lhs_dil)]
        k_sp = [(w.shape[a] - 1) * d + 1 for a, d in zip(specs.rhs_spec[2:], rhs_dil)]
        padding = lax.padtype_to_pads(in_sp, k_sp, strides, padding)
    ref = functools.partial(reference.conv_general_dilated, window_strides=strides, padding=padding,
                            lhs_dilation=lhs_dil, rhs_dilation=rhs_dil, specs=specs, feature_group_count=groups)
    assert acc.value.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(acc.value), ref(_centred(*lhs[:2]), _centred(*rhs[:2])))
    xf, wf = reference.as_f64(lhs[2]), reference.as_f64(rhs[2])
    expected, magnitude = ref(xf, wf), ref(np.abs(xf), np.abs(wf))
    assert y.shape == expected.shape and y.dtype == jnp.float32
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - expected), 8 * EPS32 * magnitude + 1e-30)


@st.composite
def conv_cases(draw, one_feature=None):
    """Shapes, conv arguments and specs: 1-2 spatial axes, strides, string or explicit padding,
    lhs/rhs dilation, feature groups, three layouts each; the activation per tensor or per batch
    entry, the kernel per output channel, symmetric or not, 2-8 bits or sign."""
    nsp = draw(st.integers(1, 2))
    one_feature = draw(st.booleans()) if one_feature is None else one_feature
    lhs_l, rhs_l, out_l = draw(st.sampled_from(LAYOUTS[nsp]))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    n, i, o = draw(st.integers(1, 3)), 1 if one_feature else draw(st.sampled_from([3, 4])), groups * draw(st.integers(1, 3))
    spatial = [draw(st.integers(1, 7)) for _ in range(nsp)]
    kernel = [draw(st.integers(1, 3)) for _ in range(nsp)]
    strides = tuple(draw(st.integers(1, 2)) for _ in range(nsp))
    rhs_dil = tuple(draw(st.integers(1, 2)) for _ in range(nsp))
    if draw(st.booleans()):
        padding, lhs_dil = draw(st.sampled_from(["SAME", "VALID"])), None
        if padding == "VALID":
            spatial = [max(s, (k - 1) * d + 1) for s, k, d in zip(spatial, kernel, rhs_dil)]
    else:
        padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(nsp))
        lhs_dil = tuple(draw(st.integers(1, 2)) for _ in range(nsp))
    sizes = {"N": n, "C": groups * i, "I": i, "O": o}
    sizes.update({"HW"[j] if nsp == 2 else "W": spatial[j] for j in range(nsp)})
    lshape = tuple(sizes[c] for c in lhs_l)
    ksizes = dict(sizes, **{"HW"[j] if nsp == 2 else "W": kernel[j] for j in range(nsp)})
    rshape = tuple(ksizes[c] for c in rhs_l)
    lspec = draw(st.sampled_from([
        QuantSpec(8), QuantSpec(8, symmetric=False), QuantSpec(8, symmetric=False, channel_axes=(lhs_l.index("N"),)),
        QuantSpec(4, symmetric=False), QuantSpec(1, method="sign")]))
    out_axis = rhs_l.index("O")
    rspec = draw(st.sampled_from([
        QuantSpec(8, channel_axes=(out_axis,)), QuantSpec(8, symmetric=False, channel_axes=(out_axis,)),
        QuantSpec(3, symmetric=False, channel_axes=(out_axis,)), QuantSpec(4), QuantSpec(2, channel_axes=(out_axis,)),
        QuantSpec(1, method="sign", channel_axes=(out_axis,))]))
    conv_args = (strides, padding, lhs_dil, rhs_dil, (lhs_l, rhs_l, out_l), groups)
    return lshape, rshape, lspec, rspec, conv_args


@settings(max_examples=12, deadline=None)
@given(conv_cases(), st.sampled_from(["int", "float", "float per feature"]), st.integers(0, 2 ** 16))
def test_integer_conv_equals_int64_reference(case, route, seed):
    """Any layout, strides, padding (zeros stay zeros for asymmetric activations), dilation and
    groups, on either route: the int32 bracket equals NumPy's int64 convolution bit for bit."""
    lshape, rshape, lspec, rspec, conv_args = case
    _check(normal(seed, lshape), normal(seed + 1, rshape), lspec, rspec, conv_args, route)


@settings(max_examples=10, deadline=None)
@given(conv_cases(one_feature=True), st.integers(0, 2 ** 16))
def test_taps_route_equals_int64_reference(case, seed):
    """One input feature per group (depthwise, any channel multiplier; one group too), any layout,
    strides, padding, dilations, per-batch zero-points: the sum over the kernel's taps equals
    NumPy's int64 convolution bit for bit."""
    lshape, rshape, lspec, rspec, conv_args = case
    _check(normal(seed, lshape), normal(seed + 1, rshape), lspec, rspec, conv_args, "taps")


@pytest.mark.parametrize("multiplier, layout", [(1, ("NHWC", "HWIO", "NHWC")), (2, ("NCHW", "OIHW", "NCHW"))])
def test_depthwise_conv_takes_the_taps_and_is_exact(multiplier, layout):
    """A MobileNet-sized depthwise conv (56×56×64, 3×3, batch 8, SAME, asymmetric activation and
    kernel): the chosen route is the taps' int32 sum (no convolution in the program), exact."""
    x, w = normal(4, (8, 56, 56, 64)), normal(5, (3, 3, 1, 64 * multiplier))
    if layout[0] == "NCHW":
        x, w = jnp.transpose(x[:2], (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
    lspec = QuantSpec(8, symmetric=False)
    rspec = QuantSpec(8, symmetric=False, channel_axes=(layout[1].index("O"),))
    lq, rq = jquant.quantize(x, lspec), jquant.quantize(w, rspec)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, layout)
    assert conv_module._route(lq, rq, dn, 64) == conv_module._route(lq, rq, dn, 64, exact=False) == "taps"
    jaxpr = jax.make_jaxpr(lambda a, b: jquant.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=layout,
                                                                     feature_group_count=64))(lq, rq)
    assert "conv_general_dilated" not in str(jaxpr)
    _check(x, w, lspec, rspec, ((1, 1), "SAME", None, None, layout, 64), "chosen")


def test_resnet_sized_conv_is_exact():
    """56×56×64 → 64, 3×3, batch 8 (the int route, SAME padding, an asymmetric activation so the
    padding corrections are exercised), and the same conv NCHW/OIHW (the float route)."""
    x, w = normal(0, (8, 56, 56, 64)), normal(1, (3, 3, 64, 64))
    lspec, rspec = QuantSpec(8, symmetric=False), QuantSpec(8, channel_axes=(3,))
    assert conv_module._route(jquant.quantize(x, lspec), jquant.quantize(w, rspec),
                              lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC")), 1) == "int"
    _check(x, w, lspec, rspec, ((1, 1), "SAME", None, None, ("NHWC", "HWIO", "NHWC"), 1), "int")
    xt, wt = jnp.transpose(x[:2], (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
    _check(xt, wt, lspec, QuantSpec(8, channel_axes=(0,)), ((2, 2), "SAME", None, None, ("NCHW", "OIHW", "NCHW"), 1),
           "chosen")  # 9·64·255·127 ≥ 2^24: two chunks of 32 input features


@pytest.mark.parametrize("strides, padding, lhs_dil", [((1, 1), "SAME", None), ((2, 2), "VALID", None),
                                                       ((2, 1), ((1, 0), (2, -1)), (2, 1))])
def test_one_by_one_conv_on_a_dot(strides, padding, lhs_dil):
    """A 1×1 kernel channels-last (a ResNet projection) is the strided, zero-point-padded input times
    the (I, O) kernel as one int8 matrix product: exact, per-batch zero-points and an asymmetric
    kernel included; with few taps the float result is the f32 dot of the dequantized operands."""
    x, w = normal(2, (3, 9, 7, 8)), normal(3, (1, 1, 8, 16))
    lspec = QuantSpec(8, symmetric=False, channel_axes=(0,))
    rspec = QuantSpec(8, symmetric=False, channel_axes=(3,))
    dn = ("NHWC", "HWIO", "NHWC")
    route = functools.partial(conv_module._route, jquant.quantize(x, lspec), jquant.quantize(w, rspec),
                              lax.conv_dimension_numbers(x.shape, w.shape, dn), 1)
    assert route() == "dot" and route(exact=False) == "float dot"
    _check(x, w, lspec, rspec, (strides, padding, lhs_dil, None, dn, 1), "dot")
    _check(x, w, lspec, rspec, (strides, padding, lhs_dil, None, dn, 1), "float dot")


def test_route_choice():
    """Channels-last with input features a multiple of 4 → int (a 1×1 kernel: dot); 1 or 3 input
    features, another layout → the exact float route, its input features cut into the fewest chunks
    that keep each f32 conv below 2^24 (a number of chunks). A float result also takes the float
    route (the f32 conv of the dequantized operands, or dot) under 128 taps."""
    from jquant._src.dot import Operand

    def route(xs, ws, spec=("NHWC", "HWIO", "NHWC"), rspec=QuantSpec(8), exact=True, groups=1):
        dn = lax.conv_dimension_numbers(xs, ws, spec)
        return conv_module._route(Operand(xs, QuantSpec(8)), Operand(ws, rspec), dn, groups, exact)

    assert route((1, 8, 8, 8), (3, 3, 8, 4)) == "int"
    assert route((1, 8, 8, 64), (1, 1, 64, 4)) == "dot"
    # a float result: the int8 kernel from 128 taps (K = window × input features) on
    assert route((1, 8, 8, 16), (3, 3, 16, 4), exact=False) == "int"
    assert route((1, 8, 8, 8), (3, 3, 8, 4), exact=False) == "float"
    assert route((1, 8, 8, 128), (1, 1, 128, 4), exact=False) == "dot"
    assert route((1, 8, 8, 64), (1, 1, 64, 4), exact=False) == "float dot"
    assert route((1, 128, 8, 8), (8, 128, 3, 3), ("NCHW", "OIHW", "NCHW"), exact=False) == "float"
    assert route((1, 8, 8, 3), (3, 3, 3, 4)) == 1
    assert route((1, 8, 8, 1), (3, 3, 1, 4)) == 1
    assert route((1, 8, 8, 8), (8, 8, 3, 3), ("NCHW", "OIHW", "NCHW")) == 1
    assert route((1, 128, 8, 8), (8, 128, 3, 3), ("NCHW", "OIHW", "NCHW")) == 2  # 9·64·127² < 2^24 ≤ 9·128·127²
    assert route((1, 8, 8, 8), (8, 8, 3, 3), ("NCHW", "OIHW", "NCHW"), QuantSpec(4)) == 1
    # one input feature per group, several groups (depthwise, any layout): the taps, up to 9×9
    for exact in (True, False):
        assert route((1, 8, 8, 16), (3, 3, 1, 32), groups=16, exact=exact) == "taps"
        assert route((1, 16, 8, 8), (16, 1, 9, 9), ("NCHW", "OIHW", "NCHW"), groups=16, exact=exact) == "taps"
    assert route((1, 16, 12, 12), (16, 1, 11, 11), ("NCHW", "OIHW", "NCHW"), groups=16) == 1
    assert route((1, 8, 8, 1), (3, 3, 1, 4), exact=False) == "float"  # one group: XLA's conv is fast


def test_bad_operands_raise_clear_errors():
    x, w = jnp.ones((2, 6, 6, 4)), jnp.ones((3, 3, 4, 8))
    q = lambda a, spec: jquant.quantize(a, spec)
    args = ((1, 1), "SAME", None, None, ("NHWC", "HWIO", "NHWC"))
    with pytest.raises(ValueError, match="sums over"):  # a scale per input feature
        jquant.int_conv_general_dilated(q(x, QuantSpec(8)), q(w, QuantSpec(8, channel_axes=(2,))), *args)
    with pytest.raises(ValueError, match="sums over"):  # an activation scale per spatial row
        jquant.conv_general_dilated(x, w, *args, lhs_spec=QuantSpec(8, channel_axes=(1,)), rhs_spec=QuantSpec(8))
    with pytest.raises(ValueError, match="grouped scales"):
        jquant.int_conv_general_dilated(q(x, QuantSpec(8)), q(w, QuantSpec(8, channel_axes=(3,), group_size=2)), *args)
    with pytest.raises(ValueError, match="no integer grid"):
        jquant.int_conv_general_dilated(q(x, QuantSpec(8)), q(w, QuantSpec(4, method="nf4", group_size=4)), *args)
    with pytest.raises(ValueError, match="could overflow"):  # K = 9·4096 taps of 255 × 255 ≥ 2^31
        big_x, big_w = jnp.ones((1, 3, 3, 4096)), jnp.ones((3, 3, 4096, 1))
        jax.eval_shape(lambda a, b: jquant.int_conv_general_dilated(
            q(a, QuantSpec(8, symmetric=False)), q(b, QuantSpec(8, symmetric=False)), *args), big_x, big_w)
    with pytest.raises(TypeError, match="must be a QArray"):
        jquant.int_conv_general_dilated(x, q(w, QuantSpec(8)), *args)
    with pytest.raises(ValueError, match="float dtype"):
        jquant.conv_general_dilated(x, w, *args, preferred_element_type=jnp.int32, lhs_spec=QuantSpec(8),
                                    rhs_spec=QuantSpec(8))
    with pytest.raises(ValueError, match="already a QArray"):
        jquant.conv_general_dilated(q(x, QuantSpec(8)), w, *args, lhs_spec=QuantSpec(8))
    with pytest.raises(TypeError, match="lhs of shape"):
        jquant.conv_general_dilated(x.astype(jnp.int32), w, *args, lhs_spec=QuantSpec(8))


def test_quant_conv_qat_forward_on_the_integer_path_equals_serving():
    """Above the QuantDot size threshold the QAT forward is the integer conv (what serving
    computes, to the rounding of s_x·s_w) with the fake-quantized float conv's STE gradient; below it,
    or where serving takes the float route (72 taps), the float conv of the fake-quantized operands
    (equal to float rounding)."""
    op = jquant.QuantConv(weight=QuantSpec(8, channel_axes=(3,)), act=QuantSpec(8, symmetric=False))
    args = ((1, 1), "SAME", None, None, ("NHWC", "HWIO", "NHWC"))
    for x, w, large, integer in ((normal(0, (8, 32, 32, 32)), normal(1, (3, 3, 32, 64)), True, True),
                                 (normal(0, (4, 16, 16, 8)), normal(1, (3, 3, 8, 64)), True, False),
                                 (normal(0, (2, 8, 8, 8)), normal(1, (3, 3, 8, 8)), False, False)):
        macs = x.shape[0] * x.shape[1] * x.shape[2] * w.size
        assert (macs >= jquant._src.ops.INTEGER_QAT_MIN_MACS) == large
        assert int8_convs(jax.make_jaxpr(lambda a, b: op(a, b, *args))(x, w)) == integer
        qat = jax.jit(lambda a, b: op(a, b, *args))(x, w)
        served = jax.jit(lambda a, b: op(a, b, *args))(x, jquant.quantize(w, op.weight))
        if integer:  # the same int32 brackets; only the order of the scale products may differ
            np.testing.assert_allclose(np.asarray(qat), np.asarray(served), rtol=0,
                                       atol=4 * EPS32 * float(jnp.max(jnp.abs(served))))
        else:
            np.testing.assert_allclose(np.asarray(qat), np.asarray(served), rtol=1e-5, atol=1e-5)
        grad = jax.jit(jax.grad(lambda a, b: jnp.sum(op(a, b, *args) ** 2), argnums=(0, 1)))(x, w)
        ste = jax.grad(lambda a, b: jnp.sum(op._fake_quant_conv(a, b, args + (1, 1, None, None), None, None) ** 2),
                       argnums=(0, 1))(x, w)
        for g, s in zip(grad, ste):
            np.testing.assert_allclose(np.asarray(g), np.asarray(s), rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(s))))
