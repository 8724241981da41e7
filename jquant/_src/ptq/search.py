"""Mixed precision by sensitivity: choose each weight's QuantSpec under a total size budget.

`search_policy` measures, for every searched weight ℓ and candidate spec c, the distortion
d(ℓ, c) of the model's output when only ℓ is quantized with c (on calibration batches), and its
exact stored size b(ℓ, c) in bytes (integers, scales, zero-points, codebooks). Assuming the
distortions add up across weights, it then solves the multiple-choice knapsack

    minimise Σ_ℓ d(ℓ, c_ℓ)  subject to  Σ_ℓ b(ℓ, c_ℓ) ≤ budget_bits_per_weight · Σ_ℓ n_ℓ / 8

exactly, by dynamic programming over the leaves with the capacity in bytes (when the capacity
exceeds 2^22 units, costs are counted in units of ⌈capacity / 2^22⌉ bytes, rounded up, so the
answer never exceeds the budget). The answer is an ordinary `Policy` with one explicit rule per
searched path, and the table behind it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jquant._src import numerics
from jquant._src.policy import Policy, Rule, matches
from jquant._src.ptq.layerwise import calibration_batches
from jquant._src.qarray import quantize
from jquant._src.spec import QuantSpec

_MAX_UNITS = 1 << 22


@dataclasses.dataclass(frozen=True)
class SearchRow:
    """One searched weight: path, element count, per candidate (stored bytes, distortion) — None
    where the candidate does not fit the shape — and the index of the chosen candidate."""
    path: str
    size: int
    options: Tuple[Optional[Tuple[int, float]], ...]
    chosen: int


@dataclasses.dataclass(frozen=True)
class SearchTable:
    """The measurements behind a searched policy; `str(table)` is a markdown table."""
    candidates: Tuple[QuantSpec, ...]
    rows: Tuple[SearchRow, ...]
    budget_bytes: int

    @property
    def bytes(self) -> int:
        """Stored bytes of the chosen specs."""
        return sum(r.options[r.chosen][0] for r in self.rows)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / max(sum(r.size for r in self.rows), 1)

    @property
    def distortion(self) -> float:
        """Σ d(ℓ, chosen) — the objective the search minimised."""
        return sum(r.options[r.chosen][1] for r in self.rows)

    def __str__(self) -> str:
        head = "| weight | size | " + " | ".join(f"{c!r}: bits/w, distortion" for c in self.candidates) + " | chosen |"
        lines = [head, "|" + "---|" * (len(self.candidates) + 3)]
        for r in self.rows:
            cells = ["n/a" if o is None else f"{8 * o[0] / r.size:.2f}, {o[1]:.3g}" for o in r.options]
            lines.append(f"| {r.path} | {r.size} | " + " | ".join(cells) + f" | {r.chosen} |")
        lines.append(f"total: {self.bits_per_weight:.3f} bits/weight ({self.bytes} of {self.budget_bytes} bytes "
                     f"allowed), distortion {self.distortion:.4g}")
        return "\n".join(lines)


def relative_mse(y, y_ref):
    """Default distortion: Σ(y − y_ref)² / Σ y_ref² over a batch's output (any pytree of arrays)."""
    num = sum(jnp.sum((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2)
              for a, b in zip(jax.tree_util.tree_leaves(y), jax.tree_util.tree_leaves(y_ref)))
    den = sum(jnp.sum(b.astype(jnp.float32) ** 2) for b in jax.tree_util.tree_leaves(y_ref))
    return num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)


