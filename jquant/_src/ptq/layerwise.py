"""Post-training quantization of a whole parameter tree, weight by weight, from calibration data.

The driver shared by the data-driven algorithms: match the policy's rules to the float leaves,
find where `fn` contracts each matched weight with its input (`capture`), then, in the
order the computation meets the weights, collect the weight's input statistics over the
calibration batches and quantize it. With `sequential=True` (default) the statistics of each
weight are collected with every earlier weight already replaced by its quantized values, so a
weight compensates the error of the layers before it; `reference=True` also collects, for the
same rows, the inputs each weight meets in the float model (`Statistics.cross`/`reference_xtx`).
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Dict, Iterable, NamedTuple, Tuple

import jax
import jax.numpy as jnp

from jquant._src import numerics
from jquant._src.paths import is_qarray, leaves_with_paths
from jquant._src.policy import Policy, matches
from jquant._src.qarray import QArray
from jquant._src.ptq.capture import Statistics, find_sites, statistics_program
from jquant._src.ptq.gptq import LayerError, contraction_order, gptq_weight
from jquant._src.spec import QuantSpec


class Result(NamedTuple):
    """What every PTQ algorithm returns (unpack as `params, errors = ...`): the new params (QArray
    leaves for GPTQ; float params with scales folded in for AWQ and SmoothQuant) and each
    processed weight's `LayerError` by path."""
    params: Any
    errors: Dict[str, LayerError]


class Target(NamedTuple):
    """A policy-matched weight: its leaf index, path, spec, and contracted axes in K order."""
    leaf: int
    path: str
    spec: QuantSpec
    order: tuple


def matched_targets(fn, params, policy: Policy, first_batch: tuple, algorithm: str) -> list:
    """The policy-matched float weights of `params` in the order `fn` first contracts them.

    Raises:
      TypeError: `params` holds QArrays, or `policy` is not a Policy.
      ValueError: naming the path, for a matched weight that `fn` never contracts in a
        dot_general (and how it is used instead), or contracts over different axes in two places,
        or whose spec does not fit its shape.
    """
    for path, leaf in leaves_with_paths(params):
        if is_qarray(leaf):
            raise TypeError(f"{path}: {algorithm} takes float params; this leaf is already a QArray")
    wanted = {m.position: (m.path, m.rule.spec) for m in matches(params, policy, where=algorithm)}
    shapes = [jnp.shape(x) for x in jax.tree_util.tree_leaves(params)]
    for index, (path, spec) in wanted.items():
        problem = numerics.layout_problem(shapes[index], spec)
        if problem is not None:
            raise ValueError(f"{path}: {algorithm}: {spec!r} does not fit shape {shapes[index]}: {problem}")
    sites, other = find_sites(fn, params, first_batch, wanted)
    for index, (path, spec) in wanted.items():
        if index not in sites:
            uses = ", ".join(sorted(other.get(index, ()))) or "not used by fn at all"
            raise ValueError(f"{path}: {algorithm} needs the inputs this weight is multiplied with, but fn never "
                             f"contracts it in a dot_general (uses: {uses}); exclude it with Rule(pattern, None) or "
                             "quantize it with jquant.quantize_params")
        axes = {tuple(sorted(site.weight_axes)) for site in sites[index]}
        if len(axes) > 1:
            raise ValueError(f"{path}: contracted over different axes {sorted(axes)} in different places; "
                             f"{algorithm} needs one input layout per weight")
    return [Target(i, wanted[i][0], wanted[i][1],
                   contraction_order(shapes[i], sites[i][0].weight_axes, wanted[i][1]))
            for i in sites if i in wanted]


def calibration_batches(batches, algorithm: str) -> list:
    """`batches` as a list of tuples (fn's arguments after params), or a ValueError when empty."""
    batches = [tuple(b) for b in batches]
    if not batches:
        raise ValueError(f"{algorithm}: batches is empty; pass at least one calibration batch (a tuple of fn's "
                         "arguments after params)")
    return batches


def quantize_layerwise(fn, params, policy: Policy, batches: Iterable[tuple],
                       quantize_weight: Callable[[jax.Array, Statistics, Target], Tuple[QArray, LayerError]], *,
                       algorithm: str, sequential: bool = True, reference: bool = False, progress: bool = True):
    """Quantize every matched weight with `quantize_weight(w, statistics, target)`.

    Returns:
      Result: the tree with QArrays at the matched leaves, and their errors.
    """
    batches = calibration_batches(batches, algorithm)
    targets = matched_targets(fn, params, policy, batches[0], algorithm)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    statistics = statistics_program(fn, params, {t.leaf: t.order for t in targets})
    seen, out, results = list(leaves), list(leaves), {}
    stats = None
    start = time.perf_counter()
    with _Progress(algorithm, len(targets), progress) as bar:
        for i, target in enumerate(targets):
            if stats is None or sequential:
                stats = statistics(jax.tree_util.tree_unflatten(treedef, seen), batches,
                                   reference=params if reference else None,
                                   only={target.leaf} if sequential else None)
            qarray, result = quantize_weight(leaves[target.leaf], stats[target.leaf], target)
            results[target.path] = result
            out[target.leaf] = qarray
            seen[target.leaf] = qarray.dequantize()
            bar.advance(f"{target.path}  error {result.error:.4g} (RTN {result.rtn_error:.4g})  "
                        f"{time.perf_counter() - start:.1f} s")
    return Result(jax.tree_util.tree_unflatten(treedef, out), results)


