"""Checkpoint faults beyond tests/test_checkpoint.py: a save killed mid-write (a hard crash, no
cleanup) or interrupted (Ctrl-C) leaves the previous checkpoint intact; a file cut at any point,
empty, missing a member or with a manifest that disagrees with its arrays is reported as corrupt;
unknown versions and specs are refused with a message naming them."""

import os
import re
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import QuantSpec

from test_checkpoint import _assert_same_tree, _edit_manifest, _normal, _rewrite


def _tree(seed):
    return {"w": jquant.quantize(_normal(seed, (64, 32)), QuantSpec(4, symmetric=False, channel_axes=(1,))),
            "b": _normal(seed + 1, (32,)), "step": jnp.asarray(seed, jnp.int32)}


def test_save_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.jqc"
    old = _tree(0)
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
    new = _tree(1)
    jquant.save(path, new)
    _assert_same_tree(new, jquant.load(path))


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.jqc"
    old = _tree(0)
    jquant.save(path, old)
    real = np.lib.format.write_array

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np.lib.format, "write_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        jquant.save(path, _tree(1))
    monkeypatch.setattr(np.lib.format, "write_array", real)
    assert os.listdir(tmp_path) == ["ckpt.jqc"]
    _assert_same_tree(old, jquant.load(path))


@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.jqc"
    jquant.save(path, _tree(0))
    return path.read_bytes()


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.3, 0.9, 0.999, -1])
def test_file_cut_anywhere_is_corrupt(tmp_path, saved_bytes, keep):
    path = tmp_path / "cut.jqc"
    end = len(saved_bytes) - 1 if keep == -1 else int(len(saved_bytes) * keep)
    path.write_bytes(saved_bytes[:end])
    with pytest.raises(ValueError, match=re.escape(f"{path} is corrupt")):
        jquant.load(path)


def test_missing_member_and_disagreeing_manifest_are_corrupt(tmp_path, saved_bytes):
    path = tmp_path / "ckpt.jqc"
    path.write_bytes(saved_bytes)
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
    (None, "manifest version None"), (2, r"version 2; this jquant supports versions up to 1"),
])
def test_wrong_versions_are_refused(tmp_path, saved_bytes, version, match):
    path = tmp_path / "ckpt.jqc"
    path.write_bytes(saved_bytes)
    _edit_manifest(path, lambda m: {**m, "version": version})
    with pytest.raises(ValueError, match=match):
        jquant.load(path)


def test_a_spec_this_jquant_cannot_build_is_named(tmp_path, saved_bytes):
    path = tmp_path / "ckpt.jqc"
    path.write_bytes(saved_bytes)

    def edit(manifest):
        values = [{**v, "spec": {**v["spec"], "bits": 9}} if v.get("type") == "qarray" else v
                  for v in manifest["tree"]["values"]]
        return {**manifest, "tree": {**manifest["tree"], "values": values}}

    _edit_manifest(path, edit)
    with pytest.raises(ValueError, match=r"QArray at 'w' has spec .*cannot build: QuantSpec.bits=9"):
        jquant.load(path)


def test_empty_and_foreign_files(tmp_path):
    empty = tmp_path / "empty.jqc"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{empty} is corrupt")):
        jquant.load(empty)
    directory = tmp_path / "a_directory"
    directory.mkdir()
    with pytest.raises((IsADirectoryError, PermissionError)):
        jquant.load(directory)
