"""Formats as objects: the names are aliases of the registered objects, and a new format is one
class (here a power-of-two-scale grid defined in this file) that every path accepts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import KMeans, NF4, QuantSpec, Sign, Uniform
from jquant._src import formats
from jquant._src.formats.uniform import calibrated_range, scale_from_range


@pytest.mark.parametrize("name, fmt, bits", [("uniform", Uniform(), 8), ("sign", Sign(), 1), ("kmeans", KMeans(), 3),
                                             ("nf4", NF4(), 4)])
def test_names_are_aliases_of_the_format_objects(name, fmt, bits):
    by_name, by_object = QuantSpec(bits, method=name), QuantSpec(bits, method=fmt)
    assert by_name == by_object and hash(by_name) == hash(by_object)
    assert by_name.method is formats.FORMATS[name] and by_name.method.name == name
    assert repr(by_name) == repr(by_object)
    assert formats.resolve(name) is formats.FORMATS[name]


@dataclasses.dataclass(frozen=True)
class PowerOfTwo(Uniform):
    """A uniform grid whose scale is rounded up to a power of two (a fixed-point format)."""

    name = "pow2"

    def params(self, x, spec, lay, scale=None, zero_point=None):
        if scale is not None:
            return super().params(x, spec, lay, scale, zero_point)
        scale, zero_point = scale_from_range(*calibrated_range(lay.to_grouped(x.astype(jnp.float32)), spec, lay), spec)
        return jnp.where(scale > 0, 2.0 ** jnp.ceil(jnp.log2(scale)), 0.0), zero_point


def test_a_new_format_is_one_class_that_every_path_accepts(tmp_path, monkeypatch):
    spec = QuantSpec(8, channel_axes=(1,), method=PowerOfTwo())
    assert repr(spec) == "QuantSpec(bits=8, channel_axes=(1,), method=PowerOfTwo())"
    w = jax.random.normal(jax.random.key(0), (256, 64))
    qa = jquant.quantize(w, spec)
    log2 = np.log2(np.asarray(qa.scale))
    np.testing.assert_array_equal(log2, np.round(log2))  # every scale a power of two
    w_hat = np.asarray(qa.dequantize())
    assert np.max(np.abs(w_hat - np.asarray(w)) / np.asarray(qa.scale)[0]) <= 0.5  # within half a step
    np.testing.assert_array_equal(np.asarray(jquant.fake_quant(w, spec)), w_hat)  # STE forward = round trip
    x = jax.random.normal(jax.random.key(1), (4, 256))
    y = jquant.dot_general(x, qa, (((1,), (0,)), ((), ())), lhs_spec=QuantSpec(8))  # its integer grid
    assert float(jnp.linalg.norm(y - x @ w) / jnp.linalg.norm(x @ w)) < 0.02
    tree = jquant.quantize_params({"dense": {"kernel": w}}, jquant.Policy([jquant.Rule(".*kernel", spec)]))
    np.testing.assert_array_equal(np.asarray(tree["dense"]["kernel"].dequantize()), w_hat)
    monkeypatch.setitem(formats.FORMATS, "pow2", PowerOfTwo())  # the one registration line, for its name
    jquant.save(tmp_path / "pow2.ckpt", tree)
    loaded = jquant.load(tmp_path / "pow2.ckpt")["dense"]["kernel"]
    assert loaded.spec == spec and np.array_equal(np.asarray(loaded.dequantize()), w_hat)
    assert QuantSpec(8, method="pow2").method == PowerOfTwo()
