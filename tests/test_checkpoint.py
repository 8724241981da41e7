"""jquant.save / jquant.load on Orbax, QuantSave / QuantRestore in a CheckpointManager, the
safetensors export, and reading version-1 files: bit-exact round trips, sizes, targets, and
faults: a save that fails, is interrupted (Ctrl-C) or is killed mid-write (a hard crash, no
cleanup) leaves the previous checkpoint intact; truncated, bit-flipped, foreign or newer
checkpoints, specs this jquant cannot build and mismatched targets are refused with a message
naming the path and the leaf. (Sharded checkpoints on 8 devices: tests/test_distributed.py.)"""

import glob
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
from flax import nnx
from flax.core import FrozenDict
from hypothesis import given, settings
from hypothesis import strategies as st

import jquant
from jquant import MSE, Percentile, QuantSpec
from jquant._src.checkpoint import FORMAT, VERSION, QuantCheckpointHandler
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
        "python": [3, 2.5, float("nan"), -float("inf"), True, None, -2**63],
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


def _as_restored(tree):
    """`tree` as Orbax gives its structure back without a target: tuples as lists."""
    if isinstance(tree, (list, tuple)):
        return [_as_restored(x) for x in tree]
    if isinstance(tree, dict):
        return {k: _as_restored(v) for k, v in tree.items()}
    return tree


def _edit_metadata(path, fn):
    """Rewrite jquant's metadata inside the Orbax item's _METADATA file with `fn`."""
    file = path / "_METADATA"
    data = json.loads(file.read_text())
    data["custom_metadata"]["jquant"] = fn(data["custom_metadata"]["jquant"])
    file.write_text(json.dumps(data))


def test_round_trip_is_bit_exact_with_and_without_target(tmp_path):
    tree = _tree()
    path = tmp_path / "ckpt"
    jquant.save(path, tree)
    got = jquant.load(path)
    _assert_same_tree(_as_restored(tree), got)
    assert got["params"]["q4_asym_group"].value.dtype == jnp.uint8  # still packed
    assert got["params"]["q4_asym_group"].value.shape == (64, 16)
    _assert_same_tree(tree, jquant.load(path, target=tree))  # the target's structure: tuples again


def test_orbax_reads_it_without_jquant_and_the_metadata_has_the_specs(tmp_path):
    q = jit_quantize(normal(0, (64, 32)), SPECS["q4_asym_group"])
    path = tmp_path / "ckpt"
    jquant.save(path, {"w": q, "b": normal(1, (3,), jnp.bfloat16)})
    raw = ocp.StandardCheckpointer().restore(path)
    assert set(raw["w"]) == {"value", "scale", "zero_point"}
    for name in ("value", "scale", "zero_point"):
        _assert_bit_exact_array(getattr(q, name), raw["w"][name], name)
    meta = ocp.StandardCheckpointer().metadata(path).item_metadata.custom_metadata["jquant"]
    assert (meta["format"], meta["version"]) == (FORMAT, VERSION) == ("jquant-checkpoint", 2)
    b, w = meta["leaves"]
    assert (b["path"], b["array"]["dtype"], b["array"]["shape"]) == ("b", "bfloat16", [3])
    assert w["path"] == "w" and (w["qarray"]["shape"], w["qarray"]["dtype"]) == ([64, 32], "float32")
    assert w["qarray"]["spec"] == {"bits": 4, "symmetric": False, "midrise": False, "channel_axes": [1],
                                   "group_size": 16, "group_axis": None, "method": "uniform",
                                   "calibration": {"type": "MinMax"}}
    assert w["qarray"]["value"]["dtype"] == "uint8" and w["qarray"]["value"]["shape"] == [64, 16]


