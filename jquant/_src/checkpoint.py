"""Checkpoints: `save` a pytree of arrays and QArrays to one file, `load` it back bit-exactly.

Format "jquant-checkpoint", version 1: one zip archive, every member stored uncompressed
(ZIP_STORED), so the file is the array bytes plus a few hundred bytes per array — for a quantized
tree about Σ `QArray.nbytes`. Members:

* `arrays/<n>.npy`: one NumPy .npy file (`numpy.lib.format`, no pickle) per array, in C order.
  Dtypes .npy does not know (bfloat16, float8_*, int4, … from ml_dtypes) are stored as their raw
  bits (uint8/16/32/64, recorded as `stored_as`) and viewed back by their `jnp.dtype` name.
* `manifest.json`: `{"format": "jquant-checkpoint", "version": 1, "sharding": <note>, "tree": node}`
  where a node describes one subtree, its children in `jax.tree_util` flattening order:
    {"type": "none"}
    {"type": "scalar", "pytype": "bool" | "int" | "float" | "complex" | "str", "value": ...}
    {"type": "array", "file", "dtype", "shape", "sha256"[, "stored_as"][, "prng_impl"]}
    {"type": "qarray", "spec": {QuantSpec fields}, "shape", "dtype", "value", "scale", "zero_point": node}
    {"type": "list" | "tuple", "items": [node, ...]}
    {"type": "dict", "keys": [str | int, ...], "values": [node, ...][, "class"]}
    {"type": "node", "class", "keys": [[kind, key], ...], "values": [node, ...]}
  `sha256` is the digest of the array's C-order data bytes as stored (the .npy payload after its
  header). Non-finite Python floats are written as the strings "nan", "inf", "-inf".

Preserved: every array's bytes, dtype and shape; QArray storage (packed sub-byte codes included),
spec, shape and dtype; Python scalars (bool, int, float, complex, str) with their type; the
structure of dicts, lists, tuples and None. Not stored: sharding and device placement (arrays
are gathered to this host with `np.asarray`; the manifest says so) — `load` puts them back on the
default device, or with the `NamedSharding`s of a `target` tree; which leaves were NumPy rather
than jax arrays, and jax weak types; the classes of other pytree nodes (FrozenDict, NNX State
and Variables, namedtuples, dataclasses) — they load as dicts unless `load` is given a `target`
to take the structure from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import uuid
import zipfile
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jquant._src import calibration
from jquant._src.paths import boxed_leaves, is_qarray, path_to_str
from jquant._src.qarray import QArray
from jquant._src.spec import QuantSpec

FORMAT = "jquant-checkpoint"
VERSION = 1
"""The format version `save` writes; `load` reads this version and older."""

_MANIFEST = "manifest.json"
_SHARDING_NOTE = ("not stored: arrays were gathered to one host with numpy.asarray; "
                  "load places them on the default device, or as the target's NamedShardings say")
# A fixed timestamp makes the same tree give the same bytes.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# zipfile must be told in advance that a streamed member may pass 2 GiB (the .npy header is < 1 KiB).
_ZIP64_FROM = 1 << 30
_BITS_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_KEY_KINDS = {jax.tree_util.DictKey: ("dict", "key"), jax.tree_util.GetAttrKey: ("attr", "name"),
              jax.tree_util.SequenceKey: ("index", "idx"), jax.tree_util.FlattenedIndexKey: ("flat", "key")}
_KEY_CLASSES = {kind: cls for cls, (kind, _) in _KEY_KINDS.items()}


def save(path, tree) -> None:
    """Write `tree` to a checkpoint file at `path`, atomically (format in the module docstring).

    The archive is written to a temporary file in the same directory, flushed and `fsync`ed, then
    `os.replace`d onto `path`: an exception (or a crash) during `save` never leaves a partial file
    at `path`, and a checkpoint already there stays intact until the replace. After an exception
    the temporary file is removed; a hard crash can leave a hidden `.<name>.<hex>.tmp` behind.

    Args:
      path: file path (str or os.PathLike); its directory must exist.
      tree: a pytree whose leaves are jax or NumPy arrays (any numeric or bool dtype, bfloat16 and
        the other ml_dtypes included, 0-d and size-0 too; typed PRNG key arrays), Python scalars,
        None, or `QArray` nodes. dict keys must be str or int.

    Raises:
      TypeError: naming the path of a leaf that cannot be stored (a tracer, an object or string
        array, an arbitrary object) or of a dict key that is neither str nor int.
      FileNotFoundError: the directory of `path` does not exist.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, f"cannot save checkpoint {path!r}: no such directory", directory)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:16]}.tmp")
    # O_EXCL: never write into a file someone else made; mode 0o666 lets the umask decide, as open() does.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                root = _Writer(zf).node(tree, ())
                manifest = {"format": FORMAT, "version": VERSION, "sharding": _SHARDING_NOTE, "tree": root}
                text = json.dumps(manifest, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
                zf.writestr(_zip_info(_MANIFEST), text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_directory(directory)  # makes the rename itself durable


def load(path, target=None):
    """Read a checkpoint written by `save`; arrays and QArrays come back bit-exactly.

    Every stored array's sha256 is checked. Arrays load as jax arrays on the default device
    (`jnp.asarray`), except 64-bit ones while `jax_enable_x64` is off, which stay NumPy arrays so
    that they are not narrowed to 32 bits. QArrays are rebuilt with their spec, shape and dtype.

    Args:
      path: the checkpoint file (str or os.PathLike).
      target: optional pytree with the checkpoint's structure (an NNX State, a FrozenDict, a
        custom pytree node, abstract `jax.ShapeDtypeStruct` leaves, …): the result takes its tree
        structure (`jax.tree_util.tree_structure(target, is_leaf=is_qarray)`, so a QArray is one
        leaf). Leaf paths are compared as "a/b/0" strings, with or without a box's inner key (the
        `value` of an NNX Variable: `jquant._src.paths`), so a dict checkpoint loads into an NNX State. Where a
        target leaf — a `jax.Array` or `jax.ShapeDtypeStruct`, or an array of a target QArray —
        has a `NamedSharding`, the loaded array is placed with it (`jax.device_put`), so a tree
        saved from sharded arrays comes back sharded the same way given the same tree (or its
        `jax.eval_shape`) as target. Otherwise only the target's structure is used: its leaf
        values, shapes and dtypes are not checked.

    Returns:
      The tree. Without `target`, dicts, lists, tuples and None come back as such and other pytree
      nodes (FrozenDict, NNX State and Variables, namedtuples, …) as dicts keyed by their keys.

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: "<path> is corrupt: ..." (not a zip archive, truncated, unreadable manifest, an
        array whose bytes fail the CRC or the sha256 in the manifest); a format name other than
        "jquant-checkpoint" or a version newer than `VERSION` (naming both versions); `target`
        with a different number of leaves, other paths, or a QArray where the checkpoint has none
        or vice versa (naming the first differing path); a loaded array that a target's sharding
        cannot hold (naming its path).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:  # a missing file raises FileNotFoundError naming `path`
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, EOFError) as err:
            raise _corrupt(path, f"not a readable zip archive ({err})") from None
        with zf:
            manifest = _read_manifest(zf, path)
            if target is None:
                return _Reader(zf, path).node(manifest["tree"], ())
            # Check the structure before reading any array bytes.
            shape_only = _Reader(zf, path, read_arrays=False)
            shape_only.node(manifest["tree"], ())
            treedef = _match_target(shape_only.leaves, target, path)
            reader = _Reader(zf, path)
            reader.node(manifest["tree"], ())
            likes = jax.tree_util.tree_leaves(target, is_leaf=is_qarray)
            leaves = [_place(leaf, like, where, path) for (where, leaf), like in zip(reader.leaves, likes)]
            return jax.tree_util.tree_unflatten(treedef, leaves)


class _Writer:
    """Encodes a tree as manifest nodes, writing each array to the archive as it goes (so at most
    one array at a time is on the host)."""

    def __init__(self, zf: zipfile.ZipFile):
        self.zf = zf
        self.count = 0

    def node(self, x, path):
        if x is None:
            return {"type": "none"}
        if isinstance(x, QArray):
            node = {"type": "qarray", "spec": _spec_to_json(x.spec), "shape": list(x.shape), "dtype": x.dtype.name}
            for name in ("value", "scale", "zero_point"):
                node[name] = self.node(getattr(x, name), path + (jax.tree_util.DictKey(name),))
            return node
        if isinstance(x, (jax.Array, np.ndarray, np.generic)):
            return self.array(x, path)
        if isinstance(x, (bool, int, float, complex, str)):
            return _scalar_to_json(x)
        # One level of flattening: everything below `x` counts as a leaf here.
        flat, _ = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
        if len(flat) == 1 and flat[0][0] == ():
            raise TypeError(f"{_where(path)}: cannot save a leaf of type {type(x).__qualname__}; leaves must be "
                            "arrays, Python scalars or None")
        keys = [p[0] for p, _ in flat]
        values = [self.node(child, path + (key,)) for key, (_, child) in zip(keys, flat)]
        if type(x) in (list, tuple):
            return {"type": type(x).__name__, "items": values}
        if isinstance(x, Mapping) and all(isinstance(k, jax.tree_util.DictKey) for k in keys):
            for k in keys:
                if not isinstance(k.key, (str, int)):
                    raise TypeError(f"{_where(path + (k,))}: dict key {k.key!r} of type {type(k.key).__name__}; "
                                    "checkpoint dict keys must be str or int")
            node = {"type": "dict", "keys": [k.key for k in keys], "values": values}
            if type(x) is not dict:
                node["class"] = _class_name(type(x))
            return node
        return {"type": "node", "class": _class_name(type(x)), "keys": [_key_to_json(k) for k in keys],
                "values": values}

    def array(self, x, path):
        if isinstance(x, jax.core.Tracer):
            raise TypeError(f"{_where(path)}: cannot save a traced value; call save outside jit/grad/vmap")
        extra = {}
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            extra["prng_impl"] = str(jax.random.key_impl(x))
            x = jax.random.key_data(x)
        a = np.asarray(x, order="C")  # gathers a sharded array onto this host
        if not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))
        dtype = a.dtype
        if dtype.isbuiltin == 2:  # ml_dtypes (bfloat16, float8_*, int4, …): .npy has no name for them
            a = a.view(_BITS_DTYPES[dtype.itemsize])
            extra["stored_as"] = a.dtype.name
        elif dtype.kind not in "biufc" or dtype.fields is not None:
            raise TypeError(f"{_where(path)}: cannot save an array of dtype {dtype}; supported: bool, integer, "
                            "float and complex dtypes (ml_dtypes included)")
        node = {"type": "array", "file": f"arrays/{self.count}.npy", "dtype": dtype.name, "shape": list(a.shape),
                "sha256": _sha256(a), **extra}
        self.count += 1
        with self.zf.open(_zip_info(node["file"]), "w", force_zip64=a.nbytes >= _ZIP64_FROM) as out:
            np.lib.format.write_array(out, a, allow_pickle=False)
        return node


class _Reader:
    """Decodes manifest nodes back into a tree; collects (key path, leaf) in flattening order.

    With `read_arrays=False` it reads no array bytes (array leaves are None) — used to compare the
    structure with a `target` first.
    """

    def __init__(self, zf: zipfile.ZipFile, path: str, read_arrays: bool = True):
        self.zf, self.path, self.read_arrays = zf, path, read_arrays
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
                    entries = [_key_from_json(k) for k in keys]
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
            spec = _spec_from_json(node["spec"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self.path}: the QArray at {_where(path)!r} has spec {node['spec']} which this "
                             f"jquant cannot build: {err}") from None
        mark = len(self.leaves)
        children = [self.node(node[name], path + (jax.tree_util.DictKey(name),))
                    for name in ("value", "scale", "zero_point")]
        del self.leaves[mark:]  # the QArray is the leaf, not its arrays
        return QArray(*children, spec=spec, shape=tuple(node["shape"]), dtype=jnp.dtype(node["dtype"]))

    def array(self, node, path):
        file, where = node["file"], _where(path)
        stored = np.dtype(node.get("stored_as", node["dtype"]))
        dtype = jnp.dtype(node["dtype"])
        if not self.read_arrays:
            return None
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
        if _sha256(a) != node["sha256"]:
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
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _corrupt(path, f"manifest version {version!r} is not a positive integer")
    if version > VERSION:
        raise ValueError(f"{path} is a {FORMAT} of version {version}; this jquant supports versions up to "
                         f"{VERSION} — upgrade jquant to load it")
    if "tree" not in manifest:
        raise _corrupt(path, f"{_MANIFEST} has no 'tree'")
    return manifest


def _match_target(leaves, target, path):
    """The target's treedef, after checking that its leaves line up with the checkpoint's."""
    treedef = jax.tree_util.tree_structure(target, is_leaf=is_qarray)
    flat = boxed_leaves(target)
    have = [path_to_str(p) for p, _ in leaves]
    want = [full for _, full, _ in flat]
    for i, (h, (boxed, w, leaf)) in enumerate(zip(have, flat)):
        if h not in (w, boxed):  # a leaf may be named with or without its box's inner key
            raise ValueError(f"target does not match checkpoint {path}: leaf {i} is {h!r} in the checkpoint "
                             f"but {w!r} in target")
        if isinstance(leaves[i][1], QArray) != is_qarray(leaf):
            which = "the checkpoint" if isinstance(leaves[i][1], QArray) else "target"
            raise ValueError(f"target does not match checkpoint {path}: {h!r} is a QArray only in {which}")
    if len(have) != len(want):
        extra, where = (have[len(want)], "checkpoint") if len(have) > len(want) else (want[len(have)], "target")
        raise ValueError(f"target does not match checkpoint {path}: the checkpoint has {len(have)} leaves, target "
                         f"has {len(want)}; the first unmatched is {extra!r} (only in {where})")
    return treedef


def _place(leaf, like, where, path):
    """`leaf` put with the NamedSharding of `like`, its target leaf (array by array for a QArray)."""
    if isinstance(leaf, QArray):
        names = ("value", "scale", "zero_point")
        children = [_place(getattr(leaf, n), getattr(like, n), where + (jax.tree_util.DictKey(n),), path)
                    for n in names]
        return QArray(*children, spec=leaf.spec, shape=leaf.shape, dtype=leaf.dtype)
    sharding = getattr(like, "sharding", None)
    # jax arrays only: a 64-bit NumPy leaf (x64 off) stays on the host rather than be narrowed
    if not isinstance(sharding, jax.sharding.NamedSharding) or not isinstance(leaf, jax.Array):
        return leaf
    try:
        return jax.device_put(leaf, sharding)
    except ValueError as err:
        raise ValueError(f"{path}: {_where(where)!r} of shape {leaf.shape} does not fit the target's sharding "
                         f"{sharding.spec} on mesh {dict(sharding.mesh.shape)}: {err}") from None


def _spec_to_json(spec: QuantSpec) -> dict:
    # Every dataclass field, so a field added to QuantSpec is saved without touching this module.
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    fields["calibration"] = {"type": type(spec.calibration).__name__, **dataclasses.asdict(spec.calibration)}
    fields["method"] = spec.method.name  # the format's registered name, which QuantSpec resolves back
    return {name: list(v) if isinstance(v, tuple) else v for name, v in fields.items()}


def _spec_from_json(fields: dict) -> QuantSpec:
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    if "calibration" in fields:
        options = dict(fields["calibration"])
        kinds = {cls.__name__: cls for cls in calibration.CALIBRATIONS}
        kind = options.pop("type", None)
        if kind not in kinds:
            raise ValueError(f"unknown calibration {kind!r}; allowed: {', '.join(kinds)}")
        fields["calibration"] = kinds[kind](**options)
    return QuantSpec(**fields)


def _scalar_to_json(x) -> dict:
    def number(v):
        return v if math.isfinite(v) else repr(v)  # JSON has no NaN/Infinity; float("nan") reads it back
    if isinstance(x, bool):
        return {"type": "scalar", "pytype": "bool", "value": x}
    if isinstance(x, int):
        return {"type": "scalar", "pytype": "int", "value": int(x)}
    if isinstance(x, float):
        return {"type": "scalar", "pytype": "float", "value": number(float(x))}
    if isinstance(x, complex):
        return {"type": "scalar", "pytype": "complex", "value": [number(x.real), number(x.imag)]}
    return {"type": "scalar", "pytype": "str", "value": str(x)}


def _key_to_json(key) -> list:
    kind, attr = _KEY_KINDS.get(type(key), ("str", None))
    return [kind, getattr(key, attr) if attr else str(key)]


def _key_from_json(record):
    kind, key = record
    # An unknown key type was saved as its str; DictKey makes path_to_str print exactly that.
    return _KEY_CLASSES.get(kind, jax.tree_util.DictKey)(key)


def _class_name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _where(path) -> str:
    return path_to_str(path) or "<root>"


def _sha256(a: np.ndarray) -> str:
    """sha256 of a C-contiguous array's data bytes, without copying them."""
    return hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def _corrupt(path: str, why: str) -> ValueError:
    return ValueError(f"{path} is corrupt: {why}")


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the replace is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
