"""QArray as a pytree (jit, tree_map, key paths, device_put, vmap) and quantize/dequantize contracts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import QArray, QuantSpec

import reference
from helpers import jit_quantize, normal

SPECS = [
    QuantSpec(8),
    QuantSpec(8, symmetric=False, channel_axes=(1,)),
    QuantSpec(4, channel_axes=(1,), group_size=4),
    QuantSpec(3, symmetric=False, group_size=8, group_axis=1),
    QuantSpec(1, method="sign", channel_axes=(0,)),
]
IDS = [repr(s) for s in SPECS]


SHAPE = (8, 16)


def _assert_same_qarray(a, b):
    assert isinstance(a, QArray) and isinstance(b, QArray)
    assert (a.spec, a.shape, a.dtype) == (b.spec, b.shape, b.dtype)
    for x, y in zip((a.value, a.scale, a.zero_point), (b.value, b.scale, b.zero_point)):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_jit_takes_and_returns_qarrays(spec):
    x = normal(0, SHAPE)
    eager = jquant.quantize(x, spec)
    _assert_same_qarray(jit_quantize(x, spec), eager)  # bit for bit: test_determinism.py

    @jax.jit
    def double_scale(qa):
        return QArray(qa.value, qa.scale * 2, qa.zero_point, spec=qa.spec, shape=qa.shape, dtype=qa.dtype)

    doubled = double_scale(eager)
    assert isinstance(doubled, QArray) and doubled.spec == spec
    np.testing.assert_array_equal(np.asarray(doubled.dequantize()), 2 * np.asarray(eager.dequantize()))
    np.testing.assert_array_equal(np.asarray(jax.jit(jquant.dequantize)(eager)), np.asarray(eager.dequantize()))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_tree_map_and_key_paths(spec):
    qa = jit_quantize(normal(0, SHAPE), spec)
    same = jax.tree_util.tree_map(lambda a: a, qa)
    _assert_same_qarray(same, qa)
    names = ["value", "scale"] + ([] if spec.symmetric else ["zero_point"])
    paths, _ = jax.tree_util.tree_flatten_with_path(qa)
    assert [p[-1].name for p, _ in paths] == names
    assert [jax.tree_util.keystr(p) for p, _ in paths] == ["." + n for n in names]
    leaves, treedef = jax.tree_util.tree_flatten(qa)
    assert len(leaves) == len(names)
    _assert_same_qarray(jax.tree_util.tree_unflatten(treedef, leaves), qa)
    # a QArray nested in a parameter tree keeps its static metadata and its leaves
    tree = {"layer": {"kernel": qa, "bias": jnp.zeros(3)}}
    assert len(jax.tree_util.tree_leaves(tree)) == len(names) + 1
    scaled = jax.tree_util.tree_map(lambda a: a * 2 if a.dtype == jnp.float32 else a, tree)["layer"]["kernel"]
    np.testing.assert_array_equal(np.asarray(scaled.scale), 2 * np.asarray(qa.scale))


def test_device_put():
    qa = jit_quantize(normal(0, SHAPE), QuantSpec(4, symmetric=False, channel_axes=(1,)))
    device = jax.devices()[0]
    moved = jax.device_put(qa, device)
    _assert_same_qarray(moved, qa)
    for leaf in jax.tree_util.tree_leaves(moved):
        assert leaf.devices() == {device}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", [(), (5,), (3, 1, 4)])
def test_dequantize_returns_original_dtype_and_shape(dtype, shape):
    x = normal(0, shape, dtype)
    for spec in (QuantSpec(8), QuantSpec(2, symmetric=False), QuantSpec(1, method="sign")):
        qa = jit_quantize(x, spec)
        assert qa.dtype == dtype and qa.shape == shape and qa.ndim == len(shape)
        out = jax.jit(jquant.dequantize)(qa)
        assert out.dtype == dtype and out.shape == shape
        assert qa.scale.dtype == jnp.float32  # arithmetic in float32 for half inputs


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_vmap_equals_per_example_loop(spec):
    batch = normal(1, (5,) + SHAPE)
    f = lambda x: jquant.quantize(x, spec).dequantize()
    vmapped = np.asarray(jax.jit(jax.vmap(f))(batch))
    looped = np.stack([np.asarray(y) for y in jax.jit(lambda b: [f(x) for x in b])(batch)])
    np.testing.assert_array_equal(vmapped, looped)
    # and each example is quantized with its own scales (not the batch's)
    for x, out in zip(np.asarray(batch), vmapped):
        ref = reference.quantize(x, spec)
        np.testing.assert_allclose(out, ref.x_hat, rtol=1e-6, atol=1e-7)


def test_indexing_and_repr():
    qa = jit_quantize(normal(0, SHAPE), QuantSpec(4, channel_axes=(1,)))
    assert qa[...] is qa
    with pytest.raises(TypeError, match="dequantize"):
        qa[0]
    text = repr(qa)
    assert "\n" not in text and len(text) < 120
    assert repr(qa.spec) in text and "(8, 16)" in text and "float32" in text


@pytest.mark.parametrize("spec", [QuantSpec(4, symmetric=False, channel_axes=(-1,), group_size=32),
                                  QuantSpec(3, channel_axes=(1,)), QuantSpec(4, channel_axes=(-1,), group_axis=0, group_size=1)],
                         ids=repr)
def test_a_stack_quantized_per_layer_scans_into_each_layers_qarray(spec):
    from jquant._src.spec import stacked
    layers = normal(11, (3, 64, 4, 16)) if spec.group_axis == 0 else normal(11, (3, 64, 48))
    stack = jquant.quantize(layers, stacked(spec, 1))
    assert stack.scale.shape[0] == 3  # one scale set per layer

    def body(carry, layer):
        assert layer.spec == spec and layer.shape == layers.shape[1:]
        return carry, (layer.value, layer.scale, layer.dequantize())

    _, (values, scales, x_hat) = jax.lax.scan(body, None, stack)
    for i in range(3):
        alone = jquant.quantize(layers[i], spec)
        np.testing.assert_array_equal(np.asarray(values[i]), np.asarray(alone.value))
        np.testing.assert_array_equal(np.asarray(scales[i]), np.asarray(alone.scale))
        np.testing.assert_array_equal(np.asarray(x_hat[i]), np.asarray(alone.dequantize()))
