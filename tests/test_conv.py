"""jquant.conv_general_dilated / int_conv_general_dilated against NumPy int64 and float64 references."""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import jquant
from jquant import QuantSpec
from jquant._src import conv as conv_module

import reference
from helpers import normal

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
    with mock.patch.object(conv_module, "_route", lambda *args: route):
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
def conv_cases(draw):
    """Shapes, conv arguments and specs: 1-2 spatial axes, strides, string or explicit padding,
    lhs/rhs dilation, feature groups, three layouts each; the activation per tensor or per batch
    entry, the kernel per output channel, symmetric or not, 2-8 bits or sign."""
    nsp = draw(st.integers(1, 2))
    lhs_l, rhs_l, out_l = draw(st.sampled_from(LAYOUTS[nsp]))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    n, i, o = draw(st.integers(1, 3)), draw(st.sampled_from([1, 3, 4])), groups * draw(st.integers(1, 3))
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
@given(conv_cases(), st.sampled_from(["int", "float"]), st.integers(0, 2 ** 16))
def test_integer_conv_equals_int64_reference(case, route, seed):
    """Any layout, strides, padding (zeros stay zeros for asymmetric activations), dilation and
    groups, on either route: the int32 bracket equals NumPy's int64 convolution bit for bit."""
    lshape, rshape, lspec, rspec, conv_args = case
    _check(normal(seed, lshape), normal(seed + 1, rshape), lspec, rspec, conv_args, route)