def test_digest_against_a_numpy_reference(tmp_path):
    # Σ w_i (2i + 1) 0x9E3779B1 mod 2^32 over the uint32 words, in Python integers
    a = np.asarray(normal(0, (3, 5), jnp.bfloat16))
    c = np.asarray([1 + 2j, -3.5j], np.complex64)
    path = tmp_path / "ckpt"
    jquant.save(path, {"a": jnp.asarray(a), "c": jnp.asarray(c), "f64": np.linspace(0, 1, 3)})
    records = {e["path"]: e["array"] for e in
               ocp.StandardCheckpointer().metadata(path).item_metadata.custom_metadata["jquant"]["leaves"]}

    def reference(words):
        return sum(int(w) * (2 * i + 1) * 0x9E3779B1 for i, w in enumerate(words)) % 2**32

    assert records["a"]["digest"] == reference(a.view(np.uint16).ravel())
    assert records["c"]["digest"] == reference(c.view(np.uint32).ravel())  # real, imaginary
    assert records["f64"]["digest"] == reference(np.linspace(0, 1, 3).view(np.uint32).ravel())  # low word first


def test_realistic_int4_kernel_size_time_and_bits(tmp_path):
    w = jax.random.normal(jax.random.key(0), (4096, 4096), jnp.bfloat16)
    qa = jit_quantize(w, QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=128))
    tree = {"layer": {"kernel": qa, "bias": jnp.zeros(4096, jnp.bfloat16)}}
    nbytes = qa.nbytes + 4096 * 2
    path = tmp_path / "big"
    start = time.perf_counter()
    jquant.save(path, tree)
    saved = time.perf_counter() - start
    size = sum(os.path.getsize(f) for f in glob.glob(str(path / "**"), recursive=True) if os.path.isfile(f))
    start = time.perf_counter()
    got = jquant.load(path)
    loaded = time.perf_counter() - start
    print(f"4096² int4 g128: nbytes {nbytes:,}, checkpoint {size:,} bytes, save {saved:.2f} s, load {loaded:.2f} s")
    assert size < 1.02 * nbytes + 65536  # packed codes and scales, a few KiB of metadata
    for name in ("value", "scale", "zero_point"):
        _assert_bit_exact_array(getattr(qa, name), getattr(got["layer"]["kernel"], name), name)
    file = tmp_path / "big.safetensors"
    jquant.export_safetensors(file, tree)
    assert nbytes < file.stat().st_size < nbytes + 4096
    tensors = safetensors.numpy.load_file(file)
    assert np.asarray(qa.value).tobytes() == tensors["layer/kernel/value"].tobytes()


def _small_tree(seed):
    return {"w": jit_quantize(normal(seed, (64, 32)), QuantSpec(4, symmetric=False, channel_axes=(1,))),
            "b": normal(seed + 1, (32,)), "step": jnp.asarray(seed, jnp.int32)}


@pytest.mark.parametrize("error", [OSError("disk full (simulated)"), KeyboardInterrupt()], ids=repr)
def test_failed_or_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    path = tmp_path / "ckpt"
    old = _small_tree(0)
    jquant.save(path, old)
    calls = []

    def failing_finalize(self, directory):  # after the arrays are written, before Orbax commits
        calls.append(os.listdir(directory))
        raise error

    monkeypatch.setattr(QuantCheckpointHandler, "finalize", failing_finalize)
    with pytest.raises(type(error), match=re.escape(str(error)) or None):
        jquant.save(path, _small_tree(1), overwrite=True)
    assert "ocdbt.process_0" in calls[0]  # the new arrays were on disk
    assert os.listdir(tmp_path) == ["ckpt"]  # no temporary directory left behind
    _assert_same_tree(old, jquant.load(path))
    # with nothing there before, nothing is there after
    with pytest.raises(type(error), match=re.escape(str(error)) or None):
        jquant.save(tmp_path / "fresh", _small_tree(1))
    assert os.listdir(tmp_path) == ["ckpt"]


