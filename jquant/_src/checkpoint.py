"""Checkpoints on Orbax: `save` / `load` a pytree of arrays and QArrays, bit-exactly, and the
Orbax handler and args (`QuantSave`, `QuantRestore`) that put such trees in an
`orbax.checkpoint.CheckpointManager` beside optimizer state and step counters.

Format "jquant-checkpoint", version 2: an Orbax `StandardCheckpointHandler` item directory
(OCDBT/TensorStore: every array written shard by shard by the processes that hold it, nothing
gathered to one host) of the tree with each QArray replaced by the dict of its arrays
`{"value", "scale", "zero_point"}` (`zero_point` None when symmetric; and `"eq_scale"`, an
equalized spec's r, only when it has one), so
`orbax.checkpoint.StandardCheckpointer().restore(path)` reads it without jquant. The item's
Orbax custom metadata (its `_METADATA` file, committed with the arrays) holds, under "jquant":

    {"format": "jquant-checkpoint", "version": 2, "leaves": [entry, ...]}

one entry per leaf in `jax.tree_util` flattening order (a QArray is one leaf), named by its
"/"-joined path (`jquant._src.paths`):

    {"path", "array": record}
    {"path", "qarray": {"spec": spec_json, "shape", "dtype", "value": record, "scale": record,
                        "zero_point": record | null[, "eq_scale": record]}}
    {"path", "scalar": "bool" | "int" | "float"}          (a Python scalar, stored by Orbax)

    record = {"dtype", "shape", "digest"[, "prng_impl"]}

`digest` is a checksum of the array's bits, computed where the array lives (sharded arrays on
their devices): the array's bits as uint32 words w_i in C order (elements under 32 bits
zero-extended, 64-bit ones as two words, low word first; complex as real then imaginary), each
weighted by the odd constant c_i = (2i + 1) · 0x9E3779B1:

    digest = Σ_i w_i · c_i  (mod 2^32)

so any single flipped bit changes it. Arrays of size 0 have no data for Orbax to store: their
record has no digest and the Orbax tree holds None in their place. Typed PRNG key arrays are
stored as their key data (`prng_impl` names the implementation).

Atomicity is Orbax's: a checkpoint is written to a temporary directory and renamed into place
when complete (`save` adds the swap that replaces an existing checkpoint). Version-1 checkpoints
(one zip file, `checkpoint_v1`) still load.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jquant._src import checkpoint_v1
from jquant._src.paths import boxed_leaves, is_qarray, path_to_str
from jquant._src.qarray import QArray
from jquant._src.spec_json import spec_from_json, spec_to_json

FORMAT = "jquant-checkpoint"
VERSION = 2
"""The format version `save` writes; `load` reads this version and older."""

_ENTRY = "jquant"  # the key of jquant's metadata in the Orbax item's custom metadata
_QARRAY_ARRAYS = ("value", "scale", "zero_point", "eq_scale")
_ABSENT_WHEN_NONE = ("eq_scale",)  # written only when set: other QArrays' entries stay as before
_SCALARS = {"bool": bool, "int": int, "float": float}
_GOLDEN = 0x9E3779B1


class QuantCheckpointHandler(ocp.StandardCheckpointHandler):
    """The Orbax handler of jquant checkpoints: a `StandardCheckpointHandler` item (module
    docstring) whose custom metadata records each QArray's spec, shape and dtype and every
    array's digest. Use it through `QuantSave` / `QuantRestore`, with which it is registered, so
    an `ocp.CheckpointManager` or `ocp.Checkpointer` picks it by the args' type."""

    async def async_save(self, directory, item=None, save_args=None, args=None):
        if not isinstance(args, QuantSave):
            raise TypeError(f"QuantCheckpointHandler saves jquant.QuantSave(tree) args, got {type(args).__name__}")
        storage, meta, arrays = _encode(args.tree)
        for record, digest in zip((r for r, _ in arrays), _digests([a for _, a in arrays])):
            record["digest"] = digest
        return await super().async_save(directory, args=ocp.args.StandardSave(storage, custom_metadata={_ENTRY: meta}))

    def restore(self, directory, item=None, args=None):
        if args is not None and not isinstance(args, QuantRestore):
            raise TypeError(f"QuantCheckpointHandler restores with jquant.QuantRestore(target) args, got "
                            f"{type(args).__name__}")
        return _restore(self, os.fspath(directory), None if args is None else args.target)


