"""LoRA over quantized kernels: the adapters' layout, initialisation, low-rank term and merge.

A kernel W whose first n axes are contracted with the input (Dense `(in, out)`: n = 1; Flax
attention query/key/value `(in, heads, head_dim)`: n = 1; attention out `(heads, head_dim, out)`:
n = 2) gets two adapters, A `(*W.shape[:n], r)` and B `(r, *W.shape[n:])` (for a 2-D kernel,
`flax.nnx.LoRA`'s `(in, r)` and `(r, out)`), and its layer computes

    y = x·Ŵ + (α/r)·(x·A)·B,

Ŵ the kernel as the policy serves or trains it (`Rule.spec`: a QArray through
`jquant.dot_general`, or a float kernel fake-quantized for QAT), the low-rank term in float from
the layer's unquantized input. Nothing of size W is formed in float: x·A is `(..., r)`. Stacked
layers (`nn.scan`, `nnx.vmap`) keep their k stack axes in front of A and B, as of W.

The adapters of a tree are a plain tree keyed like the kernels: the adapters of the kernel at
path `P` are `P/lora_a` and `P/lora_b` (the Linen `"lora"` collection is one; `merge` reads it).
The policy (`Rule.lora`, `jquant.LoRA`) says which kernels get them; the Flax wrappers
(`jquant.flax`) create and apply them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from jquant._src.paths import at_path, is_qarray, leaves_with_paths, map_with_paths
from jquant._src.policy import LoRA, Policy, walk
from jquant._src.transforms import quantize_params

A, B = "lora_a", "lora_b"
"""The names of the two adapters under their kernel's path (Flax's `nnx.LoRA` names)."""


def init(key, shape: Tuple[int, ...], inputs: int, config: LoRA, dtype=jnp.float32, stacked: int = 0) -> Dict:
    """{"lora_a": A, "lora_b": B} for a kernel of `shape` whose `inputs` axes after the `stacked`
    leading ones are contracted with the layer's input.

    A `(*stack, *in, r)` is he-uniform over its fan-in prod(in) (each stacked layer drawn on its
    own), B `(*stack, r, *out)` is zero — `flax.nnx.LoRA`'s initialisers — so x·Ŵ + (α/r)·(x·A)·B
    equals x·Ŵ before training.

    Raises:
      ValueError: `inputs` leaves no input or no output axis.
    """
    shape = tuple(shape)
    if not 0 < inputs < len(shape) - stacked:
        raise ValueError(f"LoRA: a kernel of shape {shape} with {stacked} stack axes has no {inputs} input axes "
                         "followed by output axes")
    stack, n = shape[:stacked], stacked + inputs
    a = jax.nn.initializers.he_uniform(in_axis=tuple(range(stacked, n)), out_axis=n,
                                       batch_axis=tuple(range(stacked)))(key, shape[:n] + (config.rank,), dtype)
    return {A: a, B: jnp.zeros(stack + (config.rank,) + shape[n:], dtype)}


def low_rank(x, a, b, dimension_numbers, scale: float, precision=None):
    """(α/r)·(x·A)·B, shaped like `lax.dot_general(x, W, dimension_numbers)`, for the adapters
    A `(*in, r)`, B `(r, *out)` of one layer's kernel W `(*in, *out)`, computed in x's dtype.

    Raises:
      ValueError: batch dimensions, or W's contracted axes are not its leading ones (A's layout).
    """
    (lhs_contract, rhs_contract), batch = dimension_numbers
    n = a.ndim - 1
    if any(batch) or tuple(rhs_contract) != tuple(range(n)):
        raise ValueError(f"LoRA takes a dot that contracts the kernel's {n} leading axes with no batch axes "
                         f"(A {a.shape}, B {b.shape}); got dimension numbers {dimension_numbers}")
    xa = lax.dot_general(x, a.astype(x.dtype), ((tuple(lhs_contract), tuple(range(n))), ((), ())),
                         precision=precision)
    return lax.dot_general(xa * jnp.asarray(scale, x.dtype), b.astype(x.dtype), (((xa.ndim - 1,), (0,)), ((), ())),
                           precision=precision)


@dataclasses.dataclass(frozen=True, eq=False)
class WithAdapters:
    """A `lax.dot_general`-like op (x, W, dimension_numbers, ...) plus one layer's adapters:
    op(x, W) + (α/r)·(x·A)·B, the low-rank term from the same x as the op gets (before any
    activation quantization the op does), in the op's output dtype."""

    op: Callable
    a: object
    b: object
    scale: float

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, **kwargs):
        out = self.op(lhs, rhs, dimension_numbers, precision=precision, **kwargs)
        return out + low_rank(lhs, self.a, self.b, dimension_numbers, self.scale, precision).astype(out.dtype)


