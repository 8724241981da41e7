"""Floating-point formats (FP8 e4m3/e5m2, MXFP8, MXFP4, NVFP4) against ml_dtypes' casts and the
NumPy float64 reference of `tests/reference.py`, through quantize / fake_quant / quantize_params /
report / checkpoints, and the acceptance checks of issue 16 on a heavy-tailed tensor."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jquant
from jquant import FP8E4M3, FP8E5M2, MXFP4, MXFP8, NVFP4, QuantSpec
from jquant._src import formats

import reference
from helpers import quantize_jit

SPECS = {  # the layouts for a Dense kernel (in, out): blocks along `in`
    "fp8_e4m3": QuantSpec(8, channel_axes=(1,), method="fp8_e4m3"),
    "fp8_e5m2": QuantSpec(8, channel_axes=(1,), method="fp8_e5m2"),
    "mxfp8": QuantSpec(8, channel_axes=(1,), group_size=32, method="mxfp8"),
    "mxfp4": QuantSpec(4, channel_axes=(1,), group_size=32, method="mxfp4"),
    "nvfp4": QuantSpec(4, channel_axes=(1,), group_size=16, method="nvfp4"),
}
fake_quant_jit = jax.jit(jquant.fake_quant, static_argnums=1)
OBJECTS = {"fp8_e4m3": FP8E4M3(), "fp8_e5m2": FP8E5M2(), "mxfp8": MXFP8(), "mxfp4": MXFP4(), "nvfp4": NVFP4()}


def heavy_tailed(shape, seed=0):
    """Student-t (3 degrees of freedom) weights with a few channels zeroed: outliers and zero blocks."""
    w = np.random.default_rng(seed).standard_t(3, shape).astype(np.float32) * 0.02
    w[:, 3] = 0.0
    return jnp.asarray(w)


@pytest.mark.parametrize("name", SPECS)
def test_names_are_aliases_of_the_format_objects(name):
    spec = SPECS[name]
    assert spec.method is formats.FORMATS[name] and spec.method == OBJECTS[name]
    assert QuantSpec(spec.bits, channel_axes=(1,), group_size=spec.group_size, method=OBJECTS[name]) == spec
    assert f"method={name!r}" in repr(spec)


def test_acceptance_on_a_heavy_tailed_tensor():
    """MSE ≤ 1.02× the reference rounding, bits/weight as stated, zero channels exact, fake_quant
    bit-equal to quantize→dequantize, NVFP4 more accurate than MXFP4."""
    w = heavy_tailed((1024, 256))
    bits = {"fp8_e4m3": 8 + 32 / 1024, "fp8_e5m2": 8 + 32 / 1024, "mxfp8": 8.25, "mxfp4": 4.25,
            "nvfp4": 4.5 + 32 / w.size}
    errors = {}
    for name, spec in SPECS.items():
        qa, _, w_hat = quantize_jit(w, spec)
        _, ref = reference.float_quantize(w, spec, refine=False)  # the rules (MX: OCP's)
        errors[name] = reference.mse(w, w_hat)
        assert errors[name] <= 1.02 * reference.mse(w, ref), name
        if name.startswith("mx"):  # the refined exponent (module docstring) is strictly better here
            assert errors[name] < reference.mse(w, ref), name
        assert qa.bits_per_weight == pytest.approx(bits[name], rel=1e-12), name
        assert np.all(np.asarray(w_hat)[:, 3] == 0), name
        np.testing.assert_array_equal(np.asarray(fake_quant_jit(w, spec)), np.asarray(w_hat), err_msg=name)
    assert errors["nvfp4"] < errors["mxfp4"]
    assert errors["fp8_e4m3"] < errors["fp8_e5m2"]


@pytest.mark.parametrize("name", ["mxfp8", "mxfp4"])
def test_mx_is_the_reference_bit_for_bit(name):
    """Power-of-two scales make x / s exact, so x̂ equals the float64 reference exactly; the scales
    are E8M0 codes, the elements ml_dtypes' bytes (FP8) or E2M1 codes (FP4)."""
    spec = SPECS[name]
    w = heavy_tailed((256, 64), seed=1)
    qa, q, w_hat = quantize_jit(w, spec)
    scale, ref = reference.float_quantize(w, spec)
    np.testing.assert_array_equal(np.asarray(w_hat, np.float64), ref)
    assert qa.scale.dtype == jnp.uint8 and qa.scale.shape == (8, 1, 64)
    e8m0 = np.asarray(qa.scale).view(ml_dtypes.float8_e8m0fnu).astype(np.float64)
    np.testing.assert_array_equal(np.broadcast_to(e8m0, (8, 32, 64)).reshape(w.shape), np.where(scale == 0, 2.0 ** -127, scale))
    element = ml_dtypes.float8_e4m3fn if name == "mxfp8" else ml_dtypes.float4_e2m1fn
    expected = reference.float_round(np.asarray(w, np.float64) / np.where(scale == 0, 1, scale), element)
    if name == "mxfp8":
        np.testing.assert_array_equal(np.asarray(q).view(ml_dtypes.float8_e4m3fn).astype(np.float64), expected)
    else:  # the E2M1 code is ml_dtypes' byte of the same value
        codes = np.asarray(q).astype(np.uint8)
        assert codes.max() < 16 and qa.value.dtype == jnp.uint8 and qa.value.shape == (256, 32)
        np.testing.assert_array_equal(codes.view(ml_dtypes.float4_e2m1fn).astype(np.float64) == expected, True)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_is_the_documented_float32_computation_bit_for_bit(name):
    for spec in (SPECS[name], QuantSpec(8, method=name), QuantSpec(8, channel_axes=(1,), group_size=64, method=name)):
        w = heavy_tailed((512, 96), seed=2)
        qa, q, w_hat = quantize_jit(w, spec)
        np.testing.assert_array_equal(np.asarray(w_hat), reference.float_quantize_f32(w, spec), err_msg=repr(spec))
        if spec == SPECS[name]:  # per channel: the stored bytes are ml_dtypes' bytes, x̂ = scale · element
            dtype = ml_dtypes.float8_e4m3fn if name == "fp8_e4m3" else ml_dtypes.float8_e5m2
            stored = np.asarray(q).view(dtype).astype(np.float32)
            np.testing.assert_array_equal(stored * np.asarray(qa.scale), np.asarray(w_hat))