@ocp.args.register_with_handler(QuantCheckpointHandler, for_save=True)
@dataclasses.dataclass
class QuantSave(ocp.args.CheckpointArgs):
    """Orbax args that save `tree` (arrays, QArrays, Python bool/int/float, None, in any pytree)
    as a jquant checkpoint item, e.g. `ocp.args.Composite(params=jquant.QuantSave(qparams),
    opt_state=ocp.args.StandardSave(opt_state))` in `CheckpointManager.save`.

    Raises (when constructed, before anything is written):
      TypeError: naming the path of a leaf that cannot be stored (a tracer, an object or string
        array, a str or complex scalar, an int outside int64, an arbitrary object).
      ValueError: two leaves whose paths print the same (e.g. keys "a/b" and "a" → "b").
    """

    tree: Any

    def __post_init__(self):
        _encode(self.tree)


@ocp.args.register_with_handler(QuantCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class QuantRestore(ocp.args.CheckpointArgs):
    """Orbax args that restore a jquant checkpoint item; `target` as in `load` (None: QArrays are
    rebuilt from the metadata and arrays land on the default device)."""

    target: Any = None


def save(path, tree, *, overwrite: bool = False) -> None:
    """Write `tree` to a new checkpoint directory at `path` (format in the module docstring).

    The checkpoint is written by Orbax under a temporary name next to `path` and renamed into
    place once complete: an exception, Ctrl-C or a killed process during `save` leaves nothing at
    `path` and an existing checkpoint there intact (a hard crash may leave a hidden
    `.<name>.jquant-*` directory). With `overwrite=True` an existing checkpoint is replaced only
    after the new one is complete: it is renamed aside, the new one renamed in, the old one
    deleted. Call it on every process of a multi-process job (Orbax writes each process's shards;
    the renames happen on the primary process).

    Args:
      path: directory path (str or os.PathLike); its parent must exist.
      tree: a pytree (not a bare array) whose leaves are jax or NumPy arrays (any numeric or bool
        dtype, ml_dtypes included, 0-d and size-0, sharded or not; typed PRNG key arrays), Python
        bool/int/float, None, or `QArray`s.
      overwrite: replace a checkpoint already at `path`.

    Raises:
      FileExistsError: something is at `path` and `overwrite` is False.
      FileNotFoundError: the parent directory does not exist.
      TypeError, ValueError: as `QuantSave`, before anything is written.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(errno.EEXIST, "cannot save checkpoint: something is there already (pass "
                                            "overwrite=True to replace it)", path)
    if not os.path.isdir(parent):
        raise FileNotFoundError(errno.ENOENT, f"cannot save checkpoint {path!r}: no such directory", parent)
    args = QuantSave(tree)
    staging = os.path.join(parent, f".{name}.jquant-{uuid.uuid4().hex[:16]}")
    primary = ocp.multihost.is_primary_host(0)
    try:
        ocp.Checkpointer(QuantCheckpointHandler()).save(staging, args=args)
        if primary:
            if os.path.lexists(path):
                old = staging + ".old"
                os.rename(path, old)
                os.rename(staging, path)
                _remove(old)
            else:
                os.rename(staging, path)
    except BaseException:
        if primary:  # Orbax's unfinished temporary directory (or the finished one, not yet renamed)
            for leftover in os.listdir(parent):
                if leftover.startswith(os.path.basename(staging)) and not leftover.endswith(".old"):
                    _remove(os.path.join(parent, leftover))
        raise
    ocp.multihost.sync_global_processes(f"jquant.save:{staging}")


def load(path, target=None):
    """Read a checkpoint written by `save` (or a version-1 file); arrays and QArrays come back
    bit-exactly, every array checked against its digest.

    Args:
      path: the checkpoint directory (or version-1 file), str or os.PathLike; also the directory
        of a `QuantSave` item inside a `CheckpointManager` step (`<root>/<step>/<item name>`).
      target: optional pytree with the checkpoint's structure (an NNX State, a FrozenDict, a
        custom pytree node, abstract `jax.ShapeDtypeStruct` leaves, …): the result takes its tree
        structure (`jax.tree_util.tree_structure(target, is_leaf=is_qarray)`, a QArray one leaf).
        Leaf paths are compared as "a/b/0" strings, with or without a box's inner key (the `value`
        of an NNX Variable), so a dict checkpoint loads into an NNX State. Each array — the
        arrays of a QArray too — is restored with the `jax.sharding.Sharding` of the target leaf
        (a `jax.Array` or `ShapeDtypeStruct` with one), each process reading only its shards, so a
        tree saved sharded comes back sharded the same way given the same tree or its
        `jax.eval_shape` with shardings. Otherwise only the target's structure is used: its leaf
        values, shapes and dtypes are not checked.

    Returns:
      The tree. Without `target`: arrays on the default device (64-bit ones as NumPy arrays while
      `jax_enable_x64` is off, so they are not narrowed), QArrays rebuilt with their spec, shape
      and dtype, Python scalars, and the structure as Orbax restores it: dicts (other pytree
      nodes — FrozenDict, NNX State, dataclasses — as dicts keyed by their key names), lists
      (tuples too), None.

    Raises:
      FileNotFoundError: nothing at `path`.
      ValueError: "<path> is corrupt: ..." (Orbax cannot read it, truncated or missing files, an
        array whose bits fail its digest — naming the leaf —, metadata that disagrees with the
        Orbax tree); "<path> is not a jquant checkpoint" (an Orbax checkpoint without jquant's
        metadata, or another format); a version newer than `VERSION` (naming both); a spec this
        jquant cannot build (naming the leaf); `target` with a different number of leaves, other
        paths, or a QArray where the checkpoint has none or vice versa (naming the first differing
        path); a target sharding that cannot hold the stored array (naming the leaf).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no checkpoint", path)
    if os.path.isdir(path):
        return ocp.Checkpointer(QuantCheckpointHandler()).restore(path, args=QuantRestore(target))
    tree, leaves = checkpoint_v1.read(path)
    if target is None:
        return tree
    entries = [{"path": path_to_str(p), **({"qarray": {}} if isinstance(leaf, QArray) else {})} for p, leaf in leaves]
    treedef, shardings = _match_target(entries, target, path)
    out = []
    for (where, leaf), entry in zip(leaves, entries):
        if isinstance(leaf, QArray):
            arrays = [_put(getattr(leaf, n), shardings.get(f"{entry['path']}/{n}"), f"{entry['path']}/{n}", path)
                      for n in _QARRAY_ARRAYS]
            leaf = QArray(**dict(zip(_QARRAY_ARRAYS, arrays)), spec=leaf.spec, shape=leaf.shape, dtype=leaf.dtype)
        else:
            leaf = _put(leaf, shardings.get(entry["path"]), entry["path"], path)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def _encode(tree):
    """(the tree Orbax stores, jquant's metadata, [(record, array) to digest]); TypeError/ValueError
    naming the leaf for what cannot be stored."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qarray)
    stored, entries, arrays, seen = [], [], [], set()
    for key_path, leaf in flat:
        where = path_to_str(key_path)
        if where in seen:
            raise ValueError(f"{where}: two leaves have this path; checkpoint leaf paths must differ")
        seen.add(where)
        if isinstance(leaf, QArray):
            entry = {"spec": spec_to_json(leaf.spec), "shape": list(leaf.shape), "dtype": leaf.dtype.name}
            storage = {}
            for name in _QARRAY_ARRAYS:
                a = getattr(leaf, name)
                if a is None and name in _ABSENT_WHEN_NONE:
                    continue
                entry[name], storage[name] = (None, None) if a is None else _encode_array(a, f"{where}/{name}", arrays)
            stored.append(storage)
            entries.append({"path": where, "qarray": entry})
        elif isinstance(leaf, (bool, int, float)) and not isinstance(leaf, np.generic):
            if isinstance(leaf, int) and not isinstance(leaf, bool) and not -2**63 <= leaf < 2**63:
                raise TypeError(f"{where}: the int {leaf} does not fit in int64, which Orbax stores Python ints as")
            stored.append(leaf)
            entries.append({"path": where, "scalar": next(k for k, t in _SCALARS.items() if isinstance(leaf, t))})
        else:
            record, array = _encode_array(leaf, where, arrays)
            stored.append(array)
            entries.append({"path": where, "array": record})
    meta = {"format": FORMAT, "version": VERSION, "leaves": entries}
    return jax.tree_util.tree_unflatten(treedef, stored), meta, arrays


def _encode_array(a, where, arrays):
    """(record, what Orbax stores) of one array leaf; appends it to `arrays` to be digested."""
    if isinstance(a, jax.core.Tracer):
        raise TypeError(f"{where}: cannot save a traced value; call save outside jit/grad/vmap")
    record = {}
    if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        record["prng_impl"] = str(jax.random.key_impl(a))
        a = jax.random.key_data(a)
    if isinstance(a, np.generic):
        a = np.asarray(a)
    if not isinstance(a, (jax.Array, np.ndarray)):
        raise TypeError(f"{where}: cannot save a leaf of type {type(a).__qualname__}; leaves must be arrays, "
                        "QArrays, Python bool/int/float or None")
    if isinstance(a, np.ndarray):
        if a.dtype.kind not in "biufcV" or a.dtype.fields is not None or (a.dtype.kind == "V" and a.dtype.isbuiltin != 2):
            raise TypeError(f"{where}: cannot save an array of dtype {a.dtype}; supported: bool, integer, float "
                            "and complex dtypes (ml_dtypes included)")
        if not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))
    record.update(dtype=a.dtype.name, shape=list(a.shape))
    if a.size == 0:
        return record, None
    arrays.append((record, a))
    return record, a


def _restore(handler: QuantCheckpointHandler, directory: str, target):
    """`load` of an Orbax directory (module docstring), with `handler`'s Orbax methods."""
    try:
        tree_meta = handler.metadata(epath.Path(directory))
    except FileNotFoundError:
        raise ValueError(f"{directory} is not a jquant checkpoint: it has no Orbax PyTree metadata") from None
    except Exception as err:  # Orbax's errors for unreadable metadata vary; this names the path
        raise _corrupt(directory, f"Orbax cannot read its metadata ({type(err).__name__}: {_first_line(err)})") from err
    entries = _read_entries(tree_meta.custom_metadata, directory)
    records = {}
    for entry in entries:
        if "qarray" in entry:
            for name in _QARRAY_ARRAYS:
                if entry["qarray"].get(name) is not None:
                    records[f"{entry['path']}/{name}"] = entry["qarray"][name]
        else:
            records[entry["path"]] = entry.get("array", entry)
    treedef, shardings = (None, {}) if target is None else _match_target(entries, target, directory)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract(key_path, meta):
        where = path_to_str(key_path)
        record = records.get(where)
        kind = ocp.metadata.ScalarMetadata if "scalar" in (record or {}) else ocp.metadata.ArrayMetadata
        if record is None or not isinstance(meta, kind):
            raise _corrupt(directory, f"the Orbax tree has {type(meta).__name__} {where!r}, which jquant's metadata "
                                      "does not list as such")
        if "scalar" in record:
            return _SCALARS[record["scalar"]](0)
        shape, dtype = tuple(record["shape"]), jnp.dtype(record["dtype"])
        if (tuple(meta.shape), jnp.dtype(meta.dtype)) != (shape, dtype):
            raise _corrupt(directory, f"{where!r} is {meta.dtype}{list(meta.shape)} in the Orbax tree, "
                                      f"{dtype}{list(shape)} in jquant's metadata")
        if jax.dtypes.canonicalize_dtype(dtype) != dtype:
            return np.empty(shape, dtype)  # 64-bit with jax_enable_x64 off: restored as NumPy, not narrowed
        return jax.ShapeDtypeStruct(shape, dtype, sharding=_fitting(shardings.get(where, default), shape, where,
                                                                    directory))

    item = jax.tree_util.tree_map_with_path(abstract, tree_meta.tree)
    try:
        raw = ocp.StandardCheckpointHandler.restore(handler, epath.Path(directory), args=ocp.args.StandardRestore(item))
    except Exception as err:  # TensorStore/Orbax errors for missing or truncated files
        raise _corrupt(directory, f"Orbax cannot read it ({type(err).__name__}: {_first_line(err)})") from err
    stored = {path_to_str(p): a for p, a in jax.tree_util.tree_flatten_with_path(raw)[0]}
    checked = [(where, stored[where]) for where, r in records.items() if "digest" in r]
    for (where, a), digest in zip(checked, _digests([a for _, a in checked])):
        if digest != records[where]["digest"]:
            raise _corrupt(directory, f"{where!r}: its data does not match the digest recorded at save")
    leaves = {entry["path"]: _decode(entry, stored, shardings, default, directory) for entry in entries}
    if target is not None:
        return jax.tree_util.tree_unflatten(treedef, [leaves[entry["path"]] for entry in entries])

    def rebuild(node, where):
        if where in leaves:
            return leaves[where]
        if isinstance(node, dict):
            return {k: rebuild(v, f"{where}/{k}" if where else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [rebuild(v, f"{where}/{i}" if where else str(i)) for i, v in enumerate(node)]
        return node

    return rebuild(raw, "")


def _decode(entry, stored, shardings, default, directory):
    """The leaf of one metadata entry, from the restored arrays `stored` (by path)."""
    where = entry["path"]

    def array(record, at):
        if "digest" not in record:  # size 0: nothing stored
            dtype = jnp.dtype(record["dtype"])
            a = np.zeros(record["shape"], dtype)
            a = a if jax.dtypes.canonicalize_dtype(dtype) != dtype else jax.device_put(a, shardings.get(at, default))
        else:
            a = stored[at]
        return jax.random.wrap_key_data(a, impl=record["prng_impl"]) if "prng_impl" in record else a

    if "scalar" in entry:
        return stored[where]
    if "array" in entry:
        return array(entry["array"], where)
    q = entry["qarray"]
    try:
        spec = spec_from_json(q["spec"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{directory}: the QArray at {where!r} has spec {q['spec']} which this jquant cannot "
                         f"build: {err}") from None
    arrays = {n: None if q.get(n) is None else array(q[n], f"{where}/{n}") for n in _QARRAY_ARRAYS}
    return QArray(**arrays, spec=spec, shape=tuple(q["shape"]), dtype=jnp.dtype(q["dtype"]))


def _read_entries(custom, directory):
    meta = (custom or {}).get(_ENTRY) if isinstance(custom, dict) else None
    if meta is None:
        raise ValueError(f"{directory} is not a jquant checkpoint: its Orbax metadata has no {_ENTRY!r} entry "
                         "(read a plain Orbax checkpoint with orbax.checkpoint directly)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{directory} is not a jquant checkpoint: its metadata names format "
                         f"{meta.get('format') if isinstance(meta, dict) else meta!r}, expected {FORMAT!r}")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 2:
        raise _corrupt(directory, f"metadata version {version!r} is not an integer ≥ 2")
    if version > VERSION:
        raise ValueError(f"{directory} is a {FORMAT} of version {version}; this jquant supports versions up to "
                         f"{VERSION} — upgrade jquant to load it")
    entries = meta.get("leaves")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("path"), str)
                                                and len(e) == 2 for e in entries):
        raise _corrupt(directory, "jquant's metadata has no valid 'leaves' list")
    return entries


def _match_target(entries, target, path):
    """(the target's treedef, {array path: the target's sharding}) after checking that the target's
    leaves line up with the checkpoint's `entries`."""
    treedef = jax.tree_util.tree_structure(target, is_leaf=is_qarray)
    flat = boxed_leaves(target)
    have = [e["path"] for e in entries]
    shardings = {}
    for i, (h, (boxed, w, leaf)) in enumerate(zip(have, flat)):
        if h not in (w, boxed):  # a leaf may be named with or without its box's inner key
            raise ValueError(f"target does not match checkpoint {path}: leaf {i} is {h!r} in the checkpoint "
                             f"but {w!r} in target")
        if ("qarray" in entries[i]) != is_qarray(leaf):
            which = "the checkpoint" if "qarray" in entries[i] else "target"
            raise ValueError(f"target does not match checkpoint {path}: {h!r} is a QArray only in {which}")
        named = [(f"{h}/{n}", getattr(leaf, n)) for n in _QARRAY_ARRAYS] if is_qarray(leaf) else [(h, leaf)]
        for where, like in named:
            sharding = getattr(like, "sharding", None)
            if isinstance(sharding, jax.sharding.Sharding):
                shardings[where] = sharding
    if len(have) != len(flat):
        extra, where = ((have[len(flat)], "checkpoint") if len(have) > len(flat)
                        else (flat[len(have)][1], "target"))
        raise ValueError(f"target does not match checkpoint {path}: the checkpoint has {len(have)} leaves, target "
                         f"has {len(flat)}; the first unmatched is {extra!r} (only in {where})")
    return treedef, shardings


def _fitting(sharding, shape, where, path):
    """`sharding`, after a ValueError naming the leaf unless it can hold an array of `shape`."""
    try:
        sharding.shard_shape(shape)
    except ValueError as err:
        raise ValueError(f"{path}: {where!r} of shape {shape} does not fit the target's sharding "
                         f"{getattr(sharding, 'spec', sharding)}: {err}") from None
    return sharding


def _put(leaf, sharding, where, path):
    """A version-1 leaf placed with the target's `sharding` (jax arrays only: a 64-bit NumPy leaf
    stays on the host rather than be narrowed)."""
    if sharding is None or not isinstance(leaf, jax.Array):
        return leaf
    return jax.device_put(leaf, _fitting(sharding, leaf.shape, where, path))


def _digests(arrays) -> list:
    """The digest (module docstring) of each array: jax arrays on their devices (one program per
    set of devices), 64-bit NumPy arrays on the host (jax would narrow them)."""
    arrays, out = list(arrays), [None] * len(arrays)
    groups = {}
    for i, a in enumerate(arrays):
        if isinstance(a, np.ndarray) and jax.dtypes.canonicalize_dtype(a.dtype) != a.dtype:
            out[i] = int(_combine(_host_words(a), np))
        else:
            a = arrays[i] = jnp.asarray(a)
            groups.setdefault(frozenset(a.sharding.device_set), []).append(i)
    for indices in groups.values():
        for i, d in zip(indices, _device_digests([arrays[i] for i in indices])):
            out[i] = int(d.addressable_data(0))
    return out


@jax.jit
def _device_digests(arrays):
    return [_combine(_device_words(a), jnp) for a in arrays]


def _device_words(a):
    """The bits of a jax array as uint32 words, shape `a.shape + (k,)`, k words per element."""
    shape = a.shape
    if jnp.issubdtype(a.dtype, jnp.complexfloating):
        a = jnp.stack([a.real, a.imag], axis=-1)
    bits = jax.dtypes.itemsize_bits(a.dtype)
    if a.dtype == jnp.bool_:
        words = a.astype(jnp.uint32)
    elif bits < 32:
        words = jax.lax.bitcast_convert_type(a, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
    else:
        words = jax.lax.bitcast_convert_type(a, jnp.uint32)  # 64-bit: a trailing axis of 2, low word first
    return words.reshape(shape + (-1,))


def _host_words(a: np.ndarray) -> np.ndarray:
    """`_device_words` of a NumPy array of a 64-bit dtype (which jax would narrow while
    `jax_enable_x64` is off): its little-endian 32-bit words."""
    return np.ascontiguousarray(a).reshape(-1).view("<u4").reshape(a.shape + (-1,))


def _combine(words, xp):
    """Σ_i w_i · (2i + 1) · 0x9E3779B1 mod 2^32 over the words in C order, i their flat index."""
    index = xp.zeros(words.shape, xp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        iota = (jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) if xp is jnp
                else np.indices(words.shape, dtype=np.uint32)[axis])
        index = index + iota * xp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    weight = (index * xp.uint32(2) + xp.uint32(1)) * xp.uint32(_GOLDEN)
    return xp.sum(words * weight, dtype=xp.uint32)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""


def _corrupt(path: str, why: str) -> ValueError:
    return ValueError(f"{path} is corrupt: {why}")
