"""jquant.save / jquant.load: bit-exact round trips, file size, targets, and faults: a save that
fails, is interrupted (Ctrl-C) or is killed mid-write (a hard crash, no cleanup) leaves the
previous checkpoint intact; a file cut at any point, foreign, with a flipped byte, a missing member
or a manifest that disagrees with its arrays is reported as corrupt; unknown versions, formats and
specs are refused with a message naming them."""

import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import textwrap
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
from jquant import MSE, Percentile, QuantSpec
from jquant._src.checkpoint import FORMAT, VERSION
from jquant._src.paths import is_qarray

from helpers import jit_quantize, normal

SPECS = {
    "q8_per_channel": QuantSpec(8, channel_axes=(1,)),
    "q4_asym_group": QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=16),
    "q3_group": QuantSpec(3, channel_axes=(0,), group_size=8, group_axis=1),
    "q1_sign": QuantSpec(1, method="sign", channel_axes=(1,)),
    "nf4": QuantSpec(4, method="nf4", group_size=16),
    "kmeans3": QuantSpec(3, method="kmeans", channel_axes=(1,), group_size=32),
    "mse_midrise": QuantSpec(4, midrise=True, channel_axes=(1,), group_size=16,
                             calibration=MSE(num_ratios=30, norm=2.4)),
    "percentile": QuantSpec(8, calibration=Percentile(99.5)),
}


def _tree():
    """Every kind of leaf and container the format promises to keep."""
    x = normal(0, (64, 32))
    qs = {name: jit_quantize(x, spec) for name, spec in SPECS.items()}  # jit: same QArrays, compiled once each
    # odd last axis: the packed bytes carry padding, which must survive too
    qs["q2_odd"] = jit_quantize(normal(1, (10, 7)), QuantSpec(2))
    return {
        "params": {"dense": {"kernel": qs["q8_per_channel"], "bias": normal(2, (32,))}, **qs,
                   "emb": normal(3, (16, 8), jnp.bfloat16), "half": normal(4, (5, 3), jnp.float16)},
        "opt": [{"mu": normal(5, (4,)), "count": jnp.asarray(7, jnp.int32)},
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


@jax.jit
def _integers_and_values(qa):
    return qa.q, qa.dequantize()


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
            for u, v in zip(_integers_and_values(a), _integers_and_values(b)):  # q and x̂
                _assert_bit_exact_array(u, v, where)
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
    q = jit_quantize(normal(0, (64, 32)), SPECS["q4_asym_group"])
    path = tmp_path / "ckpt.jqc"
    jquant.save(path, {"w": q, "b": normal(1, (3,), jnp.bfloat16)})
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
    x = normal(0, (1024, 1024))
    tree = {"w4": jit_quantize(x, QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=128)),
            "w2": jit_quantize(x, QuantSpec(2, channel_axes=(1,)))}
    path = tmp_path / "big.jqc"
    jquant.save(path, tree)
    nbytes = sum(q.nbytes for q in tree.values())
    assert nbytes < 1024 * 1024  # packed: less than one byte per weight for both together
    assert 0 <= path.stat().st_size - nbytes < 4096


def _small_tree(seed):
    return {"w": jit_quantize(normal(seed, (64, 32)), QuantSpec(4, symmetric=False, channel_axes=(1,))),
            "b": normal(seed + 1, (32,)), "step": jnp.asarray(seed, jnp.int32)}


@pytest.mark.parametrize("error", [OSError("disk full (simulated)"), KeyboardInterrupt()], ids=repr)
def test_failed_or_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    path = tmp_path / "ckpt.jqc"
    old = _small_tree(0)
    jquant.save(path, old)
    before = path.read_bytes()

    real_write_array, calls = np.lib.format.write_array, []

    def failing_write_array(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real_write_array(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", failing_write_array)
    with pytest.raises(type(error), match=re.escape(str(error)) or None):
        jquant.save(path, _small_tree(1))
    assert len(calls) == 2
    assert os.listdir(tmp_path) == ["ckpt.jqc"]  # no temporary file left behind
    assert path.read_bytes() == before
    _assert_same_tree(old, jquant.load(path))

    # with nothing there before, nothing is there after
    calls.clear()
    with pytest.raises(type(error), match=re.escape(str(error)) or None):
        jquant.save(tmp_path / "fresh.jqc", _small_tree(1))
    assert os.listdir(tmp_path) == ["ckpt.jqc"]


def test_save_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.jqc"
    old = _small_tree(0)
    jquant.save(path, old)
    before = path.read_bytes()
    # A second process starts overwriting it and dies (os._exit: no exception handlers, no cleanup)
    # after the first array is written to the temporary file.
    crash = textwrap.dedent(f"""
        import os, numpy as np, jax.numpy as jnp, jquant
        from jquant import QuantSpec
        real, calls = np.lib.format.write_array, []
        def dying(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os._exit(17)
            return real(*args, **kwargs)
        np.lib.format.write_array = dying
        jquant.save({str(path)!r}, {{"w": jquant.quantize(jnp.ones((64, 32)), QuantSpec(8)), "b": jnp.zeros(32)}})
    """)
    result = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=300)
    assert result.returncode == 17, result.stderr[-2000:]
    assert path.read_bytes() == before
    _assert_same_tree(old, jquant.load(path))
    leftovers = [name for name in os.listdir(tmp_path) if name != "ckpt.jqc"]
    assert len(leftovers) == 1 and re.fullmatch(r"\.ckpt\.jqc\.[0-9a-f]{16}\.tmp", leftovers[0])
    # the next save is unaffected by the leftover and replaces the checkpoint
    new = _small_tree(1)
    jquant.save(path, new)
    _assert_same_tree(new, jquant.load(path))


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


PAYLOAD = np.arange(4096, dtype=np.float32)


@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.jqc"
    jquant.save(path, {"x": jnp.asarray(PAYLOAD), **_small_tree(0)})
    return path.read_bytes()


@pytest.fixture
def saved(tmp_path, saved_bytes):
    """A fresh copy of one checkpoint, for a test to damage: its path and the payload of leaf 'x'."""
    path = tmp_path / "ckpt.jqc"
    path.write_bytes(saved_bytes)
    return path, PAYLOAD


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.3, 0.5, 0.9, 0.999, -1])
def test_file_cut_anywhere_is_corrupt(saved, keep):
    path, _ = saved
    data = path.read_bytes()
    end = len(data) - 1 if keep == -1 else int(len(data) * keep)
    path.write_bytes(data[:end])
    with pytest.raises(ValueError, match=re.escape(f"{path} is corrupt")):
        jquant.load(path)