def test_nvfp4_scales_are_e4m3_relative_to_the_tensor_scale():
    spec = SPECS["nvfp4"]
    w = heavy_tailed((512, 64), seed=3)
    qa, _, w_hat = quantize_jit(w, spec)
    assert qa.scale.dtype == jnp.uint8 and qa.scale.shape == (32, 1, 64)
    assert qa.zero_point.dtype == jnp.float32 and qa.zero_point.shape == (1, 1, 1)
    np.testing.assert_allclose(float(qa.zero_point.ravel()[0]), float(jnp.max(jnp.abs(w))) / (448 * 6), rtol=1e-6)
    scale, ref = reference.float_quantize(w, spec)
    # float32 t and x·(1/s) against float64: the same element but for values within rounding of a tie
    assert np.mean(~np.isclose(np.asarray(w_hat, np.float64), ref, rtol=1e-6, atol=0)) < 1e-3
    assert reference.mse(w, w_hat) <= 1.02 * reference.mse(w, ref)


FLOAT_VALUES = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=8)
@given(name=st.sampled_from(sorted(SPECS)), blocks=st.integers(1, 3), cols=st.integers(1, 5),
       magnitude=st.sampled_from([2.0 ** -12, 1.0, 300.0]), data=st.data())
def test_hypothesis_shapes_and_values(name, blocks, cols, magnitude, data):
    """Random shapes and values — saturating outliers, all-zero blocks, element subnormals (small
    values in a block with a large one) — against the reference, in float32, bf16 and f16."""
    spec = SPECS[name]
    rows = blocks * 32
    x = np.random.default_rng(data.draw(st.integers(0, 2 ** 16))).standard_normal((rows, cols)) * magnitude
    x[data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, cols - 1))] = data.draw(FLOAT_VALUES)
    x[:16 if blocks > 1 else 0] = 0.0  # an all-zero block (or half of one)
    x = x.astype(np.float32)
    dtype = data.draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]))
    xj = jnp.asarray(x, dtype)
    _, _, x_hat = quantize_jit(xj, spec)
    assert x_hat.dtype == dtype
    got = reference.as_f64(x_hat)
    if name.startswith("fp8"):  # the documented float32 computation, bit for bit
        ref = reference.float_quantize_f32(reference.as_f64(xj), spec)
    else:
        ref = reference.float_quantize(reference.as_f64(xj), spec)[1]
    ref = reference.as_f64(jnp.asarray(ref, dtype))
    if name == "nvfp4":  # float32 t·e against float64: the same elements but within rounding of a tie
        assert np.mean(~np.isclose(got, ref, rtol=1e-6, atol=0)) <= 0.01
    else:
        np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got[:16 if blocks > 1 else 0], 0.0)
    np.testing.assert_array_equal(reference.as_f64(fake_quant_jit(xj, spec)), got)


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "fp8_e4m3"])
def test_ste_passes_inside_and_cuts_where_it_saturates(name):
    spec = SPECS[name]
    w = heavy_tailed((256, 32), seed=4)
    grad = jax.grad(lambda v: jnp.sum(jquant.fake_quant(v, spec) * 3.0))(w)
    if name == "fp8_e4m3":  # a computed FP8 scale never saturates
        np.testing.assert_array_equal(np.asarray(grad), 3.0)
        fixed = jnp.full((1, 32), 0.02 / 448)
        grad = jax.grad(lambda v: jnp.sum(jquant.fake_quant(v, spec, scale=fixed)))(w)
        v = np.abs(np.asarray(w, np.float64)) / (0.02 / 448)
        np.testing.assert_array_equal(np.asarray(grad) == 1.0, v <= 464 * (1 + 1e-6))
        assert 0 < np.mean(np.asarray(grad) == 0) < 0.5
        return
    scale, _ = reference.float_quantize(w, spec)
    v = np.abs(np.asarray(w, np.float64)) / np.where(scale == 0, 1, scale)
    inside = np.asarray(grad) == 3.0
    np.testing.assert_array_equal(inside | (np.asarray(grad) == 0), True)
    np.testing.assert_array_equal(inside, v <= 7.0)  # E2M1: 6 plus half its top step
    # The OCP rule puts a block's amax in [4, 8)·s, so MXFP4 saturates some; an NVFP4 scale rounds
    # by at most 1/16, so its amax stays below 6.4·s, which rounds to 6.
    assert inside.all() == (name == "nvfp4")


