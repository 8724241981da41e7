"""Dtype promotion for NNX layers that lets QArray kernels through untouched.

Flax's `promote_dtype` casts every operand with `jnp.asarray`, which a QArray (a pytree, not an
array) does not allow. This replacement promotes the float operands exactly as Flax does and
passes QArrays on to the quantized op, which knows what to do with them.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype

from jquant._src.qarray import QArray


def promote_dtype_nnx(args, /, *, dtype=None, inexact=True):
    """`flax.nnx` `promote_dtype` (takes a tuple) that leaves QArrays as they are."""
    stand_ins = [jnp.zeros((), a.dtype) if isinstance(a, QArray) else a for a in args]
    dtype = canonicalize_dtype(*stand_ins, dtype=dtype, inexact=inexact)
    return type(args)(a if a is None or isinstance(a, QArray) else jnp.asarray(a, dtype) for a in args)