class _Progress:
    """A rich progress bar (layer i of n, elapsed) that also prints one line per layer."""

    def __init__(self, algorithm: str, total: int, enabled: bool):
        self.algorithm, self.total, self.enabled = algorithm, total, enabled

    def __enter__(self):
        if self.enabled:
            from rich.progress import Progress, TimeElapsedColumn
            self.bar = Progress(*Progress.get_default_columns()[:-1], TimeElapsedColumn(), transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(f"{self.algorithm} 0/{self.total}", total=self.total)
            self.done = 0
        return self

    def advance(self, line: str):
        if self.enabled:
            self.done += 1
            self.bar.console.print(f"{self.algorithm} [{self.done}/{self.total}] {line}", highlight=False)
            self.bar.update(self.task, advance=1, description=f"{self.algorithm} {self.done}/{self.total}")

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False


FLOAT_TARGET_ROWS_PER_INPUT = 4
"""`gptq(float_target=True)` warns below this many calibration rows per input channel K: on a
3-layer GELU MLP (K = 512, 3-bit g128 rotated) the float target's held-out output error was worse
than plain GPTQ's with 1·K and 2·K rows and better from 4·K."""


def gptq(fn, params, policy: Policy, batches: Iterable[tuple], *, damp: float = 0.01, act_order: bool = False,
         sequential: bool = True, float_target: bool = False, progress: bool = True) -> Result:
    """GPTQ every policy-matched weight of `params`, using the inputs `fn` feeds it.

    Args:
      fn: the forward, called as `fn(params, *batch)` — a Flax `apply`, an NNX call on split
        state, or any plain JAX function; each matched weight must reach a `dot_general`
        (`x @ w`, `jnp.einsum`, `lax.dot_general`, Flax Dense/DenseGeneral/Einsum) unchanged or
        transposed.
      params: the float parameter pytree.
      policy: which leaves get which QuantSpec (as for `jquant.quantize_params`).
      batches: calibration batches, each a tuple of the arguments of `fn` after `params`.
      damp, act_order: see `jquant.ptq.gptq_weight`.
      sequential: collect each weight's inputs with the earlier weights already quantized.
      float_target: fit each weight to the float model's output XW rather than X̃W, where X̃ are
        its inputs in the partly quantized model (GPTAQ's asymmetric calibration; see
        `jquant.ptq.gptq_weight`): the layer also corrects the error of the layers before it.
        Runs the float model beside the quantized one (twice the statistics work); needs
        `sequential=True`, without which X̃ = X, and calibration rows ≫ K (a UserWarning names
        each weight with fewer than 4·K rows).
      progress: show a progress bar and one line per weight (error vs round-to-nearest).

    Returns:
      Result(params, errors): the tree with QArray leaves where a rule matched (as
      `quantize_params` returns), and each weight's LayerError (GPTQ's and RTN's relative output
      error on the calibration inputs; with `float_target`, against the float model's output).

    Raises:
      ValueError: naming the path of a matched weight `fn` never contracts, or an empty `batches`;
        `float_target=True` with `sequential=False`.
    """
    if float_target and not sequential:
        raise ValueError("gptq: float_target=True needs sequential=True (without it every weight already sees the "
                         "float model's inputs, and there is no earlier error to correct)")

    def one(w, stats, target):
        reference = (stats.cross, stats.reference_xtx) if float_target else None
        k = stats.xtx.shape[0]
        if float_target and stats.rows < FLOAT_TARGET_ROWS_PER_INPUT * k:
            warnings.warn(f"jquant GPTQ float_target: {target.path} has {stats.rows} calibration rows for K = {k} "
                          f"inputs (fewer than {FLOAT_TARGET_ROWS_PER_INPUT}·K): its correction towards the float "
                          "output is a least-squares fit of the weight and can overfit them (it lost to plain GPTQ "
                          "on held-out inputs below 2–4·K rows); pass more calibration batches or "
                          "float_target=False", stacklevel=4)
        return gptq_weight(w, stats.xtx, stats.rows, target.spec, target.order, damp=damp, act_order=act_order,
                           reference=reference)

    return quantize_layerwise(fn, params, policy, batches, one, algorithm="GPTQ", sequential=sequential,
                              reference=float_target, progress=progress)

