"""Quantization policies: ordered regex rules from parameter paths to specs, and `walk`, the one
walk over a parameter tree by a policy that every user of policies goes through.

Paths are named as `jquant._src.paths` says, e.g. `encoder/layer_0/attn/query/kernel`, relative to
the tree given: a rule's regex must match the whole path (`re.fullmatch`), as `Policy.explain`
shows it. `(.*/)?kernel` matches a kernel at any depth, under any prefix.

Kernel conventions (what the presets and the docs assume; a rule can say anything else):
* Dense `(in, out)`, Conv `(H, W, I, O)`, DenseGeneral/Einsum kernels whose output features are
  last: the output channel is the last axis → `channel_axes=(-1,)`; groups split the largest
  other axis (the `group_axis` default), which is the contraction axis of Dense `(in, out)` and
  the input-feature axis of Conv `HWIO`.
* Flax attention kernels (by name and rank): query/key/value `(in, heads, head_dim)` →
  `channel_axes=(-2, -1)` (per head), groups along `in`; out `(heads, head_dim, out)` → per output
  channel and one group per head (`group_axis=0, group_size=1`).
* Embedding tables `(vocab, features)`: one scale per token row → `channel_axes=(0,)`.
* Stacked layers (`nn.scan`, `nnx.vmap`): `(L, *kernel)`; a rule written for one layer says
  `stacked=1`, and the transforms give each layer its own scales (`Rule.stacked`).
* LoRA adapters (`Rule(..., lora=LoRA(r))`) of a kernel whose first n axes are contracted (Dense
  `(in, out)`: n = 1; attention out `(heads, head_dim, out)`: n = 2): A `(*kernel[:n], r)` and
  B `(r, *kernel[n:])`, stacked layers' axes in front of both (`jquant._src.lora`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import re
import warnings
from typing import Callable, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jquant._src.paths import at_path, is_float_array, is_qarray, leaves_with_paths, map_with_paths
from jquant._src.spec import QuantSpec, stacked


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Low-rank adapters on the kernels a rule matches (LoRA, Hu et al. 2021; over a quantized
    kernel, QLoRA, Dettmers et al. 2023): a layer computes

        y = x·Ŵ + (α/r)·(x·A)·B,

    Ŵ the kernel as the rule's spec makes it (the QArray through its serving path, a float
    kernel fake-quantized for QAT, or the float kernel when the rule has no spec), A `(in, r)`
    initialised he-uniform and B `(r, out)` zero (as `flax.nnx.LoRA`), so training starts at the
    base model exactly, and only A and B train. `jquant.merge` folds them into W. The term takes
    the layer's float input; a kernel served on the integer path (a rule with `act`) quantizes
    that input for x·Ŵ, which has no derivative, so adapters below such a layer get no gradient
    through it: train those in QAT (float params) or over weight-only served kernels.

    Args:
      rank: r, an int ≥ 1.
      alpha: α > 0, the adapters' scale is α/r; None: α = r (scale 1), which is `flax.nnx.LoRA`
        (no scale) and PEFT's default (lora_alpha = r = 8).

    Raises:
      TypeError: rank is not an int, alpha not a real number or None.
      ValueError: rank < 1, or alpha not finite and > 0.
    """

    rank: int
    alpha: Optional[float] = None

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise TypeError(f"LoRA.rank must be an int ≥ 1, got {type(self.rank).__name__}: {self.rank!r}")
        if self.rank < 1:
            raise ValueError(f"LoRA.rank must be ≥ 1, got {self.rank}")
        if self.alpha is not None:
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real):
                raise TypeError(f"LoRA.alpha must be a real number > 0 or None (α = rank), got "
                                f"{type(self.alpha).__name__}: {self.alpha!r}")
            if not (math.isfinite(self.alpha) and self.alpha > 0):
                raise ValueError(f"LoRA.alpha must be finite and > 0 (None: α = rank), got {self.alpha!r}")

    @property
    def scale(self) -> float:
        """α/r, the factor of the low-rank term."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def __repr__(self) -> str:
        return f"LoRA({self.rank}" + ("" if self.alpha is None else f", alpha={self.alpha!r}") + ")"


@dataclasses.dataclass(frozen=True)
class Rule:
    """`pattern` (a regex, `re.fullmatch`ed against a leaf path) → `spec` for the weight.

    Args:
      pattern: regular expression over the "/"-joined path.
      spec: QuantSpec for matching leaves, or None to keep them in float.
      act: spec for the activation that meets this weight in a matmul (used by module-level QAT;
        ignored by the parameter transforms).
      ndim: if set, the rule matches only leaves of this rank (e.g. the 3-D attention kernels,
        not a 2-D Dense that happens to share a name); a lookup by path alone skips it.
      optional: a rule that may match nothing without being reported as unused, as long as some
        other rule of the policy matches (the presets' kernel rules: a model may have no attention
        layer, or only attention; a policy that matches nothing at all is still reported).
      stacked: the number of leading axes of a matched leaf that stack layers (`nn.scan`,
        `nnx.vmap`/`nnx.scan`: kernels of shape (L, in, out)). `spec` is one layer's, as QAT inside
        the scan applies it; a transform over the tree quantizes each layer with its own scales
        (`spec.stacked(spec, k)`: the stack axes become channel axes), and the scan slices the
        resulting QArray into each layer's. `ndim` counts the stack axes too.
      lora: `LoRA(rank, alpha)` to give matched kernels low-rank adapters (the Flax wrappers:
        Dense/DenseGeneral, Linear/LinearGeneral), on top of `spec` (QLoRA; QAT) or of a float
        kernel (`spec=None`); ignored by the parameter transforms.

    Raises:
      TypeError: the pattern is not a str, a spec is not a QuantSpec, lora not a LoRA, or ndim is
        not an int ≥ 0.
      ValueError: the pattern is not a valid regular expression.
    """

    pattern: str
    spec: Optional[QuantSpec]
    act: Optional[QuantSpec] = None
    ndim: Optional[int] = None
    optional: bool = False
    stacked: int = 0
    lora: Optional[LoRA] = None

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise TypeError(f"Rule.pattern must be a str (a regular expression), got {self.pattern!r}")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"Rule.pattern {self.pattern!r} is not a valid regular expression: {err}") from None
        for name in ("spec", "act"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, QuantSpec):
                raise TypeError(f"Rule.{name} must be a QuantSpec or None, got {type(value).__name__}: {value!r}")
        if self.ndim is not None and (isinstance(self.ndim, bool) or not isinstance(self.ndim, int) or self.ndim < 0):
            raise TypeError(f"Rule.ndim must be None or an int ≥ 0 (a leaf's rank), got {self.ndim!r}")
        if isinstance(self.stacked, bool) or not isinstance(self.stacked, int) or self.stacked < 0:
            raise TypeError(f"Rule.stacked must be an int ≥ 0 (leading stack axes), got {self.stacked!r}")
        if self.lora is not None and not isinstance(self.lora, LoRA):
            raise TypeError(f"Rule.lora must be a jquant.LoRA or None, got {type(self.lora).__name__}: {self.lora!r}")

    def matches(self, path: str, ndim: Optional[int] = None, *, layer: bool = False) -> bool:
        """Whether the rule applies to a leaf at `path` of rank `ndim` (None: unknown, which a
        rule with an `ndim` never matches); `layer=True`: `ndim` is one layer's, inside a stack."""
        if self.ndim is not None and (ndim is None or ndim + (self.stacked if layer else 0) != self.ndim):
            return False
        return re.fullmatch(self.pattern, path) is not None

    def leaf_spec(self, ndim: int) -> Optional[QuantSpec]:
        """The spec for a matched leaf of rank `ndim` in the tree: `spec`, per layer of a stack.

        Raises:
          ValueError: a stacked rule on a leaf with no axis left for the layer.
        """
        if self.spec is None or self.stacked == 0:
            return self.spec
        if ndim <= self.stacked:
            raise ValueError(f"Rule.stacked={self.stacked} but the leaf has rank {ndim}: no layer axes are left")
        return stacked(self.spec, self.stacked)

    def __repr__(self) -> str:
        extra = "".join(f", {name}={getattr(self, name)!r}" for name, default in
                        (("act", None), ("ndim", None), ("optional", False), ("stacked", 0),
                                                  ("lora", None))
                        if getattr(self, name) != default)
        return f"Rule({self.pattern!r}, {self.spec!r}{extra})"