def test_nan_is_not_hidden_and_zeros_stay_zero():
    for name, spec in SPECS.items():
        w = np.array(heavy_tailed((64, 8)))
        w[5, 2] = np.nan
        w[:, 6] = 0.0
        w_hat = np.asarray(quantize_jit(jnp.asarray(w), spec)[2])
        assert np.isnan(w_hat[5, 2]), name
        if name == "nvfp4":  # the tensor scale is NaN: every block is
            assert np.isnan(w_hat).all()
            continue
        block = slice(0, 32) if spec.group_size else slice(None)
        assert np.isnan(w_hat[block, 2]).all() and not np.isnan(np.delete(w_hat, 2, axis=1)).any(), name
        np.testing.assert_array_equal(w_hat[:, 6], 0.0)


def test_realistic_4096_square_bf16_kernel():
    w = jnp.asarray(heavy_tailed((4096, 4096), seed=5), jnp.bfloat16)
    for name in ("fp8_e4m3", "mxfp4", "nvfp4"):
        qa, _, w_hat = quantize_jit(w, SPECS[name])
        assert w_hat.dtype == jnp.bfloat16
        assert qa.nbytes == {"fp8_e4m3": 4096 * 4096 + 4 * 4096, "mxfp4": 4096 * 4096 // 2 + 4096 * 4096 // 32,
                             "nvfp4": 4096 * 4096 // 2 + 4096 * 4096 // 16 + 4}[name]
        if name == "nvfp4":  # its tensor scale is the whole kernel's: checked on smaller tensors above
            continue
        cols = (slice(None), slice(0, 64))  # whole channels and blocks: the reference on a slice
        _, ref = reference.float_quantize(reference.as_f64(w[cols]), SPECS[name])
        assert reference.mse(w[cols], w_hat[cols]) <= 1.02 * reference.mse(w[cols], jnp.asarray(ref, jnp.bfloat16))


def test_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match="bits=4.*FP8 is 8-bit"):
        QuantSpec(4, method="fp8_e4m3")
    with pytest.raises(ValueError, match="group_size=None.*blocks of 32.*group_size=32"):
        QuantSpec(4, channel_axes=(1,), method="mxfp4")
    with pytest.raises(ValueError, match="elements are 4-bit"):
        QuantSpec(8, group_size=16, method="nvfp4")
    with pytest.raises(ValueError, match="no zero-point"):
        QuantSpec(8, symmetric=False, method="fp8_e5m2")
    with pytest.raises(ValueError, match=r"axes \[1\] share it.*channel_axes=\(1,\)"):
        jquant.quantize(jnp.ones((64, 8)), QuantSpec(4, group_size=32, method="mxfp4"))
    with pytest.raises(ValueError, match="E8M0 values"):
        jquant.quantize(jnp.ones((64, 8)), SPECS["mxfp4"], scale=jnp.full((2, 1, 8), 0.3))
    with pytest.raises(ValueError, match="tensor scale"):
        jquant.quantize(jnp.ones((64, 8)), SPECS["nvfp4"], scale=jnp.ones((4, 1, 8)))


