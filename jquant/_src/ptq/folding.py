"""Where a per-input-channel scale can be folded: weights sharing one input, and the params that
produce that input.

Scaling methods (AWQ, SmoothQuant) rewrite X·W as (X / s)·(s ⊙ W) with s one positive number per
input channel (the contracted axis). The function stays the same only if X / s can be produced by
changing parameters: this module finds, in the jaxpr of `fn(params, *batch)`, each group of
weights that read the same input X, and walks back from X through the operations that are linear
per channel:

* `mul` by a parameter vector broadcast along the channel (a LayerNorm/RMSNorm scale γ) — fold
  into γ and stop;
* `add`/`sub` of a parameter vector (a bias β) — fold into β and continue on the other operand;
* `dot_general` with a weight whose free axis is the channel (the previous Linear) — fold into
  that axis of the weight and stop;
* `capture.LAYOUT_ONLY` (precision changes, copies) and `transpose` — follow.

Every value on the path must be used only by the path (otherwise scaling it would change
something else) and every folded parameter only once. Anything else (a nonlinearity, a reshape,
a residual connection, a nested call) stops the walk and the group cannot be scaled; the reason
is reported. Only the top level of the jaxpr is walked, and only weights contracted over a single
axis. An orthogonal rotation along the channel (`rotating.fold_rotations`) folds the same way,
except through `mul`: a rotation does not commute with a product.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, NamedTuple, Tuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jquant._src.ptq.capture import LAYOUT_ONLY, flat_program



class FoldGroup(NamedTuple):
    """Weights that read one input, and where that input's per-channel scale folds.

    weights: ((leaf, contracted weight axis), ...) in jaxpr order.
    folds: ((leaf, axis to divide by s), ...); empty when the group cannot be scaled.
    reason: why not, when `folds` is empty."""
    weights: Tuple[Tuple[int, int], ...]
    folds: Tuple[Tuple[int, int], ...]
    reason: str


def fold_groups(fn, params, batch: tuple, wanted, *, rotation: bool = False) -> List[FoldGroup]:
    """The FoldGroups of the weights (leaf indices into `jax.tree_util.tree_leaves(params)`) in
    `wanted`; a wanted weight with no top-level single-axis site is absent. `rotation=True`: for
    an orthogonal matrix along the channel instead of a per-channel scale, which commutes with
    biases and the previous Linear but not with any product (a norm's γ, a gate)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    closed = jax.make_jaxpr(flat_program(fn, treedef, len(leaves)))(leaves, *batch)
    return _Analysis(closed.jaxpr, len(leaves), set(wanted), rotation).groups()


class _Analysis:
    def __init__(self, jaxpr, n_leaves: int, wanted, rotation: bool):
        self.jaxpr, self.wanted, self.rotation = jaxpr, wanted, rotation
        self.producer: Dict = {}
        self.consumers: Dict = defaultdict(list)
        self.weight: Dict = {}  # var → (leaf, perm): a param leaf, re-laid out
        self.vector: Dict = {}  # var → (leaf, axis): a 1-D param leaf broadcast along `axis`
        for i, v in enumerate(jaxpr.invars[:n_leaves]):
            self.weight[v] = (i, tuple(range(len(v.aval.shape))))
            if len(v.aval.shape) == 1:
                self.vector[v] = (i, 0)
        for index, eqn in enumerate(jaxpr.eqns):
            for v in eqn.invars:
                if not isinstance(v, jcore.Literal):
                    self.consumers[v].append(index)
            for v in eqn.outvars:
                self.producer[v] = index
            self._tag(eqn)
        for v in jaxpr.outvars:
            if not isinstance(v, jcore.Literal):
                self.consumers[v].append(None)  # an output of fn: used outside

    def _tag(self, eqn):
        name, src = eqn.primitive.name, eqn.invars[0] if eqn.invars else None
        if isinstance(src, jcore.Literal) or len(eqn.outvars) != 1:
            return
        out = eqn.outvars[0]
        if name in LAYOUT_ONLY:
            if src in self.weight:
                self.weight[out] = self.weight[src]
            if src in self.vector:
                self.vector[out] = self.vector[src]
        elif name == "transpose" and src in self.weight:
            leaf, perm = self.weight[src]
            self.weight[out] = (leaf, tuple(perm[a] for a in eqn.params["permutation"]))
        elif name == "broadcast_in_dim" and src in self.vector:
            leaf, axis = self.vector[src]
            self.vector[out] = (leaf, eqn.params["broadcast_dimensions"][axis])
        elif name == "reshape" and src in self.vector:
            # Only a reshape that adds unit axes keeps the vector along one axis.
            shape = out.aval.shape
            big = [a for a, d in enumerate(shape) if d != 1]
            if len(big) == 1 and shape[big[0]] == src.aval.shape[self.vector[src][1]]:
                self.vector[out] = (self.vector[src][0], big[0])

    def groups(self) -> List[FoldGroup]:
        by_input: Dict = {}
        for index, eqn in enumerate(self.jaxpr.eqns):
            if eqn.primitive.name != "dot_general":
                continue
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            for side in (0, 1):
                w, x = eqn.invars[side], eqn.invars[1 - side]
                if w not in self.weight or self.weight[w][0] not in self.wanted or isinstance(x, jcore.Literal):
                    continue
                w_contract, x_contract = (lc, rc) if side == 0 else (rc, lc)
                if len(w_contract) != 1 or (lb if side == 0 else rb):
                    continue
                leaf, perm = self.weight[w]
                key = (x, x_contract[0])
                by_input.setdefault(key, []).append((index, (leaf, perm[w_contract[0]])))
        out = []
        for (x, axis), members in by_input.items():
            weights = tuple(m[1] for m in members)
            if set(self.consumers[x]) != {m[0] for m in members}:
                out.append(FoldGroup(weights, (), "the input is also used by something other than these weights"))
                continue
            folds = self._walk(x, axis)
            if isinstance(folds, str):
                out.append(FoldGroup(weights, (), folds))
            else:
                out.append(FoldGroup(weights, tuple(folds), ""))
        return out

    def _only_here(self, var) -> bool:
        return len(self.consumers[var]) == 1

    def _param_only_here(self, var) -> bool:
        """`var` and everything between it and its leaf are used once (so is the leaf)."""
        while True:
            if not self._only_here(var):
                return False
            if var not in self.producer:
                return True
            var = self.jaxpr.eqns[self.producer[var]].invars[0]

    def _walk(self, var, axis: int):
        """[(leaf, axis)] to divide by s so that `var` comes out divided by s along `axis`, or a
        string saying why that is impossible."""
        if var not in self.producer:
            return "the input comes straight from fn's arguments"
        eqn = self.jaxpr.eqns[self.producer[var]]
        name, ins = eqn.primitive.name, eqn.invars
        if any(isinstance(v, jcore.Literal) for v in ins) and name not in ("mul",):
            return f"a constant in {name}"
        if name in LAYOUT_ONLY or name == "transpose":
            if not self._only_here(ins[0]):
                return f"the value before {name} is used elsewhere"
            return self._walk(ins[0], eqn.params["permutation"][axis] if name == "transpose" else axis)
        if name == "mul" and self.rotation:
            return "a product (a norm's scale, a gate) in the input's making, which a rotation does not commute with"
        if name == "mul":
            for v in ins:
                if not isinstance(v, jcore.Literal) and v in self.vector and self.vector[v][1] == axis \
                        and self._param_only_here(v):
                    return [(self.vector[v][0], 0)]
            for v in ins:
                if not isinstance(v, jcore.Literal) and v not in self.weight and self._only_here(v):
                    found = self._walk(v, axis)
                    if not isinstance(found, str):
                        return found
            return "a product with no foldable parameter vector"
        if name in ("add", "sub"):
            folds = []
            for v in ins:
                if v in self.vector and self.vector[v][1] == axis and self._param_only_here(v):
                    folds.append((self.vector[v][0], 0))
                elif v in self.weight or not self._only_here(v):
                    return f"an operand of {name} is used elsewhere (a residual connection?)"
                else:
                    found = self._walk(v, axis)
                    if isinstance(found, str):
                        return found
                    folds += found
            return folds
        if name == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            free = [[a for a in range(len(v.aval.shape)) if a not in c and a not in b]
                    for v, c, b in zip(ins, (lc, rc), (lb, rb))]
            out_axes = [("batch", a) for a in lb] + [(0, a) for a in free[0]] + [(1, a) for a in free[1]]
            side, operand_axis = out_axes[axis]
            if side == "batch" or ins[side] not in self.weight or not self._param_only_here(ins[side]):
                return "produced by a dot_general whose output channel is not a weight's own axis"
            leaf, perm = self.weight[ins[side]]
            return [(leaf, perm[operand_axis])]
        return f"produced by {name}, which a {'rotation' if self.rotation else 'per-channel scale'} does not commute with"


def scale_along(x, s, axis: int, power: int):
    """x · s^power with the vector `s` (K,) laid along `axis` of `x` (power ±1)."""
    shape = [1] * x.ndim
    shape[axis] = -1
    s = jnp.reshape(s, shape).astype(x.dtype)
    return x * s if power > 0 else x / s