@dataclasses.dataclass(frozen=True)
class Policy:
    """Ordered rules; the first rule whose pattern matches a leaf's path wins; unmatched leaves stay.

    Frozen and hashable (a valid `jit` static argument). Non-float leaves are never quantized,
    whatever the rules say. `rules`: a list (or tuple) of Rules, or one Rule.
    """

    rules: Tuple[Rule, ...]

    def __post_init__(self):
        rules = (self.rules,) if isinstance(self.rules, Rule) else self.rules
        try:
            rules = tuple(rules)
        except TypeError:
            raise TypeError(f"Policy takes a Rule or a list of Rules, got {type(rules).__name__}: {rules!r}") from None
        for i, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                raise TypeError(f"Policy rule {i} must be a jquant.Rule, got {type(rule).__name__}: {rule!r}")
        object.__setattr__(self, "rules", rules)

    def rule_for(self, path: str, ndim: Optional[int] = None, *, layer: bool = False) -> Optional[Tuple[int, Rule]]:
        """(index, rule) of the first rule that matches a leaf at the whole `path` of rank `ndim`
        (see `Rule.matches`), or None."""
        for i, rule in enumerate(self.rules):
            if rule.matches(path, ndim, layer=layer):
                return i, rule
        return None

    def assignments(self, params) -> List[Tuple[str, Optional[int]]]:
        """[(path, index of the rule it gets or None)] for every float leaf of `params`."""
        return [(path, None if (hit := self.rule_for(path, leaf.ndim)) is None else hit[0])
                for path, leaf in leaves_with_paths(params) if is_float_array(leaf)]

    def unmatched_rules(self, params) -> List[Rule]:
        """Rules that no float leaf of `params` reaches (typos, or rules shadowed by earlier ones),
        except `optional` ones."""
        return [rule for _, rule in _unused(self.rules, {i for _, i in self.assignments(params) if i is not None})]

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


