"""Dtype promotion for Flax layers that lets QArray kernels through untouched.

Flax's `promote_dtype` casts every operand with `jnp.asarray`, which a QArray (a pytree, not an
array) does not allow. These replacements promote the float operands exactly as Flax does and
pass QArrays on to the quantized op, which knows what to do with them.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype

from jquant.qarray import QArray


def _promote(args, dtype, inexact):
    stand_ins = [jnp.zeros((), a.dtype) if isinstance(a, QArray) else a for a in args]
    dtype = canonicalize_dtype(*stand_ins, dtype=dtype, inexact=inexact)
    return [a if a is None or isinstance(a, QArray) else jnp.asarray(a, dtype) for a in args]


def promote_dtype_linen(*args, dtype=None, inexact=True):
    """`flax.linen.dtypes.promote_dtype` that leaves QArrays as they are."""
    return _promote(args, dtype, inexact)


def promote_dtype_nnx(args, /, *, dtype=None, inexact=True):
    """`flax.nnx` `promote_dtype` (takes a tuple) that leaves QArrays as they are."""
    return type(args)(_promote(args, dtype, inexact))
