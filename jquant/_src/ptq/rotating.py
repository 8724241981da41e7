"""Folding Hadamard rotations into the float params offline, so that rotated weights are served
without rotating their activations online.

A rotated spec (`QuantSpec(rotation=Hadamard())`) stores Q(Rᵀ·W) and its dot rotates the
activation online, y = (x·R)·Q(Rᵀ·W) (`jquant._src.dot`). Where x is made by parameters through
operations that are linear in x's channels, x·R can be made by the parameters instead: x = h·W₁
(+ b) gives x·R = h·(W₁·R) (+ b·R). `fold_rotations` rewrites such params — the producer's output
axis and bias rotated, every weight that reads x stored as Rᵀ·W in float — and returns a policy
whose rules for those weights are the same specs without the rotation: the float function is
unchanged (up to rounding), and quantizing the result with that policy stores the same Q(Rᵀ·W)
as the rotated spec would, with no transform left at serving time.

Where x comes from is found by `folding.fold_groups` (the walk AWQ and SmoothQuant use) with
`rotation=True`: a rotation commutes with adding a bias and with the previous Linear, not with
a per-channel scale (a norm's γ), an elementwise product or a nonlinearity. Every weight that
reads x must have the same rotation along its contraction axis (x is rotated once for all of
them). Rotated weights that cannot be folded keep their rotated spec (rotated online) and are
listed in a warning with the reason.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Dict, NamedTuple

import jax

from jquant._src import numerics, rotation
from jquant._src.paths import leaves_with_paths
from jquant._src.policy import Policy, matches
from jquant._src.ptq.folding import fold_groups
from jquant._src.ptq.layerwise import calibration_batches, matched_targets
from jquant._src.spec import untransformed

_WHERE = "fold_rotations"


class Folded(NamedTuple):
    """What `fold_rotations` returns (unpack as `params, policy, folded = ...`).

    params: the float params with the rotations folded in (same structure).
    policy: the policy to quantize them with: a rule per folded weight (its exact path, the
      matched rule's spec without the rotation) ahead of the given rules (those made optional).
    folded: for each folded weight's path, the paths of the params its rotation went into."""
    params: Any
    policy: Policy
    folded: Dict[str, tuple]


def fold_rotations(fn, params, policy: Policy, batches) -> Folded:
    """Fold the rotations of `policy`'s rotated specs into `params` where the rotated weights'
    input is made by parameters linearly (module docstring).

    Args:
      fn, params, policy, batches: as in `jquant.ptq.gptq` (one batch is enough: only the jaxpr
        of `fn(params, *batch)` is read).

    Returns:
      Folded(params, policy, folded). Quantize with `jquant.quantize_params(params, policy)` or
      `jquant.ptq.gptq(fn, params, policy, batches)`.

    Warns:
      UserWarning listing the rotated weights left to online rotation, with the reason.
    """
    batch = calibration_batches(batches, "fold_rotations")[0]
    targets = {t.leaf: t for t in matched_targets(fn, params, policy, batch, _WHERE)
               if t.spec.rotation is not None}
    rule_index = {m.position: m.index for m in matches(params, policy, where=_WHERE)}
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaf_paths = [path for path, _ in leaves_with_paths(params)]
    folded, skipped, extra_rules, grouped, touched = {}, [], [], set(), set()
    for group in fold_groups(fn, params, batch, targets, rotation=True):
        names = [targets[leaf].path for leaf, _ in group.weights]
        grouped.update(leaf for leaf, _ in group.weights)
        reason = group.reason or _rotation_problem(group, targets, leaves)
        if reason:
            skipped += [f"{name} ({reason})" for name in names]
            continue
        rot = targets[group.weights[0][0]].spec.rotation
        for leaf, axis in group.weights + group.folds:
            leaves[leaf] = rotation.to_rotated(leaves[leaf], rot, axis).astype(leaves[leaf].dtype)
        for (leaf, _), name in zip(group.weights, names):
            folded[name] = tuple(leaf_paths[producer] for producer, _ in group.folds)
            rule = policy.rules[rule_index[leaf]]
            extra_rules.append(dataclasses.replace(rule, pattern=re.escape(name), spec=untransformed(rule.spec)))
            touched.add(rule_index[leaf])
    skipped += [f"{t.path} (contracted over several axes or inside a nested call)"
                for leaf, t in targets.items() if leaf not in grouped]
    if skipped:
        warnings.warn(f"jquant fold_rotations: {len(skipped)} rotated weight(s) not folded (rotated online when "
                      "served): " + "; ".join(skipped), stacklevel=2)
    # a rule whose every match was folded now matches nothing: optional, not reported as unused
    rules = [dataclasses.replace(rule, optional=True) if i in touched else rule for i, rule in enumerate(policy.rules)]
    return Folded(jax.tree_util.tree_unflatten(treedef, leaves), Policy(extra_rules + rules), folded)


def _rotation_problem(group, targets, leaves) -> str:
    """Why the group's input cannot be rotated once for all its weights ("" if it can)."""
    specs = [targets[leaf].spec for leaf, _ in group.weights]
    if len({spec.rotation for spec in specs}) > 1:
        return "the weights reading this input are not rotated alike: " + ", ".join(
            f"{targets[leaf].path}: {targets[leaf].spec.rotation!r}" for leaf, _ in group.weights)
    for (leaf, axis), spec in zip(group.weights, specs):
        if spec.equalization is not None:
            return (f"{targets[leaf].path} is equalized ({spec.equalization!r}): its r scales the input before the "
                    "rotation, so the rotation cannot be folded without it")
        if numerics.layout(leaves[leaf].shape, spec).transform_axis != axis:
            return f"{targets[leaf].path} is rotated along another axis than the one it is contracted over"
    return ""
