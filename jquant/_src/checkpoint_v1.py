"""Reading version-1 checkpoints: the single zip file that jquant wrote before its checkpoints moved
to Orbax (`checkpoint`). Nothing writes this format any more; `jquant.load` reads it.

Format "jquant-checkpoint", version 1: one zip archive, members stored uncompressed:

* `arrays/<n>.npy`: one NumPy .npy file (no pickle) per array, C order. Dtypes .npy does not know
  (bfloat16, float8_*, int4, … from ml_dtypes) are stored as their raw bits (uint8/16/32/64,
  recorded as `stored_as`) and viewed back by their `jnp.dtype` name.
* `manifest.json`: `{"format": "jquant-checkpoint", "version": 1, "sharding": <note>, "tree": node}`
  where a node describes one subtree, its children in `jax.tree_util` flattening order:
    {"type": "none"}
    {"type": "scalar", "pytype": "bool" | "int" | "float" | "complex" | "str", "value": ...}
    {"type": "array", "file", "dtype", "shape", "sha256"[, "stored_as"][, "prng_impl"]}
    {"type": "qarray", "spec": {spec_json}, "shape", "dtype", "value", "scale", "zero_point": node}
    {"type": "list" | "tuple", "items": [node, ...]}
    {"type": "dict", "keys": [str | int, ...], "values": [node, ...][, "class"]}
    {"type": "node", "class", "keys": [[kind, key], ...], "values": [node, ...]}
  `sha256` is the digest of the array's C-order data bytes as stored. Non-finite Python floats
  are the strings "nan", "inf", "-inf".
"""

from __future__ import annotations

import hashlib
import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from jquant._src.paths import path_to_str
from jquant._src.qarray import QArray
from jquant._src.spec_json import spec_from_json

FORMAT = "jquant-checkpoint"
VERSION = 1

_MANIFEST = "manifest.json"
_KEY_CLASSES = {"dict": jax.tree_util.DictKey, "attr": jax.tree_util.GetAttrKey,
                "index": jax.tree_util.SequenceKey, "flat": jax.tree_util.FlattenedIndexKey}


def read(path: str):
    """(tree, [(key path, leaf), ...]) of the version-1 file at `path`, every array's sha256 checked.

    The tree comes back as written: dicts, lists, tuples, None, Python scalars, jax arrays on the
    default device (64-bit ones as NumPy arrays while `jax_enable_x64` is off), QArrays; other
    pytree nodes as dicts keyed by their keys. The leaves are listed in flattening order, a QArray
    as one leaf.

    Raises:
      ValueError: "<path> is corrupt: ..." (not a zip archive, truncated, unreadable manifest, an
        array failing the CRC or its sha256, naming the leaf); a foreign format name; a spec this
        jquant cannot build (naming the leaf).
    """
    with open(path, "rb") as f:
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, EOFError) as err:
            raise _corrupt(path, f"not a readable zip archive ({err})") from None
        with zf:
            reader = _Reader(zf, path)
            tree = reader.node(_read_manifest(zf, path)["tree"], ())
            return tree, reader.leaves


