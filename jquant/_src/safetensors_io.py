"""Safetensors export: a tree of arrays and QArrays as one `.safetensors` file that runtimes
outside JAX read (`safetensors.numpy.load_file` needs no jquant), and back.

Tensor names are the leaf paths (`jquant._src.paths`, "/"-joined keys): a float or other array
leaf is the tensor `<path>`; a QArray at `<path>` is up to four tensors, its storage as it is in
memory:

* `<path>/value`: int8 q in the tensor's shape (5..8 bits), or for 1..4 bits uint8 codes packed
  along the last axis, lowest bits first (`jquant._src.packing`);
* `<path>/scale`: float32 scales of shape `numerics.layout(shape, spec).scale_shape` (the shape
  with the group axis split, 1 on every axis that shares a scale; codebook formats: the levels,
  one more trailing axis of 2^bits);
* `<path>/zero_point`: int8 zero-points of the scale's shape (asymmetric specs only);
* `<path>/eq_scale`: bfloat16 r of an equalized spec (`jquant._src.equalization`), the tensor's
  shape with 1 on the axes its norms average over.

x̂ = scale · (q − zero_point) group by group (then R· for a rotated spec, whose seed is in the
spec, and · eq_scale for an equalized one). The file's metadata (`__metadata__`, str → str) has
"format": "jquant-safetensors", "version": "1" and "qarrays": a JSON object mapping each
QArray's path to `{"spec": spec_json, "shape", "dtype"}` (`jquant._src.spec_json`).

Relation to other layouts: GPTQ checkpoints (AutoGPTQ, `qweight`/`scales`/`qzeros`/`g_idx`) and
compressed-tensors' "pack-quantized" (`weight_packed`/`weight_scale`/`weight_zero_point`) hold a
PyTorch Linear's weight (out, in) packed into int32 along the input axis, with scales (out,
in/group). jquant's kernels are (in, out) and pack along the last axis into uint8; a converter
transposes the kernel, unpacks and repacks the codes, and reshapes the scale (groups along axis 0
of an (in, out) kernel give scale (in/group, 1, out)) — no converter is provided.
"""

from __future__ import annotations

import errno
import json
import os
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jquant._src.paths import is_qarray, nest, path_to_str
from jquant._src.qarray import QArray
from jquant._src.spec_json import spec_from_json, spec_to_json

FORMAT = "jquant-safetensors"
VERSION = 1
_QARRAY_ARRAYS = ("value", "scale", "zero_point", "eq_scale")


def export_safetensors(path, tree) -> None:
    """Write the arrays and QArrays of `tree` to the safetensors file `path` (format in the module
    docstring), atomically: written to a temporary file beside it, then renamed onto `path`.

    Arrays are gathered to this host (`np.asarray`): the file is for one process to hand to other
    runtimes; use `jquant.save` for sharded checkpoints. The file is Σ nbytes of the tensors plus
    a JSON header.

    Args:
      path: file path (str or os.PathLike); its directory must exist.
      tree: a pytree whose leaves are arrays (dtypes safetensors has: bool, (u)int8..64, float16,
        bfloat16, float32, float64, float8_e4m3fn, float8_e5m2, …) or QArrays; None is skipped.

    Raises:
      TypeError: naming the path of a leaf that is not an array or QArray, or an array of a dtype
        safetensors does not store.
      ValueError: two tensors would have the same name (naming it).
    """
    tensors, qarrays = {}, {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qarray)[0]:
        where = path_to_str(key_path)
        if isinstance(leaf, QArray):
            qarrays[where] = {"spec": spec_to_json(leaf.spec), "shape": list(leaf.shape), "dtype": leaf.dtype.name}
            named = [(f"{where}/{n}", getattr(leaf, n)) for n in _QARRAY_ARRAYS if getattr(leaf, n) is not None]
        else:
            named = [(where, leaf)]
        for name, a in named:
            if not isinstance(a, (jax.Array, np.ndarray, np.generic)) or isinstance(a, jax.core.Tracer):
                raise TypeError(f"{name}: cannot export a leaf of type {type(a).__qualname__}; leaves must be "
                                "concrete arrays or QArrays")
            if name in tensors:
                raise ValueError(f"{name}: two tensors would have this name")
            tensors[name] = np.ascontiguousarray(a)
    metadata = {"format": FORMAT, "version": str(VERSION), "qarrays": json.dumps(qarrays, separators=(",", ":"))}
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(errno.ENOENT, f"cannot export {path!r}: no such directory", directory)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:16]}.tmp")
    try:
        safetensors.numpy.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except safetensors.SafetensorError as err:
        raise TypeError(f"cannot export to {path}: {err} (dtypes: "
                        f"{sorted({str(a.dtype) for a in tensors.values()})})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def import_safetensors(path):
    """Read a file written by `export_safetensors`: a nested dict (keys split at "/") of jax arrays
    and QArrays, bit-exactly.

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: "<path> is corrupt: ..." (safetensors cannot read it); "<path> is not a jquant
        safetensors file" (no or another format in its metadata); a newer version; a QArray whose
        spec this jquant cannot build or whose tensors are missing (naming its path).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "no safetensors file", path)
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except safetensors.SafetensorError as err:
        raise ValueError(f"{path} is corrupt: {err}") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a jquant safetensors file: its metadata names format "
                         f"{metadata.get('format')!r}, expected {FORMAT!r}")
    if not metadata.get("version", "").isdigit() or int(metadata["version"]) > VERSION:
        raise ValueError(f"{path} is a {FORMAT} file of version {metadata.get('version')!r}; this jquant reads "
                         f"versions up to {VERSION}")
    tree = {}
    for where, q in json.loads(metadata.get("qarrays", "{}")).items():
        try:
            spec = spec_from_json(q["spec"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: the QArray at {where!r} has spec {q['spec']} which this jquant cannot "
                             f"build: {err}") from None
        missing = [n for n in ("value", "scale") + (("eq_scale",) if spec.equalization is not None else ())
                   if f"{where}/{n}" not in tensors]
        if missing:
            raise ValueError(f"{path} is corrupt: the QArray at {where!r} has no tensor {where}/{missing[0]}")
        arrays = {n: tensors.pop(f"{where}/{n}", None) for n in _QARRAY_ARRAYS}
        arrays = {n: None if a is None else jnp.asarray(a) for n, a in arrays.items()}
        nest(tree, where, QArray(**arrays, spec=spec, shape=tuple(q["shape"]), dtype=jnp.dtype(q["dtype"])))
    for name, a in tensors.items():
        nest(tree, name, jnp.asarray(a) if jax.dtypes.canonicalize_dtype(a.dtype) == a.dtype else a)
    return tree
