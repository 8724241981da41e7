"""jquant.save / jquant.load: bit-exact round trips, file size, atomicity, corruption and version errors."""

import hashlib
import io
import json
import math
import os
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict
from hypothesis import given, settings
from hypothesis import strategies as st

import jquant
from jquant import QuantSpec
from jquant._src.checkpoint import FORMAT, VERSION
from jquant._src.paths import is_qarray

SPECS = {
    "q8_per_channel": QuantSpec(8, channel_axes=(1,)),
    "q4_asym_group": QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=16),
    "q3_group": QuantSpec(3, channel_axes=(0,), group_size=8, group_axis=1),
    "q1_sign": QuantSpec(1, method="sign", channel_axes=(1,)),
    "nf4": QuantSpec(4, method="nf4", group_size=16),
    "kmeans3": QuantSpec(3, method="kmeans", channel_axes=(1,), group_size=32),
}


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _tree():
    """Every kind of leaf and container the format promises to keep."""
    x = _normal(0, (64, 32))
    qs = {name: jquant.quantize(x, spec) for name, spec in SPECS.items()}
    # odd last axis: the packed bytes carry padding, which must survive too
    qs["q2_odd"] = jquant.quantize(_normal(1, (10, 7)), QuantSpec(2))
    return {
        "params": {"dense": {"kernel": qs["q8_per_channel"], "bias": _normal(2, (32,))}, **qs,
                   "emb": _normal(3, (16, 8), jnp.bfloat16), "half": _normal(4, (5, 3), jnp.float16)},
        "opt": [{"mu": _normal(5, (4,)), "count": jnp.asarray(7, jnp.int32)},
                (jnp.asarray(123456, jnp.int32), jnp.array([True, False, True]))],
        "misc": (jnp.asarray(-0.0), jnp.zeros((0, 3), jnp.bfloat16), jnp.zeros((2, 0), jnp.int8), None,
                 jnp.asarray([np.nan, np.inf], jnp.float32), jnp.arange(6, dtype=jnp.uint8).reshape(2, 3)),
        "python": [3, 2.5, float("nan"), -float("inf"), True, "name", None, 10**30],
        "odd keys": {"a/b": jnp.ones(2), "": jnp.zeros(1), "ünï cødé": jnp.ones(1, jnp.int32)},
    }


def _assert_bit_exact_array(a, b, where):
    assert isinstance(b, jax.Array), where
    assert a.dtype == b.dtype and a.shape == b.shape, where
    a, b = np.asarray(a), np.asarray(b)
    assert a.tobytes() == b.tobytes(), where  # bit-exact: NaN payloads and -0.0 included
    assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f" or a.dtype.name == "bfloat16"), where


def _assert_same_tree(want, got):
    assert jax.tree_util.tree_structure(want, is_leaf=is_qarray) == jax.tree_util.tree_structure(got, is_leaf=is_qarray)
    want_flat = jax.tree_util.tree_flatten_with_path(want, is_leaf=is_qarray)[0]
    got_flat = jax.tree_util.tree_leaves(got, is_leaf=is_qarray)
    for (path, a), b in zip(want_flat, got_flat):
        where = jax.tree_util.keystr(path)
        if isinstance(a, jquant.QArray):
            assert isinstance(b, jquant.QArray), where
            assert (a.spec, a.shape, a.dtype) == (b.spec, b.shape, b.dtype), where
            _assert_bit_exact_array(a.value, b.value, where)
            _assert_bit_exact_array(a.scale, b.scale, where)
            assert (a.zero_point is None) == (b.zero_point is None), where
            if a.zero_point is not None:
                _assert_bit_exact_array(a.zero_point, b.zero_point, where)
            _assert_bit_exact_array(a.q, b.q, where)
            _assert_bit_exact_array(a.dequantize(), b.dequantize(), where)
        elif isinstance(a, jax.Array):
            _assert_bit_exact_array(a, b, where)
        else:  # Python scalar
            assert type(a) is type(b), where
            assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), where


