"""Dtype promotion for NNX layers that lets QArray kernels through untouched.

Flax's `promote_dtype` casts every operand with `jnp.asarray`, which a QArray (a pytree, not an
array) does not allow. This replacement promotes the float operands exactly as Flax does and
passes QArrays on to the quantized op (dequantizing to the promoted dtype, so a layer with a
bf16 compute dtype serves bf16 as its float version does).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype

from jquant._src.qarray import QArray


def promote_dtype_nnx(args, /, *, dtype=None, inexact=True):
    """`flax.nnx` `promote_dtype` (takes a tuple) that keeps QArrays quantized: a QArray takes the
    promoted dtype as the dtype it dequantizes to (`QArray.astype`), as a float kernel would be cast."""
    stand_ins = [jnp.zeros((), a.dtype) if isinstance(a, QArray) else a for a in args]
    dtype = canonicalize_dtype(*stand_ins, dtype=dtype, inexact=inexact)
    return type(args)(None if a is None else a.astype(dtype) if isinstance(a, QArray) else jnp.asarray(a, dtype)
                      for a in args)