def test_fixed_scales_round_trip():
    """A QArray's stored scales given back (GPTQ does this) reproduce it bit for bit."""
    w = heavy_tailed((128, 16), seed=6)
    for name in ("fp8_e5m2", "mxfp4", "nvfp4"):
        spec = SPECS[name]
        qa = quantize_jit(w, spec)[0]
        again = quantize_jit(w, spec, qa.scale, qa.zero_point)[0]
        np.testing.assert_array_equal(np.asarray(again.value), np.asarray(qa.value), err_msg=name)
    mx = jquant.quantize(w, SPECS["mxfp4"])
    as_floats = jquant.quantize(w, SPECS["mxfp4"], scale=np.asarray(mx.scale).view(ml_dtypes.float8_e8m0fnu)
                                .astype(np.float32))
    np.testing.assert_array_equal(np.asarray(as_floats.value), np.asarray(mx.value))


def test_quantize_params_report_and_checkpoints(tmp_path):
    """One tree with every storage kind: int8 bytes + float32 scales (FP8), packed codes + E8M0
    bytes (MXFP4), E4M3 bytes + the tensor scale (NVFP4): Orbax and safetensors bit-exact."""
    names = ("fp8_e4m3", "mxfp4", "nvfp4")
    params = {name: {"kernel": heavy_tailed((128, 48), seed=7 + i)} for i, name in enumerate(names)}
    policy = jquant.Policy([jquant.Rule(f"{name}/kernel", SPECS[name]) for name in names])
    tree = jquant.quantize_params(params, policy)
    rep = jquant.report(params, tree, policy)
    assert [row.bits_per_weight for row in rep.rows] == [tree[n]["kernel"].bits_per_weight for n in names]
    jquant.save(tmp_path / "ckpt", tree)
    jquant.export_safetensors(tmp_path / "tree.safetensors", tree)
    for loaded in (jquant.load(tmp_path / "ckpt"), jquant.import_safetensors(tmp_path / "tree.safetensors")):
        for name in names:
            got, want = loaded[name]["kernel"], tree[name]["kernel"]
            assert got.spec == want.spec
            for field in ("value", "scale", "zero_point"):
                a, b = getattr(got, field), getattr(want, field)
                assert (a is None) == (b is None)
                if a is not None:
                    assert a.dtype == b.dtype
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("element, dtype", [("E4M3", ml_dtypes.float8_e4m3fn), ("E5M2", ml_dtypes.float8_e5m2),
                                            ("E2M1", ml_dtypes.float4_e2m1fn)])
def test_element_rounding_is_ml_dtypes_cast_on_a_dense_sweep(element, dtype):
    """Every tie, both sides of every level, subnormals, saturation: codes, values and decoding."""
    from jquant._src.formats import floating
    fmt = getattr(floating, element)
    largest = float(ml_dtypes.finfo(dtype).max)
    levels = np.unique(np.abs(np.arange(256 if fmt.bits == 8 else 16, dtype=np.uint8).view(dtype).astype(np.float64)))
    levels = levels[np.isfinite(levels)]
    mids = (levels[1:] + levels[:-1]) / 2
    v = np.concatenate([levels, mids, np.nextafter(mids, 0), np.nextafter(mids, np.inf), [largest * 1.1, 1e30]])
    v = np.concatenate([v, -v]).astype(np.float32)
    want = np.clip(v, -largest, largest).astype(dtype)
    np.testing.assert_array_equal(np.asarray(fmt.round(jnp.asarray(v))), want.astype(np.float32))
    codes = np.asarray(fmt.encode(jnp.asarray(v)))
    np.testing.assert_array_equal(codes.astype(np.uint8), want.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(fmt.decode(jnp.asarray(codes), jnp.float32)), want.astype(np.float32))


