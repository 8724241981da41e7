"""Quantization policies: ordered regex rules from parameter paths to specs.

A leaf's path is its keys, attribute names and indices joined with "/", e.g.
`params/encoder/layer_0/attn/query/kernel` (the leading `params/` is optional in rules). A
trailing `value` attribute (the array inside an NNX `Variable`) is dropped, so an NNX `State` and
a Linen `params` dict give the same paths.

Kernel conventions (what the presets and the docs assume; a rule can say anything else):
* Dense `(in, out)`, Conv `(H, W, I, O)`, DenseGeneral/Einsum kernels whose output features are
  last: the output channel is the last axis → `channel_axes=(-1,)`; groups split the largest
  other axis (the `group_axis` default), which is the contraction axis of Dense `(in, out)`, the
  input-feature axis of Conv `HWIO` and the `in` axis of attention `(in, heads, head_dim)`.
* Embedding tables `(vocab, features)`: one scale per token row → `channel_axes=(0,)`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, List, Optional, Tuple

import jax

from jquant.qarray import QArray
from jquant.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class Rule:
    """`pattern` (a regex, `re.fullmatch`ed against a leaf path) → `spec` for the weight.

    Args:
      pattern: regular expression over the "/"-joined path.
      spec: QuantSpec for matching leaves, or None to keep them in float.
      act: spec for the activation that meets this weight in a matmul (used by module-level QAT;
        ignored by the parameter transforms).

    Raises:
      ValueError: the pattern is not a valid regular expression, or a spec is not a QuantSpec.
    """

    pattern: str
    spec: Optional[QuantSpec]
    act: Optional[QuantSpec] = None

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise ValueError(f"Rule.pattern must be a str (a regular expression), got {self.pattern!r}")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"Rule.pattern {self.pattern!r} is not a valid regular expression: {err}") from None
        for name in ("spec", "act"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, QuantSpec):
                raise ValueError(f"Rule.{name} must be a QuantSpec or None, got {type(value).__name__}: {value!r}")

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.pattern, path) is not None

    def __repr__(self) -> str:
        act = f", act={self.act!r}" if self.act is not None else ""
        return f"Rule({self.pattern!r}, {self.spec!r}{act})"


@dataclasses.dataclass(frozen=True)
class Policy:
    """Ordered rules; the first rule whose pattern matches a leaf's path wins; unmatched leaves stay.

    Frozen and hashable (a valid `jit` static argument). Non-float leaves are never quantized,
    whatever the rules say.
    """

    rules: Tuple[Rule, ...]

    def __post_init__(self):
        rules = tuple(self.rules)
        for i, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                raise ValueError(f"Policy rule {i} must be a jquant.Rule, got {type(rule).__name__}: {rule!r}")
        object.__setattr__(self, "rules", rules)

    def rule_for(self, path: str) -> Optional[Tuple[int, Rule]]:
        """(index, rule) of the first rule matching `path`, or None.

        A leading `params/` (Flax's parameter collection) is optional: a rule matches the path
        with or without it, so `Dense_0/kernel` names the same leaf in `variables` and in
        `variables["params"]`, and in a Linen model wrapped by `jquant.flax.quantize`.
        """
        candidates = (path, path[len("params/"):]) if path.startswith("params/") else (path,)
        for i, rule in enumerate(self.rules):
            if any(rule.matches(candidate) for candidate in candidates):
                return i, rule
        return None

    def assignments(self, params) -> List[Tuple[str, Optional[int]]]:
        """[(path, index of the rule it gets or None)] for every float leaf of `params`."""
        return [(path, None if (hit := self.rule_for(path)) is None else hit[0])
                for path, leaf in leaves_with_paths(params) if is_float_array(leaf)]

    def unmatched_rules(self, params) -> List[Rule]:
        """Rules that no float leaf of `params` reaches (typos, or rules shadowed by earlier ones)."""
        used = {i for _, i in self.assignments(params) if i is not None}
        return [rule for i, rule in enumerate(self.rules) if i not in used]

    def explain(self, params) -> str:
        """A readable table: each float leaf's path and the rule it gets, then the unused rules."""
        lines = []
        for path, i in self.assignments(params):
            lines.append(f"{path}: " + ("no rule (kept)" if i is None else f"rule {i} {self.rules[i]!r}"))
        for rule in self.unmatched_rules(params):
            lines.append(f"unused: {rule!r}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return "Policy([" + ", ".join(repr(r) for r in self.rules) + "])"


def path_to_str(path) -> str:
    """A key path as "a/b/0/c", dropping a final NNX `.value` attribute."""
    parts = []
    for key in path:
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
    if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        parts.pop()
    return "/".join(parts)


def is_qarray(x) -> bool:
    return isinstance(x, QArray)


def leaves_with_paths(tree) -> Iterable[Tuple[str, Any]]:
    """(path string, leaf) pairs; QArrays are leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qarray)
    return [(path_to_str(path), leaf) for path, leaf in flat]


def is_float_array(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and not isinstance(x, QArray) and jax.numpy.issubdtype(dtype, jax.numpy.floating)


KERNEL = r"(.*/)?kernel"
EMBEDDING = r"(.*/)?embedding"


def int8_weights(embeddings: bool = False) -> Policy:
    """int8 symmetric, one scale per output channel, for every `kernel` (and `embedding` tables)."""
    return _weights(QuantSpec(8, channel_axes=(-1,)), QuantSpec(8, channel_axes=(0,)), embeddings)


def int4_weights(group_size: int = 128, embeddings: bool = False) -> Policy:
    """int4 asymmetric, per output channel and `group_size` groups along the contraction axis."""
    return _weights(QuantSpec(4, symmetric=False, channel_axes=(-1,), group_size=group_size),
                    QuantSpec(4, symmetric=False, channel_axes=(0,), group_size=group_size), embeddings)


def w8a8() -> Policy:
    """int8 per-channel kernels and int8 per-tensor dynamic activations (the integer matmul path)."""
    return Policy((Rule(KERNEL, QuantSpec(8, channel_axes=(-1,)), act=QuantSpec(8)),))


def _weights(kernel_spec: QuantSpec, embedding_spec: QuantSpec, embeddings: bool) -> Policy:
    rules = [Rule(KERNEL, kernel_spec)]
    if embeddings:
        rules.append(Rule(EMBEDDING, embedding_spec))
    return Policy(tuple(rules))