def check_policy(policy, where: str) -> "Policy":
    """TypeError unless `policy` is a Policy."""
    if not isinstance(policy, Policy):
        raise TypeError(f"{where}: policy must be a jquant.Policy, got {type(policy).__name__}")
    return policy


def _unused(rules, used) -> List[Tuple[int, Rule]]:
    """(index, rule) of the rules whose index is not in `used`, except `optional` ones while any
    rule is used."""
    return [(i, rule) for i, rule in enumerate(rules) if i not in used and not (rule.optional and used)]


def check_stack(path: str, ndim: int, layer_ndim: Optional[int], rule: Rule) -> None:
    """ValueError naming `path` if the leaf (rank `ndim`) stacks `ndim - layer_ndim` layers (what a
    model's layer sees inside `nn.scan`/`nnx.scan`) but `rule.stacked` says otherwise: its
    transform would share scales across the layers (or split a layer), unlike QAT inside the scan.
    `layer_ndim` None: unknown, nothing to check."""
    if layer_ndim is None or rule.spec is None or ndim - layer_ndim == rule.stacked:
        return
    raise ValueError(f"{path}: the layer sees a kernel of rank {layer_ndim}, the tree holds rank {ndim} "
                     f"({ndim - layer_ndim} leading stack axes, e.g. nn.scan / nnx.vmap), but {rule!r} has "
                     f"stacked={rule.stacked}; give it stacked={ndim - layer_ndim} (presets: stacked=...) so that each "
                     "layer gets its own scales, as QAT inside the scan computes them")


class Match(NamedTuple):
    """A float leaf, the first rule that matches its path (`index` into `Policy.rules`), and the
    leaf's position in `jax.tree_util.tree_leaves(tree, is_leaf=is_qarray)`. `rule.spec` is the
    spec for the leaf as it is in the tree (`Rule.leaf_spec`: per layer of a stacked leaf);
    `policy.rules[index]` is the rule as written."""
    path: str
    leaf: object
    index: int
    rule: Rule
    position: int