def search_policy(fn, params, batches: Sequence[tuple], budget_bits_per_weight: float,
                  candidates: Sequence[QuantSpec], *, include: str = r"(.*/)?kernel",
                  distance: Callable = relative_mse) -> Tuple[Policy, SearchTable]:
    """Per-weight specs that minimise the summed output distortion within a size budget.

    Args:
      fn: the forward, `fn(params, *batch)` (any JAX function; outputs any pytree).
      params: the float parameter pytree.
      batches: calibration batches (tuples of fn's arguments after params).
      budget_bits_per_weight: stored bits per searched weight, metadata included, on average.
      candidates: the QuantSpecs to choose from (e.g. 8-bit per channel, 4-bit g128, 3- and
        2-bit k-means).
      include: regex (full match on the leaf path) of the float leaves to search.
      distance: `distance(y, y_float) -> scalar` per batch, summed over batches (default
        `relative_mse`; for logits a KL divergence is natural).

    Returns:
      (policy, table): one `Rule(re.escape(path), spec)` per searched leaf, and the SearchTable.

    Raises:
      ValueError: no leaf matches `include`, no candidate fits some leaf (naming its path), no
        candidates or batches, or the budget is below the smallest possible size.
    """
    candidates = tuple(candidates)
    if not candidates or not all(isinstance(c, QuantSpec) for c in candidates):
        raise ValueError(f"search_policy candidates must be a non-empty sequence of QuantSpec, got {candidates!r}")
    batches = calibration_batches(batches, "search_policy")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    searched = [(m.position, m.path) for m in matches(params, Policy([Rule(include, candidates[0])]),
                                                      where="search_policy", warn_unused=False)]
    if not searched:
        raise ValueError(f"search_policy include={include!r} matches no float leaf of params")

    @jax.jit
    def distortion(leaves, batches, references):
        tree = jax.tree_util.tree_unflatten(treedef, leaves)
        return sum(distance(fn(tree, *batch), ref) for batch, ref in zip(batches, references))

    references = [jax.jit(fn)(params, *batch) for batch in batches]
    rows = []
    for index, path in searched:
        options = []
        for spec in candidates:
            if numerics.layout_problem(jnp.shape(leaves[index]), spec) is not None:
                options.append(None)  # this spec does not fit this shape (e.g. group size)
                continue
            qa = quantize(leaves[index], spec)
            trial = list(leaves)
            trial[index] = qa.dequantize()
            options.append((qa.nbytes, float(distortion(trial, batches, references))))
        if all(o is None for o in options):
            raise ValueError(f"{path}: none of the candidates fits shape {tuple(leaves[index].shape)}")
        rows.append((path, int(np.size(leaves[index])), tuple(options)))

    budget = int(budget_bits_per_weight * sum(r[1] for r in rows) // 8)
    choice = _knapsack([r[2] for r in rows], budget, path_of=[r[0] for r in rows])
    table = SearchTable(candidates, tuple(SearchRow(p, n, o, c) for (p, n, o), c in zip(rows, choice)), budget)
    policy = Policy([Rule(re.escape(path), candidates[c]) for (path, _, _), c in zip(rows, choice)])
    return policy, table


def _knapsack(options: List[Tuple[Optional[Tuple[int, float]], ...]], budget: int, path_of: List[str]) -> List[int]:
    """Exact multiple-choice knapsack: one option per item, Σ cost ≤ budget, minimal Σ value."""
    unit = max(1, math.ceil(budget / _MAX_UNITS))
    capacity = budget // unit
    smallest = sum(min(o[0] for o in item if o is not None) for item in options)
    if smallest > budget:
        raise ValueError(f"search_policy budget of {budget} bytes is below the smallest choice ({smallest} bytes); "
                         "raise budget_bits_per_weight or add a smaller candidate")
    best = np.zeros(capacity + 1)  # best[c]: least distortion of the items so far within c units
    picks = []
    for item in options:
        new = np.full(capacity + 1, np.inf)
        pick = np.full(capacity + 1, -1, np.int16)
        for j, option in enumerate(item):
            if option is None:
                continue
            cost = math.ceil(option[0] / unit)
            if cost > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[cost:] = best[:capacity + 1 - cost] + option[1]
            better = candidate < new
            new[better], pick[better] = candidate[better], j
        best, picks = new, picks + [pick]
    if not np.isfinite(best[capacity]):
        raise ValueError(f"search_policy: no assignment fits {budget} bytes (costs rounded up to {unit}-byte units "
                         f"for {path_of[0]} …); raise the budget")
    chosen, remaining = [], capacity
    for item, pick in zip(reversed(options), reversed(picks)):
        j = int(pick[remaining])
        chosen.append(j)
        remaining -= math.ceil(item[j][0] / unit)
    return chosen[::-1]