def _rewrite(path, edit):
    """Copy the archive at `path` with `edit(name, data) -> data` applied (CRCs recomputed)."""
    with zipfile.ZipFile(path) as zf:
        members = [(info.filename, zf.read(info)) for info in zf.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zf.writestr(name, edit(name, data))
    path.write_bytes(buf.getvalue())


def _edit_manifest(path, fn):
    def edit(name, data):
        return json.dumps(fn(json.loads(data))).encode() if name == "manifest.json" else data
    _rewrite(path, edit)


def test_round_trip_is_bit_exact(tmp_path):
    tree = _tree()
    path = tmp_path / "ckpt.jqc"
    jquant.save(path, tree)
    got = jquant.load(path)
    _assert_same_tree(tree, got)
    assert got["params"]["q4_asym_group"].value.dtype == jnp.uint8  # still packed
    assert got["params"]["q4_asym_group"].value.shape == (64, 16)


def test_manifest_records_format_specs_and_hashes(tmp_path):
    q = jquant.quantize(_normal(0, (64, 32)), SPECS["q4_asym_group"])
    path = tmp_path / "ckpt.jqc"
    jquant.save(path, {"w": q, "b": _normal(1, (3,), jnp.bfloat16)})
    with zipfile.ZipFile(path) as zf:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
        manifest = json.loads(zf.read("manifest.json"))
        assert (manifest["format"], manifest["version"]) == (FORMAT, VERSION) == ("jquant-checkpoint", 1)
        assert "not stored" in manifest["sharding"]
        b, w = manifest["tree"]["values"]
        assert manifest["tree"]["keys"] == ["b", "w"]
        assert w["spec"] == {"bits": 4, "symmetric": False, "midrise": False, "channel_axes": [1], "group_size": 16,
                             "group_axis": None, "method": "uniform", "calibration": {"type": "MinMax"}}
        assert (w["shape"], w["dtype"]) == ([64, 32], "float32")
        assert (b["dtype"], b["stored_as"], b["shape"]) == ("bfloat16", "uint16", [3])
        for node, array in ((b, None), (w["value"], q.value), (w["scale"], q.scale), (w["zero_point"], q.zero_point)):
            stored = np.lib.format.read_array(io.BytesIO(zf.read(node["file"])))
            assert hashlib.sha256(stored.tobytes()).hexdigest() == node["sha256"]
            if array is not None:
                assert stored.dtype == array.dtype and np.array_equal(stored, np.asarray(array))


def test_file_size_is_about_the_quantized_bytes(tmp_path):
    x = _normal(0, (1024, 1024))
    tree = {"w4": jquant.quantize(x, QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=128)),
            "w2": jquant.quantize(x, QuantSpec(2, channel_axes=(1,)))}
    path = tmp_path / "big.jqc"
    jquant.save(path, tree)
    nbytes = sum(q.nbytes for q in tree.values())
    assert nbytes < 1024 * 1024  # packed: less than one byte per weight for both together
    assert 0 <= path.stat().st_size - nbytes < 4096


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.jqc"
    old = {"w": jquant.quantize(_normal(0, (8, 16)), QuantSpec(4)), "step": jnp.asarray(1, jnp.int32)}
    jquant.save(path, old)
    before = path.read_bytes()

    real_write_array, calls = np.lib.format.write_array, []

    def failing_write_array(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_write_array(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", failing_write_array)
    new = {"w": jquant.quantize(_normal(1, (8, 16)), QuantSpec(8)), "step": jnp.asarray(2, jnp.int32)}
    with pytest.raises(OSError, match="simulated"):
        jquant.save(path, new)
    assert len(calls) == 2
    assert os.listdir(tmp_path) == ["ckpt.jqc"]  # no temporary file left behind
    assert path.read_bytes() == before
    _assert_same_tree(old, jquant.load(path))

    # with nothing there before, nothing is there after
    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        jquant.save(tmp_path / "fresh.jqc", new)
    assert os.listdir(tmp_path) == ["ckpt.jqc"]


def test_unsavable_leaf_names_its_path_and_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match=re.escape("a/1/b") + ".*object"):
        jquant.save(tmp_path / "x.jqc", {"a": [1, {"b": object()}]})
    with pytest.raises(TypeError, match="dict key"):
        jquant.save(tmp_path / "x.jqc", {(1, 2): jnp.ones(1)})
    assert os.listdir(tmp_path) == []


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jqc"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        jquant.load(path)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ckpt.jqc"
    payload = np.arange(4096, dtype=np.float32)
    jquant.save(path, {"x": jnp.asarray(payload), "w": jquant.quantize(_normal(0, (8, 16)), QuantSpec(4))})
    return path, payload


@pytest.mark.parametrize("damage", ["truncate", "not_a_zip"])
def test_truncated_or_foreign_file_is_corrupt(saved, damage):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"hello, not a zip")
    with pytest.raises(ValueError, match=re.escape(f"{path} is corrupt")):
        jquant.load(path)


def test_flipped_payload_byte_is_corrupt(saved):
    path, payload = saved
    data = bytearray(path.read_bytes())
    start = bytes(data).find(payload.tobytes())
    assert start > 0
    data[start + 1001] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(f"{path} is corrupt") + ".*'x'"):
        jquant.load(path)


def test_payload_that_fails_sha256_is_corrupt(saved):
    # A rewritten archive whose CRCs are consistent: only the manifest's sha256 can catch it.
    path, payload = saved
    _rewrite(path, lambda name, data: data.replace(payload[:4].tobytes(), payload[4:8].tobytes()))
    with pytest.raises(ValueError, match=re.escape(f"{path} is corrupt") + ".*'x'.*sha256"):
        jquant.load(path)


def test_unreadable_manifest_is_corrupt(saved):
    path, _ = saved
    _rewrite(path, lambda name, data: b'{"format": "jquant-chec' if name == "manifest.json" else data)
    with pytest.raises(ValueError, match=re.escape(f"{path} is corrupt") + ".*manifest.json"):
        jquant.load(path)


