"""Find where each weight meets its input in any JAX function, and collect input statistics there.

`fn(params, *batch)` is traced to a jaxpr (`jax.make_jaxpr`); the jaxpr is then evaluated by a
small interpreter that follows every weight leaf through the operations that only re-lay it out
(`convert_element_type`, `copy`, `transpose`, `reduce_precision`) and into nested calls (`pjit`,
`closed_call`, `custom_jvp_call`, `custom_vjp_call`, `checkpoint`). A `dot_general` with a
followed weight on one side is a **site**: the other operand is the weight's input. No model code
is needed, and nothing in JAX is patched: the interpreter binds the same primitives `fn` would.

At a site the input X is laid out as rows × K, where K runs over the weight's contracted axes in
the caller's chosen order (`orders`), and the statistics are Σ XᵀX (K, K), Σ|X| and max|X| (K,)
and the row count, all float32, summed over sites (a weight used twice) and batches. Given
reference params too (the float model, while X comes from a partly quantized one), the same
batch also runs through them, and the inputs X_ref each weight meets there, row for row against
X, add Σ XᵀX_ref and Σ X_refᵀX_ref.

Weights used only in other ways (an embedding lookup, inside `scan`/`while`, reshaped before the
dot, or in a dot_general with batch dimensions on the weight side) have no site; `find_sites`
reports how they were used so callers can say why.
"""

from __future__ import annotations

import functools
from typing import Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jquant._src import numerics

LAYOUT_ONLY = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision"})
"""Primitives that change a value's precision or copy it, nothing else: a weight (or a per-channel
vector) is followed through them (`transpose` is followed too, with its permutation)."""
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                    "custom_vjp_call_jaxpr", "checkpoint", "remat"})


class Site(NamedTuple):
    """One dot_general where weight leaf `leaf` meets its input.

    `weight_axes[i]` (an axis of the weight) is contracted with `input_axes[i]` (an axis of the
    input operand of that dot_general)."""
    leaf: int
    weight_axes: Tuple[int, ...]
    input_axes: Tuple[int, ...]


class Statistics(NamedTuple):
    """Input statistics of one weight, K = product of its contracted axis sizes.

    xtx: Σ XᵀX, float32 (K, K); abs_sum: Σ|X| over rows (K,); abs_max: max|X| (K,);
    rows: number of rows of X seen (an int); with reference params, cross: Σ XᵀX_ref and
    reference_xtx: Σ X_refᵀX_ref (K, K) for the inputs X_ref the weight meets in them (else None)."""
    xtx: jax.Array
    abs_sum: jax.Array
    abs_max: jax.Array
    rows: int
    cross: Optional[jax.Array] = None
    reference_xtx: Optional[jax.Array] = None


def _inner_jaxpr(eqn) -> Optional[Tuple[jcore.Jaxpr, list]]:
    if eqn.primitive.name not in _CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(key)
        if isinstance(inner, jcore.ClosedJaxpr):
            return inner.jaxpr, inner.consts
        if isinstance(inner, jcore.Jaxpr):
            return inner, []
    return None