def test_save_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    old = _small_tree(0)
    jquant.save(path, old)
    # A second process starts replacing it and dies (os._exit: no exception handlers, no cleanup)
    # once the arrays are written, before Orbax commits.
    crash = textwrap.dedent(f"""
        import os, jax.numpy as jnp, jquant
        from jquant._src.checkpoint import QuantCheckpointHandler
        QuantCheckpointHandler.finalize = lambda self, directory: os._exit(17)
        jquant.save({str(path)!r}, {{"w": jquant.quantize(jnp.ones((64, 32)), jquant.QuantSpec(8))}}, overwrite=True)
    """)
    result = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=300)
    assert result.returncode == 17, result.stderr[-2000:]
    _assert_same_tree(old, jquant.load(path))
    leftovers = [name for name in os.listdir(tmp_path) if name != "ckpt"]
    assert len(leftovers) == 1 and re.fullmatch(r"\.ckpt\.jquant-[0-9a-f]{16}\.orbax-checkpoint-tmp.*", leftovers[0])
    new = _small_tree(1)
    jquant.save(path, new, overwrite=True)  # the next save is unaffected by the leftover
    _assert_same_tree(new, jquant.load(path))


def test_unsavable_leaves_and_existing_paths_write_nothing(tmp_path):
    with pytest.raises(TypeError, match=re.escape("a/1/b") + ".*object"):
        jquant.save(tmp_path / "x", {"a": [1, {"b": object()}]})
    with pytest.raises(TypeError, match="'name'|str"):
        jquant.save(tmp_path / "x", {"s": "name"})
    with pytest.raises(TypeError, match="big: the int .* int64"):
        jquant.save(tmp_path / "x", {"big": 10**30})
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda x: jquant.save(tmp_path / "x", {"x": x}))(jnp.ones(2))
    assert os.listdir(tmp_path) == []
    jquant.save(tmp_path / "x", {"a": jnp.ones(2)})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jquant.save(tmp_path / "x", {"a": jnp.zeros(2)})
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        jquant.load(tmp_path / "nope")


PAYLOAD = np.arange(4096, dtype=np.float32)


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    jquant.save(path, {"x": jnp.asarray(PAYLOAD), **_small_tree(0)})
    return path


@pytest.fixture
def saved(tmp_path, saved_dir):
    """A fresh copy of one checkpoint, for a test to damage."""
    import shutil
    path = tmp_path / "ckpt"
    shutil.copytree(saved_dir, path)
    return path


def _data_files(path):
    return sorted((f for f in glob.glob(str(path / "ocdbt.process_0" / "d" / "*"))), key=os.path.getsize)


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.9])
def test_truncated_data_is_corrupt(saved, keep):
    for file in _data_files(saved):
        data = open(file, "rb").read()
        open(file, "wb").write(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match=re.escape(f"{saved} is corrupt")):
        jquant.load(saved)