class _Reader:
    """Decodes manifest nodes back into a tree; collects (key path, leaf) in flattening order."""

    def __init__(self, zf: zipfile.ZipFile, path: str):
        self.zf, self.path = zf, path
        self.leaves = []

    def node(self, node, path):
        try:
            kind = node["type"]
            if kind == "none":
                return None
            if kind in ("array", "scalar", "qarray"):
                leaf = getattr(self, kind)(node, path)
                self.leaves.append((path, leaf))
                return leaf
            if kind in ("list", "tuple"):
                items = [self.node(n, path + (jax.tree_util.SequenceKey(i),)) for i, n in enumerate(node["items"])]
                return items if kind == "list" else tuple(items)
            if kind in ("dict", "node"):
                keys = node["keys"]
                if kind == "dict":
                    entries = [jax.tree_util.DictKey(k) for k in keys]
                else:
                    # An unknown key type was saved as its str; DictKey makes path_to_str print exactly that.
                    entries = [_KEY_CLASSES.get(k[0], jax.tree_util.DictKey)(k[1]) for k in keys]
                    keys = [k[1] for k in keys]
                if len(keys) != len(node["values"]):
                    raise _corrupt(self.path, f"malformed manifest at {_where(path)!r}: {len(keys)} keys but "
                                              f"{len(node['values'])} values")
                return {k: self.node(n, path + (e,)) for k, e, n in zip(keys, entries, node["values"])}
            raise _corrupt(self.path, f"malformed manifest at {_where(path)!r}: unknown node type {kind!r}")
        except (KeyError, TypeError, IndexError, AttributeError) as err:
            raise _corrupt(self.path, f"malformed manifest at {_where(path)!r} ({type(err).__name__}: {err})") from err

    def scalar(self, node, path):
        pytype, value = node["pytype"], node["value"]
        try:
            if pytype == "complex":
                return complex(float(value[0]), float(value[1]))
            return {"bool": bool, "int": int, "float": float, "str": str}[pytype](value)
        except (KeyError, ValueError):
            raise _corrupt(self.path, f"malformed manifest at {_where(path)!r}: scalar {node}") from None

    def qarray(self, node, path):
        try:
            spec = spec_from_json(node["spec"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self.path}: the QArray at {_where(path)!r} has spec {node['spec']} which this "
                             f"jquant cannot build: {err}") from None
        mark = len(self.leaves)
        children = [self.node(node[name], path + (jax.tree_util.GetAttrKey(name),))
                    for name in ("value", "scale", "zero_point")]
        del self.leaves[mark:]  # the QArray is the leaf, not its arrays
        return QArray(*children, spec=spec, shape=tuple(node["shape"]), dtype=jnp.dtype(node["dtype"]))

    def array(self, node, path):
        file, where = node["file"], _where(path)
        stored = np.dtype(node.get("stored_as", node["dtype"]))
        dtype = jnp.dtype(node["dtype"])
        try:
            with self.zf.open(file) as f:
                a = np.lib.format.read_array(f, allow_pickle=False)
                trailing = f.read(1)
        except KeyError:
            raise _corrupt(self.path, f"array {where!r}: member {file} is missing from the archive") from None
        except (zipfile.BadZipFile, EOFError, ValueError) as err:
            raise _corrupt(self.path, f"array {where!r} ({file}): {err}") from None
        if trailing or a.dtype != stored or list(a.shape) != list(node["shape"]):
            raise _corrupt(self.path, f"array {where!r} ({file}) holds {a.dtype}{list(a.shape)}, the manifest "
                                      f"says {stored}{list(node['shape'])}")
        a = np.asarray(a, order="C")
        if hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest() != node["sha256"]:
            raise _corrupt(self.path, f"array {where!r} ({file}): its bytes do not match the sha256 in the manifest")
        if stored != dtype:
            a = a.view(dtype)
        if "prng_impl" in node:
            return jax.random.wrap_key_data(jnp.asarray(a), impl=node["prng_impl"])
        if jax.dtypes.canonicalize_dtype(a.dtype) != a.dtype:
            return a  # 64-bit with jax_enable_x64 off: jnp.asarray would narrow it
        return jnp.asarray(a)


def _read_manifest(zf: zipfile.ZipFile, path: str) -> dict:
    try:
        raw = zf.read(_MANIFEST)
    except KeyError:
        raise _corrupt(path, f"no {_MANIFEST} in the archive") from None
    except (zipfile.BadZipFile, EOFError) as err:
        raise _corrupt(path, f"{_MANIFEST}: {err}") from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _corrupt(path, f"{_MANIFEST} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise _corrupt(path, f"{_MANIFEST} is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a jquant checkpoint: its manifest names format {manifest.get('format')!r}, "
                         f"expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise _corrupt(path, f"a zip checkpoint must be version {VERSION}, its manifest says {manifest.get('version')!r}")
    if "tree" not in manifest:
        raise _corrupt(path, f"{_MANIFEST} has no 'tree'")
    return manifest


def _where(path) -> str:
    return path_to_str(path) or "<root>"


def _corrupt(path: str, why: str) -> ValueError:
    return ValueError(f"{path} is corrupt: {why}")