def _interpret(jaxpr, consts, args, followed, on_site, on_other_use):
    """Evaluate `jaxpr`; `followed[i]` is (leaf, perm) for a weight-derived argument, where axis j
    of the value is axis perm[j] of the weight. Returns the outputs and their `followed` entries."""
    env, follow = {}, {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x, f in zip(jaxpr.invars, args, followed):
        env[v] = x
        if f is not None:
            follow[v] = f
    for eqn in jaxpr.eqns:
        values = [read(v) for v in eqn.invars]
        tags = [None if isinstance(v, jcore.Literal) else follow.get(v) for v in eqn.invars]
        name = eqn.primitive.name
        inner = _inner_jaxpr(eqn) if any(tags) else None
        if inner is not None:
            outs, out_tags = _interpret(inner[0], inner[1], values, tags, on_site, on_other_use)
        else:
            out_tags = [None] * len(eqn.outvars)
            if any(tags):
                if name in LAYOUT_ONLY:
                    out_tags = [tags[0]]
                elif name == "transpose":
                    leaf, perm = tags[0]
                    out_tags = [(leaf, tuple(perm[a] for a in eqn.params["permutation"]))]
                elif name == "dot_general":
                    _dot_site(eqn, values, tags, on_site, on_other_use)
                else:
                    for tag in tags:
                        if tag is not None:
                            on_other_use(tag[0], name)
            outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, x, tag in zip(eqn.outvars, outs, out_tags):
            env[v] = x
            if tag is not None:
                follow[v] = tag
    return [read(v) for v in jaxpr.outvars], [None if isinstance(v, jcore.Literal) else follow.get(v)
                                             for v in jaxpr.outvars]


def _dot_site(eqn, values, tags, on_site, on_other_use):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if tags[0] is not None and tags[1] is not None:
        for tag in tags:
            on_other_use(tag[0], "dot_general with another weight")
        return
    side = 0 if tags[0] is not None else 1
    leaf, perm = tags[side]
    w_contract, x_contract, w_batch = (lc, rc, lb) if side == 0 else (rc, lc, rb)
    if w_batch:
        on_other_use(leaf, "dot_general with batch dimensions on the weight")
        return
    on_site(Site(leaf, tuple(perm[a] for a in w_contract), tuple(x_contract)), values[1 - side])


def flat_program(fn, treedef, n_leaves):
    def program(leaves, *batch):
        return fn(jax.tree_util.tree_unflatten(treedef, list(leaves[:n_leaves])), *batch)
    return program


def find_sites(fn, params, batch: tuple, wanted: Iterable[int]) -> Tuple[Dict[int, List[Site]], Dict[int, Set[str]]]:
    """Trace `fn(params, *batch)` abstractly and list, for each leaf index in `wanted` (indices into
    `jax.tree_util.tree_leaves(params)` with QArrays as leaves), its sites and its other uses.

    Returns:
      (sites, other_uses): {leaf: [Site, ...]} in the order the jaxpr meets them, and
      {leaf: {primitive names}} for uses that are not sites.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    wanted = set(wanted)
    closed = jax.make_jaxpr(flat_program(fn, treedef, len(leaves)))(leaves, *batch)
    sites: Dict[int, List[Site]] = {}
    other: Dict[int, Set[str]] = {}
    tags = [(i, tuple(range(np.ndim(x)))) if i in wanted else None for i, x in enumerate(leaves)]
    n_batch = len(closed.jaxpr.invars) - len(leaves)

    def record(*args):
        _interpret(closed.jaxpr, closed.consts, args, tags + [None] * n_batch,
                   lambda site, x: sites.setdefault(site.leaf, []).append(site),
                   lambda leaf, name: other.setdefault(leaf, set()).add(name))
        return 0

    jax.eval_shape(record, *leaves, *jax.tree_util.tree_leaves(batch))
    return sites, other


def statistics_program(fn, params, orders: Dict[int, Tuple[int, ...]]):
    """A function `statistics(params, batches, reference=None, only=None) -> {leaf: Statistics}`
    for the leaves in `orders`.

    Args:
      fn: `fn(params, *batch)`.
      params: a pytree with the structure (and leaf shapes) that will be passed later.
      orders: {leaf index: the weight's contracted axes in the order K runs over}.

    The per-batch work is compiled once (per batch shape) and reused for every call, so a caller
    can recompute statistics after changing weight values (sequential PTQ) without recompiling;
    `only` (a set of leaf indices) limits the work and the result to those leaves. `reference`
    (params of the same structure) adds each Statistics' `cross` and `reference_xtx`.
    Leaves without a site are absent from the result.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    program = flat_program(fn, treedef, len(leaves))
    tags = [(i, tuple(range(np.ndim(x)))) if i in orders else None for i, x in enumerate(leaves)]

    def site_rows(leaves, batch) -> Dict[int, list]:
        """Each followed leaf's inputs, one (rows, K) float32 matrix per site in jaxpr order."""
        closed = jax.make_jaxpr(program)(leaves, *batch)
        found: Dict[int, list] = {}

        def on_site(site, x):
            pair = dict(zip(site.weight_axes, site.input_axes))
            axes = [pair[a] for a in orders[site.leaf]]
            rest = [a for a in range(x.ndim) if a not in axes]
            rows = jnp.reshape(jnp.transpose(x, rest + axes), (-1, int(np.prod([x.shape[a] for a in axes]))))
            found.setdefault(site.leaf, []).append(rows.astype(jnp.float32))

        _interpret(closed.jaxpr, closed.consts, list(leaves) + jax.tree_util.tree_leaves(batch),
                   tags + [None] * (len(closed.jaxpr.invars) - len(leaves)), on_site, lambda leaf, name: None)
        return found

    def gram(a, b):
        return sum(jnp.matmul(x.T, y, precision=jax.lax.Precision.HIGHEST) for x, y in zip(a, b))

    def summary(per, ref):
        """Statistics of one leaf from its site rows `per` (and the reference's, `ref`), rows left 0."""
        stats = Statistics(gram(per, per), sum(jnp.sum(jnp.abs(x), axis=0) for x in per),
                           functools.reduce(jnp.maximum, [numerics.extrema(x, (0,), "absmax")[0] for x in per]), 0)
        return stats if ref is None else stats._replace(cross=gram(per, ref), reference_xtx=gram(ref, ref))

    def skipped(per, ref):
        return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(summary, per, ref))

    @jax.jit
    def one_batch(leaves, reference, batch, wanted):
        # The forward runs whole; a leaf's statistics (its K×K products) only where `wanted`.
        found = site_rows(leaves, batch)
        ref = None if reference is None else site_rows(reference, batch)
        return {leaf: jax.lax.cond(wanted[leaf], summary, skipped, per, None if ref is None else ref[leaf])
                ._replace(rows=sum(x.shape[0] for x in per))
                for leaf, per in found.items()}

    def add(old: Statistics, new: Statistics) -> Statistics:
        plus = lambda a, b: None if a is None else a + b  # noqa: E731
        return Statistics(old.xtx + new.xtx, old.abs_sum + new.abs_sum, jnp.maximum(old.abs_max, new.abs_max),
                          old.rows + new.rows, plus(old.cross, new.cross), plus(old.reference_xtx, new.reference_xtx))

    def statistics(params, batches: Iterable[tuple], reference=None, only=None) -> Dict[int, Statistics]:
        leaves = jax.tree_util.tree_leaves(params)
        ref_leaves = None if reference is None else jax.tree_util.tree_leaves(reference)
        wanted = np.array([only is None or i in only for i in range(len(leaves))])
        total: Dict[int, Statistics] = {}
        for batch in batches:
            for leaf, stats in one_batch(leaves, ref_leaves, tuple(batch), wanted).items():
                if wanted[leaf]:
                    stats = stats._replace(rows=int(stats.rows))
                    total[leaf] = add(total[leaf], stats) if leaf in total else stats
        return total

    return statistics