def test_flipped_bits_are_corrupt_and_the_digest_names_the_leaf(saved):
    biggest = _data_files(saved)[-1]  # holds x's chunk
    data = bytearray(open(biggest, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(biggest, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=re.escape(f"{saved} is corrupt")):
        jquant.load(saved)
    # data that reads back but differs from what was saved: the digest catches it and names the leaf
    _edit_metadata(saved, lambda m: {**m, "leaves": [
        {**e, "array": {**e["array"], "digest": (e["array"]["digest"] + 1) % 2**32}} if e["path"] == "b" else e
        for e in m["leaves"]]})
    with pytest.raises(ValueError, match=re.escape(f"{saved} is corrupt") + ".*'b'.*digest"):
        jquant.load(saved, target={"b": 0, "step": 0, "w": _small_tree(0)["w"], "x": 0})


def test_missing_and_disagreeing_metadata_are_corrupt(saved):
    _edit_metadata(saved, lambda m: {**m, "leaves": [
        {**e, "array": {**e["array"], "shape": [31]}} if e["path"] == "b" else e for e in m["leaves"]]})
    with pytest.raises(ValueError, match=r"is corrupt: 'b' is float32\[32\] in the Orbax tree, float32\[31\]"):
        jquant.load(saved)
    _edit_metadata(saved, lambda m: {**m, "leaves": m["leaves"][1:]})
    with pytest.raises(ValueError, match="is corrupt: the Orbax tree has ArrayMetadata 'b'"):
        jquant.load(saved)
    (saved / "_METADATA").write_text('{"tree_metadata": ')
    with pytest.raises(ValueError, match=re.escape(f"{saved} is corrupt") + ".*metadata"):
        jquant.load(saved)


@pytest.mark.parametrize("version, match", [
    (1, "metadata version 1 is not an integer ≥ 2"), ("2", "metadata version '2' is not"),
    (3, r"version 3; this jquant supports versions up to 2\b"),
])
def test_wrong_versions_are_refused(saved, version, match):
    _edit_metadata(saved, lambda m: {**m, "version": version})
    with pytest.raises(ValueError, match=re.escape(str(saved)) + ".*" + match):
        jquant.load(saved)


def test_foreign_checkpoints_are_refused(saved, tmp_path):
    _edit_metadata(saved, lambda m: {**m, "format": "other"})
    with pytest.raises(ValueError, match="not a jquant checkpoint.*'other'.*'jquant-checkpoint'"):
        jquant.load(saved)
    plain = tmp_path / "plain"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(plain, {"a": jnp.ones(3)})
    with pytest.raises(ValueError, match=re.escape(str(plain)) + " is not a jquant checkpoint.*no 'jquant' entry"):
        jquant.load(plain)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(empty)) + " is not a jquant checkpoint"):
        jquant.load(empty)


def test_a_spec_this_jquant_cannot_build_is_named(saved):
    _edit_metadata(saved, lambda m: {**m, "leaves": [
        {**e, "qarray": {**e["qarray"], "spec": {**e["qarray"]["spec"], "bits": 9}}} if "qarray" in e else e
        for e in m["leaves"]]})
    with pytest.raises(ValueError, match=r"QArray at 'w' has spec .*cannot build: QuantSpec.bits=9"):
        jquant.load(saved)


def test_target_gives_its_structure(tmp_path):
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    jquant.save(tmp_path / "state", nnx.state(model))
    other = nnx.Linear(4, 3, rngs=nnx.Rngs(1))
    assert not np.array_equal(other.kernel[...], model.kernel[...])
    restored = jquant.load(tmp_path / "state", target=nnx.state(other))
    assert type(restored) is type(nnx.state(other))
    nnx.update(other, restored)
    x = normal(2, (2, 4))
    np.testing.assert_array_equal(other(x), model(x))
    plain = jquant.load(tmp_path / "state")  # without a target: dicts
    assert type(plain) is dict and np.array_equal(plain["kernel"]["value"], model.kernel[...])
    frozen = FrozenDict({"w": jit_quantize(normal(3, (8, 8)), QuantSpec(8)), "b": {"c": jnp.ones(2)}})
    jquant.save(tmp_path / "frozen", frozen)
    assert type(jquant.load(tmp_path / "frozen")) is dict
    again = jquant.load(tmp_path / "frozen", target=frozen)
    assert type(again) is FrozenDict
    _assert_same_tree(frozen, again)


def test_target_mismatch_names_the_path(tmp_path):
    q = jit_quantize(normal(0, (8, 16)), QuantSpec(4))
    tree = {"params": {"dense": {"kernel": q, "bias": jnp.zeros(16)}}, "step": jnp.asarray(0)}
    path = tmp_path / "ckpt"
    jquant.save(path, tree)
    renamed = {"params": {"dense": {"kernal": q, "bias": jnp.zeros(16)}}, "step": jnp.asarray(0)}
    with pytest.raises(ValueError, match="'params/dense/kernel' in the checkpoint but 'params/dense/kernal'"):
        jquant.load(path, target=renamed)
    with pytest.raises(ValueError, match="3 leaves.*4.*'zz' \\(only in target\\)"):
        jquant.load(path, target={**tree, "zz": jnp.ones(1)})
    unquantized = {"params": {"dense": {"kernel": jnp.zeros((8, 16)), "bias": jnp.zeros(16)}}, "step": jnp.asarray(0)}
    with pytest.raises(ValueError, match="'params/dense/kernel' is a QArray only in the checkpoint"):
        jquant.load(path, target=unquantized)