def delta(a, b, shape: Tuple[int, ...], scale: float):
    """ΔW = (α/r)·A·B, a kernel of `shape` (its stack axes, if any, in front of A and B too),
    in A's dtype.

    Raises:
      ValueError: A and B do not fit `shape`.
    """
    shape = tuple(shape)
    stacked = a.ndim + b.ndim - 2 - len(shape)
    inputs = a.ndim - 1 - stacked
    rank = a.shape[-1]
    if (stacked < 0 or inputs < 1 or a.shape[:-1] != shape[:stacked + inputs] or b.shape[:stacked] != shape[:stacked]
            or b.shape[stacked:] != (rank,) + shape[stacked + inputs:]):
        raise ValueError(f"adapters A {a.shape} and B {b.shape} do not fit a kernel of shape {shape}: A is "
                         "(*stack, *in, r) and B (*stack, r, *out) for a kernel (*stack, *in, *out)")
    stack = shape[:stacked]
    a2 = jnp.reshape(a, stack + (math.prod(shape[stacked:stacked + inputs]), rank))
    b2 = jnp.reshape(b, stack + (rank, -1))
    return jnp.reshape(scale * jnp.matmul(a2, b2.astype(a.dtype)), shape)


def merge(params, lora, policy: Policy, *, quantize: bool = False):
    """Fold LoRA adapters into their kernels: W ← W + (α/r)·A·B, a QArray kernel dequantized first
    (Ŵ + (α/r)·A·B); then, with `quantize`, `jquant.quantize_params(merged, policy)`.

    Args:
      params: the parameter tree (float kernels, or QArrays from `quantize_params`), e.g. a Linen
        model's `variables["params"]` (paths relative to it, as `jquant.learned` takes them).
      lora: the adapters keyed like the kernels (`P/lora_a`, `P/lora_b` for the kernel at `P`):
        the Linen `variables["lora"]`, or `jquant.flax.adapters(model)` for NNX.
      policy: the policy whose `Rule.lora` gave the adapters (α/r from it).
      quantize: re-quantize the merged kernels (every leaf the policy's specs match) for serving.

    Returns:
      `params` with the merged float kernels (QArrays where `quantize`); other leaves as they were.

    Raises:
      ValueError: naming the path, a kernel whose rule has a LoRA but no adapters in `lora`, or
        adapters that no LoRA rule's kernel takes, or adapters that do not fit their kernel.
    """
    adapters = {}
    for path, leaf in leaves_with_paths(lora):
        kernel, _, name = path.rpartition("/")
        if name not in (A, B):
            raise ValueError(f"merge: lora leaf {path!r} is not a kernel's {A!r} or {B!r}")
        adapters.setdefault(kernel, {})[name] = leaf
    used = set()

    def fold(match):
        pair = adapters.get(match.path)
        if pair is None or len(pair) != 2:
            raise at_path(match.path, ValueError(f"{policy.rules[match.index]!r} gives it adapters but lora has no "
                                                 f"{A!r} and {B!r} for it"))
        used.add(match.path)
        kernel = match.leaf
        try:
            return (kernel + delta(pair[A], pair[B], kernel.shape, match.rule.lora.scale)).astype(kernel.dtype)
        except ValueError as err:
            raise at_path(match.path, err) from None

    # the adapted QArray kernels in float (Ŵ), so that the walk visits them; other QArrays stay
    dequantized = map_with_paths(lambda path, x: x.dequantize() if is_qarray(x) and path in adapters else x, params)
    merged = walk(dequantized, policy, fold, where="merge", selects=lambda rule: rule.lora is not None,
                  warn_unused=False)
    unused = sorted(set(adapters) - used)
    if unused:
        raise at_path(unused[0], ValueError(f"adapters in lora but no kernel there that a rule with a LoRA "
                                            f"matches in {policy!r}"))
    return quantize_params(merged, policy, warn_unused=False) if quantize else merged
