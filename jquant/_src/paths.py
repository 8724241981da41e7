"""Leaf paths: how a leaf of a parameter tree is named, and the one helper that puts a path into
an error message.

A leaf's path is its keys, attribute names and indices joined with "/", e.g.
`encoder/layer_0/attn/query/kernel`. A pytree node that is itself array-like (it defines
`__jax_array__`, as NNX's `Variable` does) is a *box*: the array it holds is named by the box's
path (its own inner key adds nothing), so a tree of boxes and the plain tree of their arrays have
the same paths. QArrays are leaves.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import jax
import jax.numpy as jnp

from jquant._src.qarray import QArray


def is_qarray(x) -> bool:
    return isinstance(x, QArray)


def is_float_array(x) -> bool:
    """A float array leaf (not a QArray)."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and not isinstance(x, QArray) and jnp.issubdtype(dtype, jnp.floating)


def path_to_str(key_path) -> str:
    """A key path as "a/b/0/c"."""
    parts = []
    for key in key_path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


def _is_box(x) -> bool:
    return isinstance(x, QArray) or hasattr(x, "__jax_array__")


def _join(path: str, sub: str) -> str:
    return f"{path}/{sub}" if path and sub else path or sub


def map_with_paths(fn: Callable, tree):
    """`tree` with every leaf replaced by `fn(path, leaf)` (module docstring for the paths)."""
    def on_box(key_path, node):
        path = path_to_str(key_path)
        leaves, treedef = jax.tree_util.tree_flatten(node, is_leaf=is_qarray)
        if len(leaves) == 1:
            return jax.tree_util.tree_unflatten(treedef, [fn(path, leaves[0])])
        return jax.tree_util.tree_map_with_path(lambda sub, leaf: fn(_join(path, path_to_str(sub)), leaf), node,
                                                is_leaf=is_qarray)

    return jax.tree_util.tree_map_with_path(on_box, tree, is_leaf=_is_box)


def leaves_with_paths(tree) -> List[Tuple[str, object]]:
    """(path, leaf) of every leaf, in flattening order."""
    return [(path, leaf) for path, _, leaf in boxed_leaves(tree)]


def boxed_leaves(tree) -> List[Tuple[str, str, object]]:
    """(path, full path, leaf) of every leaf: the full path keeps a box's inner key."""
    out = []
    for key_path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]:
        path = path_to_str(key_path)
        inner = jax.tree_util.tree_flatten_with_path(node, is_leaf=is_qarray)[0]
        for sub, leaf in inner:
            full = _join(path, path_to_str(sub))
            out.append((path if len(inner) == 1 else full, full, leaf))
    return out


def nest(tree: dict, path: str, value) -> None:
    """Put `value` into the nested dict `tree` at the "/"-separated `path`, creating dicts on the way."""
    *parents, last = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def at_path(path: str, err: Exception, context: str = "") -> Exception:
    """`err` (same type) with its message prefixed by the leaf path and `context`, unless it
    already starts with that path (an inner call named it). The one way errors name a leaf."""
    if path and str(err).startswith(path):
        return err
    return type(err)(f"{path or '<root>'}: {context}{err}")