def test_prng_keys_and_64_bit_numpy_leaves(tmp_path):
    path = tmp_path / "ckpt"
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


def _random_array(data, dtype, shape):
    dtype = jnp.dtype(dtype)
    size = math.prod(shape)
    # random bit patterns, so NaNs, infinities and subnormals occur
    raw = data.draw(st.binary(min_size=size * dtype.itemsize, max_size=size * dtype.itemsize))
    a = np.frombuffer(raw, np.uint8).view(f"u{dtype.itemsize}")
    if dtype == jnp.bool_:
        a = a % 2
    if dtype == jnp.int4:
        a = a % 16
    return jnp.asarray(a.view(dtype).reshape(shape))


@settings(max_examples=10, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 5), max_size=3), data=st.data())
def test_arrays_of_any_dtype_and_shape_round_trip(tmp_path_factory, dtype, shape, data):
    x = _random_array(data, dtype, shape)
    path = tmp_path_factory.mktemp("h") / "c"
    jquant.save(path, [x])
    _assert_same_tree([x], jquant.load(path))


@settings(max_examples=6, deadline=None)
@given(bits=st.integers(1, 8), symmetric=st.booleans(), last=st.integers(1, 9), seed=st.integers(0, 99))
def test_qarrays_of_any_bit_width_round_trip_through_both_formats(tmp_path_factory, bits, symmetric, last, seed):
    spec = QuantSpec(bits, symmetric=symmetric or bits == 1, method="sign" if bits == 1 else "uniform",
                     channel_axes=(0,))
    q = jit_quantize(normal(seed, (3, last), jnp.bfloat16), spec)
    directory = tmp_path_factory.mktemp("h")
    jquant.save(directory / "c", {"q": q})
    _assert_same_tree({"q": q}, jquant.load(directory / "c"))
    jquant.export_safetensors(directory / "c.safetensors", {"q": q})
    _assert_same_tree({"q": q}, jquant.import_safetensors(directory / "c.safetensors"))


def test_safetensors_export_is_readable_without_jquant_and_round_trips(tmp_path):
    tree = {name: q for name, q in _tree()["params"].items() if isinstance(q, jquant.QArray)}
    tree["emb"] = normal(3, (16, 8), jnp.bfloat16)
    path = tmp_path / "model.safetensors"
    jquant.export_safetensors(path, {"params": tree})
    tensors = safetensors.numpy.load_file(path)
    q = tree["q4_asym_group"]
    for name in ("value", "scale", "zero_point"):
        assert tensors[f"params/q4_asym_group/{name}"].tobytes() == np.asarray(getattr(q, name)).tobytes()
    assert "params/q8_per_channel/zero_point" not in tensors  # symmetric: no zero-point tensor
    assert tensors["params/emb"].dtype == jnp.bfloat16
    with safetensors.safe_open(path, framework="numpy") as f:
        meta = f.metadata()
    assert (meta["format"], meta["version"]) == ("jquant-safetensors", "1")
    assert json.loads(meta["qarrays"])["params/nf4"]["spec"]["method"] == "nf4"
    _assert_same_tree({"params": tree}, jquant.import_safetensors(path))
    nbytes = sum(getattr(x, "nbytes", 0) for x in tree.values())
    assert nbytes < path.stat().st_size < nbytes + 16384  # the tensors and a JSON header