def test_foreign_file_is_corrupt_and_a_directory_is_not_a_file(saved, tmp_path):
    path, _ = saved
    path.write_bytes(b"hello, not a zip")
    with pytest.raises(ValueError, match=re.escape(f"{path} is corrupt")):
        jquant.load(path)
    directory = tmp_path / "a_directory"
    directory.mkdir()
    with pytest.raises((IsADirectoryError, PermissionError)):
        jquant.load(directory)


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


def test_missing_member_and_disagreeing_manifest_are_corrupt(saved, saved_bytes):
    path, _ = saved
    _rewrite(path, lambda name, data: data)  # same content, re-zipped
    jquant.load(path)
    # an array member dropped from the archive
    _edit_manifest(path, lambda m: {**m, "tree": {**m["tree"], "values": [
        {**v, "file": "arrays/99.npy"} if v.get("type") == "array" else v for v in m["tree"]["values"]]}})
    with pytest.raises(ValueError, match=r"is corrupt: array '.*'.*arrays/99.npy is missing"):
        jquant.load(path)
    # the manifest says another shape than the stored array has
    path.write_bytes(saved_bytes)
    _edit_manifest(path, lambda m: {**m, "tree": {**m["tree"], "values": [
        {**v, "shape": [31]} if v.get("type") == "array" and v["shape"] == [32] else v
        for v in m["tree"]["values"]]}})
    with pytest.raises(ValueError, match=r"is corrupt: array 'b'.*float32\[32\].*manifest says float32\[31\]"):
        jquant.load(path)


@pytest.mark.parametrize("version, match", [
    (0, "manifest version 0 is not a positive integer"), ("1", "manifest version '1' is not a positive integer"),
    (None, "manifest version None"), (2, r"version 2; this jquant supports versions up to 1\b"),
    (99, r"version 99; this jquant supports versions up to 1\b"),
])
def test_wrong_versions_are_refused(saved, version, match):
    path, _ = saved
    _edit_manifest(path, lambda m: {**m, "version": version})
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + match):
        jquant.load(path)


def test_a_spec_this_jquant_cannot_build_is_named(saved):
    path, _ = saved

    def edit(manifest):
        values = [{**v, "spec": {**v["spec"], "bits": 9}} if v.get("type") == "qarray" else v
                  for v in manifest["tree"]["values"]]
        return {**manifest, "tree": {**manifest["tree"], "values": values}}

    _edit_manifest(path, edit)
    with pytest.raises(ValueError, match=r"QArray at 'w' has spec .*cannot build: QuantSpec.bits=9"):
        jquant.load(path)


def test_foreign_format_is_refused(saved):
    path, _ = saved
    _edit_manifest(path, lambda m: {**m, "format": "orbax"})
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
    x = normal(2, (2, 4))
    np.testing.assert_array_equal(other(x), model(x))
    # without a target the State and its Variables come back as plain dicts
    plain = jquant.load(path)
    assert type(plain) is dict and np.array_equal(plain["kernel"]["value"], model.kernel[...])
    # a FrozenDict is stored as a dict and comes back as one unless the target is a FrozenDict
    frozen = FrozenDict({"w": jit_quantize(normal(3, (8, 8)), QuantSpec(8)), "b": {"c": jnp.ones(2)}})
    jquant.save(path, frozen)
    assert type(jquant.load(path)) is dict
    again = jquant.load(path, target=frozen)
    assert type(again) is FrozenDict
    _assert_same_tree(frozen, again)


def test_target_mismatch_names_the_path(tmp_path):
    q = jit_quantize(normal(0, (8, 16)), QuantSpec(4))
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
    q = jit_quantize(normal(seed, (3, last), jnp.bfloat16), QuantSpec(bits, symmetric=symmetric, channel_axes=(0,)))
    path = tmp_path_factory.mktemp("h") / "c.jqc"
    jquant.save(path, {"q": q})
    _assert_same_tree({"q": q}, jquant.load(path))