def walk(tree, policy: Policy, fn: Callable[[Match], object], *, where: str,
         selects: Callable[[Rule], bool] = lambda rule: rule.spec is not None, warn_unused: bool = True):
    """`tree` with `fn(match)` in place of every float leaf whose first matching rule `selects`;
    every other leaf (QArrays, non-float leaves, unmatched leaves) is kept as it is.

    The one walk over a tree by a policy: paths as `jquant._src.paths` names them, first match
    wins, and for every selected leaf:
    * NaN/Inf: eagerly, a leaf holding NaN or Inf raises a ValueError naming its path (its group
      would be corrupted). Under a trace values are unknown, so a `checkify.debug_check` stands in:
      plain `jit` drops it (no cost), `jquant.checked` (or checkify with `user_checks`) raises the
      same message.
    * Errors from `fn` (TypeError/ValueError) are re-raised with the path, the rule and the shape.
    Afterwards, with `warn_unused`, a warning lists the rules that matched no float leaf (a typo in
    a pattern must not pass silently).

    Args:
      tree: any pytree. policy: the Policy. fn: the new leaf from a Match.
      where: the caller's name, for errors. selects: which matching rules apply.

    Raises:
      TypeError: `policy` is not a Policy; ValueError/TypeError from `fn`, with the path.
    """
    check_policy(policy, where)
    used, quantized = set(), {}
    position = itertools.count()

    def visit(path, leaf):
        at = next(position)
        if is_qarray(leaf):
            hit = policy.rule_for(path, leaf.ndim)
            if hit is not None:
                quantized.setdefault(hit[0], path)
            return leaf
        if not is_float_array(leaf):
            return leaf
        hit = policy.rule_for(path, leaf.ndim)
        if hit is None:
            return leaf
        index, rule = hit
        used.add(index)
        if not selects(rule):
            return leaf
        _check_finite(path, leaf)
        try:
            return fn(Match(path, leaf, index, dataclasses.replace(rule, spec=rule.leaf_spec(leaf.ndim)), at))
        except (TypeError, ValueError) as err:
            raise at_path(path, err, f"rule {index} {rule!r} does not fit shape {tuple(leaf.shape)}: ") from None

    out = map_with_paths(visit, tree)
    unused = _unused(policy.rules, used)
    if warn_unused and unused:
        notes = [f"{rule!r}" + (f" (it matches {quantized[i]!r}, already a QArray: the tree is quantized already)"
                                if i in quantized else "") for i, rule in unused]
        warnings.warn(f"jquant {where}: {len(unused)} policy rule(s) matched no float leaf: {', '.join(notes)}",
                      stacklevel=3)
    return out


def matches(tree, policy: Policy, *, where: str, selects: Callable[[Rule], bool] = lambda rule: rule.spec is not None,
            warn_unused: bool = True) -> List[Match]:
    """The Matches `walk` visits, in flattening order (nothing is replaced)."""
    found = []
    walk(tree, policy, lambda match: found.append(match) or match.leaf, where=where, selects=selects,
         warn_unused=warn_unused)
    return found


def _non_finite(path: str, count: str) -> str:
    return f"{path}: {count} non-finite value(s) (NaN/Inf) in the weight; quantizing it would corrupt its whole group"


def _check_finite(path: str, x) -> None:
    if isinstance(x, jax.core.Tracer):
        finite = jnp.isfinite(x)
        message = _non_finite(path.replace("{", "{{").replace("}", "}}"), "{count}")
        checkify.debug_check(jnp.all(finite), message, count=jnp.sum(~finite))
        return
    finite = jnp.isfinite(x)
    if not bool(jnp.all(finite)):
        raise ValueError(_non_finite(path, int(jnp.size(x) - jnp.sum(finite))))


KERNEL = r"(.*/)?kernel"
EMBEDDING = r"(.*/)?embedding"
# Flax's attention (Linen MultiHeadDotProductAttention, NNX MultiHeadAttention): 3-D kernels
# (in, heads, head_dim) for the projections in and (heads, head_dim, out) for the one out.
ATTENTION_IN = r"(.*/)?(query|key|value)/kernel"
ATTENTION_OUT = r"(.*/)?out/kernel"