def test_safetensors_errors_name_the_file_and_leaf(tmp_path):
    with pytest.raises(TypeError, match="a/step: cannot export a leaf of type int"):
        jquant.export_safetensors(tmp_path / "x.safetensors", {"a": {"step": 3}})
    assert os.listdir(tmp_path) == []
    foreign = tmp_path / "foreign.safetensors"
    safetensors.numpy.save_file({"w": np.ones(2, np.float32)}, foreign)
    with pytest.raises(ValueError, match="not a jquant safetensors file"):
        jquant.import_safetensors(foreign)
    cut = tmp_path / "cut.safetensors"
    jquant.export_safetensors(cut, {"w": jit_quantize(normal(0, (8, 8)), QuantSpec(4))})
    cut.write_bytes(cut.read_bytes()[:-7])
    with pytest.raises(ValueError, match=re.escape(f"{cut} is corrupt")):
        jquant.import_safetensors(cut)


V1_FILE = os.path.join(os.path.dirname(__file__), "data", "checkpoint_v1.jqc")


def test_version_1_files_still_load(tmp_path):
    # written by jquant's version-1 writer (the zip of .npy files) before the move to Orbax
    x = jnp.asarray(np.linspace(-1, 1, 64 * 32, dtype=np.float32).reshape(64, 32))
    want = {"w4": jquant.quantize(x, QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=16)),
            "w8": jquant.quantize(x, QuantSpec(8, channel_axes=(1,))), "b": jnp.arange(5, dtype=jnp.bfloat16),
            "step": 7, "opt": (jnp.ones(2),)}
    _assert_same_tree(want, jquant.load(V1_FILE))
    _assert_same_tree(want, jquant.load(V1_FILE, target=want))
    jquant.save(tmp_path / "v2", jquant.load(V1_FILE))  # converting is a load and a save
    _assert_same_tree(_as_restored(want), jquant.load(tmp_path / "v2"))
    cut = tmp_path / "cut.jqc"
    cut.write_bytes(open(V1_FILE, "rb").read()[:3000])
    with pytest.raises(ValueError, match=re.escape(f"{cut} is corrupt")):
        jquant.load(cut)


def test_checkpoint_manager_keeps_quantized_and_learned_states_beside_optimizer_state(tmp_path):
    # A QAT loop with LSQ steps: float params and the learned steps trained by optax, the served
    # QArrays, step counter; the manager keeps the last two steps.
    policy = jquant.Policy([jquant.Rule(r".*kernel", QuantSpec(4, channel_axes=(1,)))])
    params = {"dense": {"kernel": normal(0, (16, 8)), "bias": jnp.zeros(8)}}
    learned = jquant.learned.init(params, policy)
    optimizer = optax.adam(1e-2)
    state = {"params": params, "learned": learned}
    opt_state = optimizer.init(state)
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(tmp_path / "run", options=options) as manager:
        for step in range(3):
            grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.1 * (step + 1)), state)
            updates, opt_state = optimizer.update(grads, opt_state, state)
            state = optax.apply_updates(state, updates)
            served = jquant.learned.quantize_params(state["params"], state["learned"], policy)
            manager.save(step, args=ocp.args.Composite(
                served=jquant.QuantSave(served), train=jquant.QuantSave({"state": state, "opt_state": opt_state}),
                meta=ocp.args.JsonSave({"step": step})))
        manager.wait_until_finished()
        assert manager.all_steps() == [1, 2]
        restored = manager.restore(2, args=ocp.args.Composite(
            served=jquant.QuantRestore(), train=jquant.QuantRestore({"state": state, "opt_state": opt_state}),
            meta=ocp.args.JsonRestore()))
    _assert_same_tree(served, restored["served"])
    assert isinstance(restored["served"]["dense"]["kernel"], jquant.QArray)
    _assert_same_tree({"state": state, "opt_state": opt_state}, restored["train"])
    assert restored["meta"] == {"step": 2}
    # an item of a manager's step is a jquant checkpoint directory of its own
    _assert_same_tree(served, jquant.load(tmp_path / "run" / "2" / "served"))
