"""Dtype promotion for quantized Flax layers (Linen and NNX): the input and bias as Flax casts
them, the kernel as it is stored.

Flax's `promote_dtype` casts (inputs, kernel, bias) to the layer's compute dtype before its op
runs. A quantized layer's op must quantize the kernel as stored instead — a bfloat16 layer's
float32 kernel in float32, as `jquant.quantize_params` does for serving — so these replacements
cast the input and the bias only and hand the kernel (float, or a QArray, which `jnp.asarray`
would not take) to the op untouched; the op (`cast_weight=True`) casts its quantized weight to
the input's dtype, which is the compute dtype Flax chose. So QAT quantizes the kernel that
serving quantizes, at any compute dtype.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype

from jquant._src.qarray import QArray

KERNEL = 1
"""The kernel's position in the (inputs, kernel, bias) that Dense, DenseGeneral, Conv and Einsum promote."""


def _promoted(args, dtype, inexact):
    """`args` with every operand but the kernel cast to the dtype Flax would choose for them all."""
    stand_ins = [jnp.zeros((), a.dtype) if isinstance(a, QArray) else a for a in args]
    dtype = canonicalize_dtype(*stand_ins, dtype=dtype, inexact=inexact)
    return [a if i == KERNEL or a is None else jnp.asarray(a, dtype) for i, a in enumerate(args)]


def promote_dtype_linen(*args, dtype=None, inexact=True):
    """`flax.linen` `promote_dtype` (operands as arguments) for a quantized layer (module docstring)."""
    return _promoted(args, dtype, inexact)


def promote_dtype_nnx(args, /, *, dtype=None, inexact=True):
    """`flax.nnx` `promote_dtype` (operands as one tuple) for a quantized layer (module docstring)."""
    return type(args)(_promoted(args, dtype, inexact))
