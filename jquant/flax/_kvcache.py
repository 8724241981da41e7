"""Flax's decode caches stored quantized: `jquant.flax.quantize(model, policy, kv_cache=spec)`.

Linen (`nn.MultiHeadDotProductAttention(decode=True)`). Flax writes its cache in
`MultiHeadDotProductAttention.__call__` (flax/linen/attention.py, the `if self.decode:` branch):
`self.variable('cache', 'cached_key', jnp.zeros, key.shape, key.dtype)` allocates a float array
and `lax.dynamic_update_slice(cached_key.value, key, indices)` writes each step into it, then
`attention_fn` receives the whole float cache. No hook sits between the key/value projections
and that write, so the float cache cannot be kept quantized from inside the layer. What Flax does
allow: `nn.intercept_methods` sees the layer's call, and its `attention_fn` is a field. So the
wrapper runs the layer as Flax wrote it with `decode=False` (projections — intercepted by the
policy like any DenseGeneral —, q/k normalisation, output projection, all its options), in its
own scope (same variables, same paths), with an `attention_fn` that keeps the cache: the
`"cache"` collection holds the same three entries as Flax's, `cached_key` and `cached_value` as
QArrays (`jquant.KVCache`'s), `cache_index` as Flax's int32. Each call writes its steps at
`cache_index` (quantized once) and attends causally over the cache — one step per call, as Flax
decodes, or several (a prompt at once). `init` allocates the quantized cache from its input's
shape (batch, context), as Flax's does, and returns the float attention over that input.

NNX (`nnx.MultiHeadAttention` with `init_cache`). Flax's `__call__` writes `self.cached_key[...] =
lax.dynamic_update_slice(self.cached_key[...], key, indices)` (flax/nnx/nn/attention.py, the
`if decode:` branch) and `init_cache`/`set_view` allocate float `nnx.Cache`s. The wrapper does
the same as for Linen on the module in place: `decode` is turned off in the layer and kept by
its `attention_fn` (`CachedAttention`), which holds the quantized cache as `nnx.Cache`
variables; `init_cache(model, batch, context)` (this module) allocates them — Flax's own
`init_cache` would allocate a float cache again, and is not to be called on a wrapped layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from jquant._src.kvcache import KVCache, check_spec, kv_cache
from jquant._src.spec import QuantSpec
from jquant.flax._linen import QuantizedLinen

CACHE = "cache"
"""Flax's decode-cache collection (Linen) — the quantized cache keeps its entries' names."""


@dataclasses.dataclass(frozen=True)
class QuantizedCacheLinen(QuantizedLinen):
    """`QuantizedLinen` whose `MultiHeadDotProductAttention(decode=True)` layers keep a quantized
    KV cache (module docstring); `kv_cache` is the cache's spec (`jquant.KV_INT8`)."""

    kv_cache: QuantSpec = None

    def _intercepting(self):
        stack = contextlib.ExitStack()
        stack.enter_context(super()._intercepting())
        stack.enter_context(nn.intercept_methods(functools.partial(_intercept, self.kv_cache)))
        return stack


