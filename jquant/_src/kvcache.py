"""A quantized KV cache: keys and values stored quantized per token and head, read by the attention dots.

Layout: `(batch, context, kv_heads, head_dim)` for keys and values (Flax's decode caches use the
same), queries `(batch, steps, heads, head_dim)` with `heads` a multiple of `kv_heads` (grouped-
query attention: query head h reads kv head h // (heads / kv_heads); multi-head: equal).

Storage. Each written entry is quantized once, when `update` writes it, by the cache's spec —
one scale per token and kv head over head_dim (`QuantSpec(8, channel_axes=(0, 1, 2))`, int8, by
default; any spec whose scale is per (batch, time, head): uniform int8 or fewer bits (packed
along head_dim), asymmetric, NF4, FP8 `method="fp8_e4m3"`/`"fp8_e5m2"`). int8 costs
(head_dim + 4) / (4 · head_dim) of float32: 0.266× at head_dim 64.

Attention on the stored integers. With k̂[b,t,g,:] = s_k[b,t,g] · u_k[b,t,g,:] and
v̂ = s_v · u_v, where u = q − z (uniform; the FP8 element for FP8) is the entry without its
scale, a scale constant along head_dim leaves both dots:

    logits[b,h,i,t] = c · s_k[b,t,g] · Σ_d query[b,i,h,d] · u_k[b,t,g,d]      (c = 1/√head_dim)
    out[b,i,h,:]    = Σ_t (p[b,h,i,t] · s_v[b,t,g]) · u_v[b,t,g,:],  p = softmax_t(logits | mask)

so the dots read the stored integers (converted to float32 as the dot's operand, the scales
applied to the (heads × time) logits and probabilities, never to the cache) — the math of
`QArray.dequantize` followed by float attention, to float32 rounding, with no dequantized cache
held. Measured on XLA:CPU (2 shared cores, one decode step over 128 cached steps, 8 heads of 64,
alternating rounds): 0.82× (batch 1) and 0.93× (batch 8) the float cache's attention time. The
alternatives measured: the integer path (queries and the scaled probabilities rounded to int8,
int8 × int8 → int32 dots) 0.58× / 0.70×, but its probability rounding puts a 1.6% error (of the
largest output) on top of the cache's — not taken, as exactness to the dequantized cache is
what the tests hold it to; a multiply-and-reduce with no dot 7–27× at batch 1. Compiled
temporaries are the same for all three and for the float cache: XLA:CPU's dot lays its cache
operand out batch-major (4 bytes an element, one layer's keys or values), whatever their dtype;
the persistent cache stays quantized (≤ 4-bit entries are unpacked to int8 for the dots).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from jquant._src import numerics
from jquant._src.qarray import QArray, quantize
from jquant._src.spec import QuantSpec

KV_INT8 = QuantSpec(8, channel_axes=(0, 1, 2))
"""The default cache spec: int8, one scale per token and kv head (over head_dim)."""


@jax.tree_util.register_pytree_with_keys_class
class KVCache:
    """Keys and values of an attention layer, quantized per token and head: a pytree of two QArrays.

    Make an empty one with `kv_cache(...)`; `update` writes steps at a position (quantized once),
    `attend` computes attention of queries over the cache (see the module docstring for the math).
    Both return new values (the cache is immutable), so they run under `jit`, in a `lax.scan`
    carry, and `vmap`/sharding see the QArrays' arrays.

    Attributes:
      key, value: QArrays of shape `(batch, context, kv_heads, head_dim)` with the same spec.
    """

    def __init__(self, key: QArray, value: QArray):
        for name, x in (("key", key), ("value", value)):
            if not isinstance(x, QArray):
                raise TypeError(f"KVCache.{name} must be a jquant.QArray (see jquant.kv_cache), got {type(x).__name__}")
        if (key.shape, key.spec) != (value.shape, value.spec) or key.ndim != 4:
            raise ValueError(f"KVCache: key and value must have the same shape (batch, context, kv_heads, head_dim) "
                             f"and spec, got {key!r} and {value!r}")
        self.key = key
        self.value = value

    def tree_flatten_with_keys(self):
        keys = jax.tree_util.GetAttrKey
        return ((keys("key"), self.key), (keys("value"), self.value)), None

    @classmethod
    def tree_unflatten(cls, _, children):
        cache = object.__new__(cls)  # no checks: jax also rebuilds trees of placeholders
        cache.key, cache.value = children
        return cache

    @property
    def shape(self):
        """`(batch, context, kv_heads, head_dim)`."""
        return self.key.shape

    @property
    def spec(self) -> QuantSpec:
        return self.key.spec

    @property
    def nbytes(self) -> int:
        """Stored bytes of keys and values: integers, scales and zero-points."""
        return self.key.nbytes + self.value.nbytes

    def update(self, key, value, index) -> "KVCache":
        """The cache with `key` and `value` quantized and written at time steps index … index+steps−1.

        Args:
          key, value: float arrays `(batch, steps, kv_heads, head_dim)`, steps ≥ 1.
          index: int (or int32 scalar array under `jit`) ≥ 0 with index + steps ≤ context. A
            traced index cannot be checked: `lax.dynamic_update_slice` clamps it so that the
            steps land within the cache (the last positions are overwritten).

        Raises:
          TypeError: `key`/`value` not float arrays. ValueError: their shape does not fit the
            cache, or a concrete `index` writes outside [0, context).
        """
        batch, context, heads, dim = self.shape
        entries = []
        for name, x in (("key", key), ("value", value)):
            x = jnp.asarray(x)
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"KVCache.update: {name} must be a float array, got dtype {x.dtype}")
            if x.ndim != 4 or x.shape[0] != batch or x.shape[2:] != (heads, dim) or x.shape[1] < 1:
                raise ValueError(f"KVCache.update: {name} must have shape (batch={batch}, steps ≥ 1, kv_heads={heads}, "
                                 f"head_dim={dim}) for this cache, got {x.shape}")
            entries.append(x)
        if entries[0].shape != entries[1].shape:
            raise ValueError(f"KVCache.update: key and value must have the same shape, got {entries[0].shape} and "
                             f"{entries[1].shape}")
        steps = entries[0].shape[1]
        if not isinstance(index, jax.core.Tracer):
            i = int(index)
            if i < 0 or i + steps > context:
                raise ValueError(f"KVCache.update: index={i} with {steps} step(s) writes positions {i}…{i + steps - 1}, "
                                 f"outside the cache's context [0, {context}); allowed: 0 ≤ index ≤ {context - steps}")
        index = jnp.asarray(index, jnp.int32)
        return KVCache(*(_write(stored, x, index) for stored, x in zip((self.key, self.value), entries)))

    def attend(self, query, *, length=None, mask=None, scale: Optional[float] = None):
        """Softmax attention of `query` over the cached keys and values (module docstring).

        Args:
          query: float `(batch, steps, heads, head_dim)`, heads a multiple of the cache's kv_heads.
          length: attend to positions t < length: an int or an int array of shape (), (batch,) or
            (batch, steps) (per query step: causal decoding of several steps written at index is
            `length = index + 1 + arange(steps)`).
          mask: bool, broadcastable to (batch, heads, steps, context), True where attended (Flax's
            convention); combined with `length` when both are given. Neither: every position.
          scale: the logits' factor c; default 1/√head_dim.

        Returns:
          `(batch, steps, heads, head_dim)` in the query's dtype (computed in float32).

        Raises:
          TypeError: `query` not a float array. ValueError: its shape does not fit the cache, or
            `length` has another shape.
        """
        batch, context, kv_heads, dim = self.shape
        query = jnp.asarray(query)
        if not jnp.issubdtype(query.dtype, jnp.floating):
            raise TypeError(f"KVCache.attend: query must be a float array, got dtype {query.dtype}")
        if query.ndim != 4 or query.shape[0] != batch or query.shape[3] != dim or query.shape[2] % kv_heads:
            raise ValueError(f"KVCache.attend: query must have shape (batch={batch}, steps, heads, head_dim={dim}) "
                             f"with heads a multiple of kv_heads={kv_heads}, got {query.shape}")
        steps, heads = query.shape[1:3]
        groups = heads // kv_heads
        c = 1.0 / math.sqrt(dim) if scale is None else scale
        q = query.astype(jnp.float32).reshape(batch, steps, kv_heads, groups, dim)
        s_k, s_v = (_token_scales(x) for x in (self.key, self.value))  # (batch, kv_heads, 1, 1, context)
        logits = jnp.einsum("bskgd,btkd->bkgst", q, _unscaled(self.key)) * (c * s_k)
        valid = _valid(length, mask, batch, heads, steps, context)
        if valid is not None:
            valid = jnp.broadcast_to(valid, (batch, heads, steps, context)).reshape(logits.shape)
            logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(logits, axis=-1) * s_v
        out = jnp.einsum("bkgst,btkd->bskgd", p, _unscaled(self.value))
        return out.reshape(batch, steps, heads, dim).astype(query.dtype)

    def __repr__(self) -> str:
        return f"KVCache({self.spec!r}, shape={self.shape}, dtype={self.key.dtype.name}, nbytes={self.nbytes})"


def kv_cache(batch: int, context: int, kv_heads: int, head_dim: int, spec: QuantSpec = KV_INT8,
             dtype=jnp.float32) -> KVCache:
    """An empty (all-zero) `KVCache` of shape `(batch, context, kv_heads, head_dim)`.

    Args:
      batch, context, kv_heads, head_dim: ints ≥ 1.
      spec: how entries are stored; its scale must be one per token and kv head: channel axes
        (0, 1, 2), no groups, a format with one scale per group (uniform of any bits, sign,
        NF4, FP8 — not k-means, whose "scale" is a codebook, nor MX/NVFP4's blocks). Default `KV_INT8`, int8.
      dtype: the float dtype the cache stands for (what dequantizing it returns).

    Raises:
      TypeError: a size that is not an int, a spec that is not a QuantSpec. ValueError: a size
        < 1, or a spec whose scale is not one per token and head (the message says which).
    """
    sizes = {"batch": batch, "context": context, "kv_heads": kv_heads, "head_dim": head_dim}
    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"kv_cache: {name} must be an int, got {type(n).__name__} {n!r}")
        if n < 1:
            raise ValueError(f"kv_cache: {name} must be ≥ 1, got {n}")
    shape = (batch, context, kv_heads, head_dim)
    check_spec(spec, shape, "kv_cache")
    empty = quantize(jnp.zeros(shape, dtype), spec)
    return KVCache(empty, empty)


def check_spec(spec, shape, where: str) -> QuantSpec:
    """`spec` if it stores `(batch, time, heads, head_dim)` entries with one scale per token and head.

    Raises:
      TypeError: not a QuantSpec. ValueError: another granularity or a codebook format.
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{where}: spec must be a jquant.QuantSpec, got {type(spec).__name__} {spec!r}")
    lay = numerics.layout(tuple(shape), spec)
    scale = jax.eval_shape(lambda: quantize(jnp.zeros(shape, jnp.float32), spec).scale)
    if lay.scale_shape != tuple(shape[:-1]) + (1,) or scale.shape != lay.scale_shape:
        raise ValueError(f"{where}: spec {spec!r} must give one scale per token and head for a cache of shape "
                         f"{tuple(shape)}: channel_axes=(0, 1, 2), no group_size, a format with one scale per "
                         f"group (uniform, sign, nf4, fp8_e4m3, fp8_e5m2), e.g. {KV_INT8!r}")
    return spec


def _write(stored: QArray, x, index) -> QArray:
    """`stored` with `x` quantized by its spec and written at time `index` (axis 1)."""
    new = quantize(x.astype(stored.dtype), stored.spec)

    def put(old, part):
        return None if old is None else lax.dynamic_update_slice(old, part.astype(old.dtype), (0, index, 0, 0))

    return QArray(put(stored.value, new.value), put(stored.scale, new.scale), put(stored.zero_point, new.zero_point),
                  spec=stored.spec, shape=stored.shape, dtype=stored.dtype)


def _unscaled(x: QArray):
    """The stored entries without their scale (x̂ = s·u): u = q − z for a uniform grid, the
    element for FP8, as float32 — decoded with a unit scale, which XLA folds away."""
    lay = numerics.layout(x.shape, x.spec)
    return x.spec.method.decode(x.q, jnp.ones(lay.scale_shape, jnp.float32), x.zero_point, x.spec, lay)


def _token_scales(x: QArray):
    """The per-(batch, time, head) scales laid out as the logits' (batch, kv_heads, 1, 1, time)."""
    return jnp.transpose(x.scale[..., 0].astype(jnp.float32), (0, 2, 1))[:, :, None, None, :]


def _valid(length, mask, batch: int, heads: int, steps: int, context: int):
    """The attended positions as a bool array broadcastable to (batch, heads, steps, context), or None."""
    valid = None
    if length is not None:
        n = jnp.asarray(length)
        if not jnp.issubdtype(n.dtype, jnp.integer) or n.shape not in ((), (batch,), (batch, steps)):
            raise ValueError(f"KVCache.attend: length must be an int or an int array of shape (), ({batch},) or "
                             f"({batch}, {steps}), got {n.dtype} {n.shape}")
        n = n.reshape(n.shape + (1,) * (2 - n.ndim)) if n.ndim else n.reshape(1, 1)
        valid = (jnp.arange(context) < n[..., None])[:, None]  # (batch | 1, 1, steps | 1, context)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        valid = mask if valid is None else valid & mask
    return valid