def test_newer_version_and_foreign_format_are_refused(saved):
    path, _ = saved
    _edit_manifest(path, lambda m: {**m, "version": 99})
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*version 99.*up to 1\b"):
        jquant.load(path)
    _edit_manifest(path, lambda m: {**m, "version": 1, "format": "orbax"})
    with pytest.raises(ValueError, match="'orbax'.*'jquant-checkpoint'"):
        jquant.load(path)


def test_target_gives_its_structure(tmp_path):
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    path = tmp_path / "state.jqc"
    jquant.save(path, nnx.state(model))
    other = nnx.Linear(4, 3, rngs=nnx.Rngs(1))
    assert not np.array_equal(other.kernel[...], model.kernel[...])
    restored = jquant.load(path, target=nnx.state(other))
    assert type(restored) is type(nnx.state(other))
    nnx.update(other, restored)
    x = _normal(2, (2, 4))
    np.testing.assert_array_equal(other(x), model(x))
    # without a target the State and its Variables come back as plain dicts
    plain = jquant.load(path)
    assert type(plain) is dict and np.array_equal(plain["kernel"]["value"], model.kernel[...])
    # a FrozenDict is stored as a dict and comes back as one unless the target is a FrozenDict
    frozen = FrozenDict({"w": jquant.quantize(_normal(3, (8, 8)), QuantSpec(8)), "b": {"c": jnp.ones(2)}})
    jquant.save(path, frozen)
    assert type(jquant.load(path)) is dict
    again = jquant.load(path, target=frozen)
    assert type(again) is FrozenDict
    _assert_same_tree(frozen, again)


def test_target_mismatch_names_the_path(tmp_path):
    q = jquant.quantize(_normal(0, (8, 16)), QuantSpec(4))
    tree = {"params": {"dense": {"kernel": q, "bias": jnp.zeros(16)}}, "step": jnp.asarray(0)}
    path = tmp_path / "ckpt.jqc"
    jquant.save(path, tree)
    renamed = {"params": {"dense": {"kernal": q, "bias": jnp.zeros(16)}}, "step": jnp.asarray(0)}
    with pytest.raises(ValueError, match="'params/dense/kernel' in the checkpoint but 'params/dense/kernal'"):
        jquant.load(path, target=renamed)
    extra = {**tree, "zz": jnp.ones(1)}
    with pytest.raises(ValueError, match="3 leaves.*4.*'zz' \\(only in target\\)"):
        jquant.load(path, target=extra)
    unquantized = {"params": {"dense": {"kernel": jnp.zeros((8, 16)), "bias": jnp.zeros(16)}}, "step": jnp.asarray(0)}
    with pytest.raises(ValueError, match="'params/dense/kernel' is a QArray only in the checkpoint"):
        jquant.load(path, target=unquantized)
    # the matching target rebuilds the tree
    _assert_same_tree(tree, jquant.load(path, target=tree))


def test_prng_keys_and_64_bit_numpy_leaves(tmp_path):
    path = tmp_path / "ckpt.jqc"
    tree = {"key": jax.random.key(42), "step": np.int64(2**40 + 1), "f64": np.linspace(0, 1, 5)}
    jquant.save(path, tree)
    got = jquant.load(path)
    assert jax.dtypes.issubdtype(got["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(got["key"]), jax.random.key_data(tree["key"]))
    assert str(jax.random.key_impl(got["key"])) == str(jax.random.key_impl(tree["key"]))
    if not jax.config.jax_enable_x64:  # jnp.asarray would narrow these to 32 bits
        assert got["step"].dtype == np.int64 and int(got["step"]) == 2**40 + 1
        assert got["f64"].dtype == np.float64 and np.array_equal(got["f64"], tree["f64"])


DTYPES = ["float32", "bfloat16", "float16", "int8", "uint8", "int32", "bool", "float8_e4m3fn", "int4"]


@settings(max_examples=25, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 5), max_size=3),
       data=st.data())
def test_arrays_of_any_dtype_and_shape_round_trip(tmp_path_factory, dtype, shape, data):
    dtype = jnp.dtype(dtype)
    size = math.prod(shape)
    # random bit patterns, so NaNs, infinities and subnormals occur
    raw = data.draw(st.binary(min_size=size * dtype.itemsize, max_size=size * dtype.itemsize))
    a = np.frombuffer(raw, np.uint8).view(f"u{dtype.itemsize}")
    if dtype == jnp.bool_:
        a = a % 2
    if dtype == jnp.int4:
        a = a % 16
    x = jnp.asarray(a.view(dtype).reshape(shape))
    path = tmp_path_factory.mktemp("h") / "c.jqc"
    jquant.save(path, [x])
    _assert_same_tree([x], jquant.load(path))


@settings(max_examples=8, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), last=st.integers(1, 9), seed=st.integers(0, 99))
def test_qarrays_of_any_bit_width_round_trip(tmp_path_factory, bits, symmetric, last, seed):
    q = jquant.quantize(_normal(seed, (3, last), jnp.bfloat16), QuantSpec(bits, symmetric=symmetric, channel_axes=(0,)))
    path = tmp_path_factory.mktemp("h") / "c.jqc"
    jquant.save(path, {"q": q})
    _assert_same_tree({"q": q}, jquant.load(path))