def with_kv_cache(model, spec: QuantSpec):
    """A wrapped Linen model (`QuantizedLinen`) → `QuantizedCacheLinen`; an NNX model (already
    through `quantize_nnx`) → its `nnx.MultiHeadAttention` layers switched to a quantized cache."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"jquant.flax.quantize: kv_cache must be a jquant.QuantSpec (e.g. jquant.KV_INT8), "
                        f"got {type(spec).__name__} {spec!r}")
    if isinstance(model, QuantizedLinen):
        return QuantizedCacheLinen(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)}, kv_cache=spec)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.MultiHeadAttention):
            _check_standard(node.attention_fn, nnx.dot_product_attention, "nnx.MultiHeadAttention")
            node.attention_fn = nnx.data(CachedAttention(spec))  # a module holding state, not a static attribute
            node.decode = False
    return model


def init_cache(model, batch: int, context: int, dtype=jnp.float32):
    """Allocate the quantized cache (empty, position 0) of every `nnx.MultiHeadAttention` of `model`
    passed through `jquant.flax.quantize(..., kv_cache=spec)`: `(batch, context, kv_heads, head_dim)`
    keys and values. What Flax's `layer.init_cache((batch, context, features))` is for a float
    cache; calling it again restarts decoding. Returns `model` (changed in place).

    Raises:
      ValueError: the model has no layer with a quantized cache.
    """
    layers = [node for _, node in nnx.iter_graph(model)
              if isinstance(node, nnx.MultiHeadAttention) and isinstance(node.attention_fn, CachedAttention)]
    if not layers:
        raise ValueError("jquant.flax.init_cache: the model has no nnx.MultiHeadAttention with a quantized cache; "
                         "wrap it first: jquant.flax.quantize(model, policy, kv_cache=jquant.KV_INT8)")
    for node in layers:
        node.attention_fn.allocate(kv_cache(batch, context, node.num_kv_heads, node.head_dim, node.attention_fn.spec,
                                            dtype))
    return model


def _check_standard(attention_fn, standard, where: str) -> None:
    if attention_fn is not standard:
        raise ValueError(f"jquant.flax.quantize(kv_cache=...): {where} has attention_fn={attention_fn!r}; the "
                         "quantized cache computes softmax dot-product attention itself (jquant.KVCache.attend), "
                         f"so it replaces only the default ({standard.__module__}.{standard.__name__})")


def _intercept(spec, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.MultiHeadDotProductAttention) \
            or not module.decode:
        return next_fun(*args, **kwargs)
    _check_standard(module.attention_fn, nn.dot_product_attention, "/".join(module.path))
    # Flax's own layer, bound to this layer's scope (same variables and paths), without its float cache.
    layer = module.clone(parent=module.scope, decode=False,
                         attention_fn=functools.partial(_linen_attention, module, spec))
    return layer(*args, **kwargs)


def _linen_attention(module, spec, query, key, value, mask=None, dropout_rate=0.0, deterministic=True):
    """The layer's `attention_fn`: write key/value (the new steps) into its quantized cache and
    attend over it; in `init`, allocate the cache from the input's shape."""
    _no_dropout(dropout_rate, deterministic)
    if not module.has_variable(CACHE, "cached_key"):
        if key.ndim != 4:
            raise ValueError(f"{'/'.join(module.path)}: a quantized KV cache takes inputs (batch, length, features); "
                             f"the keys have shape {key.shape}")
        empty = kv_cache(*key.shape, spec=check_spec(spec, key.shape, "jquant.flax.quantize(kv_cache=...)"),
                         dtype=key.dtype)
        module.variable(CACHE, "cached_key", lambda: empty.key)
        module.variable(CACHE, "cached_value", lambda: empty.value)
        module.variable(CACHE, "cache_index", lambda: jnp.array(0, jnp.int32))
        return nn.dot_product_attention(query, key, value, mask=mask)
    cache = KVCache(module.get_variable(CACHE, "cached_key"), module.get_variable(CACHE, "cached_value"))
    index = module.get_variable(CACHE, "cache_index")
    cache, out = _step(cache, index, query, key, value, mask)
    module.put_variable(CACHE, "cached_key", cache.key)
    module.put_variable(CACHE, "cached_value", cache.value)
    module.put_variable(CACHE, "cache_index", index + key.shape[1])
    return out


def _step(cache: KVCache, index, query, key, value, mask):
    """Write the steps at `index`, then attend causally: query step i sees positions ≤ index + i."""
    cache = cache.update(key, value, index)
    batch, steps = query.shape[:2]
    length = jnp.broadcast_to(index + 1 + jnp.arange(steps, dtype=jnp.int32), (batch, steps))
    return cache, cache.attend(query, length=length, mask=mask)


def _no_dropout(rate, deterministic) -> None:
    if rate > 0.0 and not deterministic:
        raise ValueError(f"a quantized KV cache decodes deterministically; got dropout_rate={rate} with "
                         "deterministic=False (pass deterministic=True when decoding)")


class CachedAttention(nnx.Module):
    """An `nnx.MultiHeadAttention`'s `attention_fn` holding its quantized KV cache (`nnx.Cache`
    variables `cached_key`, `cached_value` — QArrays — and `cache_index`), allocated by
    `init_cache`. With no cache allocated it is the float `dot_product_attention` (training,
    full-sequence calls); with one, every call writes its steps and attends over the cache."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.cached_key = nnx.data(None)
        self.cached_value = nnx.data(None)
        self.cache_index = nnx.data(None)

    def allocate(self, cache: KVCache) -> None:
        self.cached_key = nnx.Cache(cache.key)
        self.cached_value = nnx.Cache(cache.value)
        self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

    def __call__(self, query, key, value, mask=None, dropout_rate=0.0, deterministic=True, **kwargs):
        if self.cached_key is None:
            return nnx.dot_product_attention(query, key, value, mask=mask, dropout_rate=dropout_rate,
                                             deterministic=deterministic, **kwargs)
        _no_dropout(dropout_rate, deterministic)
        index = self.cache_index.get_value()
        cache, out = _step(KVCache(self.cached_key.get_value(), self.cached_value.get_value()), index,
                           query, key, value, mask)
        self.cached_key.set_value(cache.key)
        self.cached_value.set_value(cache.value)
        self.cache_index.set_value(index + key.shape[1])
        return out