def test_flax_weight_only_qat_and_serving_linen_and_nnx():
    """The generic paths: QAT fake-quantizes the kernels, serving multiplies the packed QArrays
    (the weight-only dot), and both compute the same x̂·ŵ (Linen with NVFP4, NNX with MXFP4)."""
    from flax import nnx
    from helpers import Mlp, NnxMlp, normal
    x = normal(11, (16, 256))
    policy = jquant.Policy([jquant.Rule(r".*kernel", SPECS["nvfp4"])])
    model = Mlp(hidden=128, outputs=32)
    params = model.init(jax.random.key(0), x)
    qmodel = jquant.flax.quantize(model, policy)
    qat = jax.jit(qmodel.apply)(params, x)
    served = jax.jit(qmodel.apply)(jquant.quantize_params(params, policy), x)
    np.testing.assert_allclose(np.asarray(served), np.asarray(qat), rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(qat))))
    assert float(jnp.max(jnp.abs(qat - model.apply(params, x)))) > 1e-3

    policy = jquant.Policy([jquant.Rule(r".*kernel", SPECS["mxfp4"])])
    net = NnxMlp(256, 128, 32, nnx.Rngs(0))
    jquant.flax.quantize(net, policy)
    call = nnx.jit(lambda m, x: m(x))
    qat = call(net, x)
    nnx.update(net, jquant.quantize_params(nnx.state(net, nnx.Param), policy))
    assert isinstance(net.hidden.kernel.get_value(), jquant.QArray)
    np.testing.assert_allclose(np.asarray(call(net, x)), np.asarray(qat), rtol=1e-4,
                               atol=1e-4 * float(jnp.max(jnp.abs(qat))))


def test_search_policy_takes_floating_point_candidates():
    rng = np.random.default_rng(12)
    params = {"a": {"kernel": jnp.asarray(rng.standard_normal((64, 64)) / 8, jnp.float32)},
              "b": {"kernel": jnp.asarray(rng.standard_t(3, (64, 64)) / 10, jnp.float32)}}
    batches = [(jnp.asarray(rng.standard_normal((32, 64)), jnp.float32),)]
    fn = lambda p, x: jnp.tanh(x @ p["a"]["kernel"]) @ p["b"]["kernel"]  # noqa: E731
    candidates = [SPECS["fp8_e4m3"], SPECS["mxfp4"]]
    policy, table = jquant.ptq.search_policy(fn, params, batches, 6.5, candidates)
    assert table.bits_per_weight <= 6.5
    tree = jquant.quantize_params(params, policy)
    assert sum(tree[n]["kernel"].nbytes for n in "ab") == table.bytes
    assert {tree[n]["kernel"].spec.method.name for n in "ab"} == {"fp8_e4m3", "mxfp4"}
    assert len({r.chosen for r in table.rows}) > 1  # a mixed choice: 6.5 bits do not fit FP8 (8.5) everywhere


def test_stacked_layers_keep_their_own_scales_and_scan_slices_them():
    """`Rule(stacked=1)`: each layer of an (L, in, out) stack is quantized on its own (NVFP4: its
    own tensor scale too), and `lax.map` over the stacked QArray hands each layer its QArray."""
    stack = jnp.stack([heavy_tailed((64, 32), seed=13), 100 * heavy_tailed((64, 32), seed=14)])
    for name in ("nvfp4", "mxfp4", "fp8_e4m3"):
        tree = jquant.quantize_params({"k": stack}, jquant.Policy([jquant.Rule("k", SPECS[name], stacked=1)]))
        sliced = jax.lax.map(lambda qa: qa.dequantize(), tree["k"])
        for layer in range(2):
            alone = quantize_jit(stack[layer], SPECS[name])[2]
            np.testing.assert_array_equal(np.asarray(sliced[layer]), np.asarray(alone), err_msg=name)