def int8_weights(embeddings: bool = False, stacked: int = 0, lora: Optional[LoRA] = None) -> Policy:
    """int8 symmetric, one scale per output channel (and per head) for every `kernel`, and per
    token row for `embedding` tables if asked; the layouts are `_kernel_rules`'. `stacked`: the
    kernels' leading layer axes (1 for an `nn.scan`/`nnx.vmap` stack; see `Rule`). `lora`:
    adapters on every kernel (QLoRA; embeddings get none)."""
    return Policy(_kernel_rules(8, True, None, stacked, lora=lora)
                  + _embedding_rules(QuantSpec(8, channel_axes=(0,)), embeddings))


def int4_weights(group_size: int = 128, embeddings: bool = False, stacked: int = 0,
                 lora: Optional[LoRA] = None) -> Policy:
    """int4 asymmetric, per output channel (and per head) and `group_size` groups along the
    contraction axis (`_kernel_rules`); embedding rows in groups of `group_size` if asked;
    `stacked` and `lora` as for `int8_weights`."""
    embedding = QuantSpec(4, symmetric=False, channel_axes=(0,), group_size=group_size)
    return Policy(_kernel_rules(4, False, group_size, stacked, lora=lora) + _embedding_rules(embedding, embeddings))


def w8a8(stacked: int = 0, lora: Optional[LoRA] = None) -> Policy:
    """int8 per-channel (and per-head) kernels and int8 per-tensor dynamic activations (the integer
    matmul path); `stacked` and `lora` as for `int8_weights` (served, the quantized input has no
    derivative: adapters train in QAT, see `LoRA`)."""
    return Policy(_kernel_rules(8, True, None, stacked, act=QuantSpec(8), lora=lora))


def fp8_w8a8(stacked: int = 0, lora: Optional[LoRA] = None) -> Policy:
    """FP8 E4M3 kernels with a float32 scale per output channel (and per head) and FP8 E4M3
    per-tensor dynamic activations (`method="fp8_e4m3"`: the FP8 dot, `jquant._src.float_dot`);
    `stacked` and `lora` as for `w8a8`."""
    return Policy(_kernel_rules(8, True, None, stacked, act=QuantSpec(8, method="fp8_e4m3"), method="fp8_e4m3",
                                lora=lora))


def _kernel_rules(bits: int, symmetric: bool, group_size: Optional[int], stacked: int,
                  act: Optional[QuantSpec] = None, method: str = "uniform", lora: Optional[LoRA] = None):
    """The presets' kernel rules, first match wins:

    * attention in (query/key/value, 3-D `(in, heads, head_dim)`): a scale per head and head_dim
      entry (`channel_axes=(-2, -1)`), groups along `in`;
    * attention out (3-D `(heads, head_dim, out)`): a scale per head and output channel — one group
      per head along the contraction (`group_axis=0, group_size=1`), so a head_dim of any size
      fits, and the integer dot takes it like any contraction group;
    * every other kernel: a scale per output channel (the last axis), groups along the largest
      other axis (the contraction of Dense `(in, out)`, the input features of Conv `HWIO`).
    All three are `optional` (a model without attention, or with only attention, reports nothing;
    one that matches none of them does), and the attention ones are rank-guarded (a 2-D Dense
    named `out` gets the general rule).
    """
    grouped = {} if group_size is None else {"group_size": group_size}
    common = dict(act=act, optional=True, stacked=stacked, lora=lora)
    fmt = dict(bits=bits, symmetric=symmetric, method=method)
    return (Rule(ATTENTION_IN, QuantSpec(channel_axes=(-2, -1), **grouped, **fmt), ndim=3 + stacked, **common),
            Rule(ATTENTION_OUT, QuantSpec(channel_axes=(-1,), group_axis=0, group_size=1, **fmt), ndim=3 + stacked,
                 **common),
            Rule(KERNEL, QuantSpec(channel_axes=(-1,), **grouped, **fmt), **common))


def _embedding_rules(spec: QuantSpec, embeddings: bool):
    return (Rule(EMBEDDING, spec),) if embeddings else ()
