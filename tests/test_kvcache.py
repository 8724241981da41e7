"""jquant.KVCache (keys and values quantized per token and head) and Flax's decode caches stored
quantized through `jquant.flax.quantize(model, policy, kv_cache=spec)`, against a NumPy float64
attention over the dequantized cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jquant
from jquant import KV_INT8, QuantSpec

import reference
from helpers import normal

FP8 = QuantSpec(8, method="fp8_e4m3", channel_axes=(0, 1, 2))
INT4_ASYM = QuantSpec(4, symmetric=False, channel_axes=(0, 1, 2))


def attention64(query, keys, values, valid):
    """Softmax attention in float64: query (b, s, h, d), keys/values (b, t, g, d) with h a multiple
    of g (query head i reads kv head i // (h / g)), valid bool (b, h, s, t) or broadcastable."""
    q, k, v = (reference.as_f64(a) for a in (query, keys, values))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    logits = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(valid, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhst,bthd->bshd", p / p.sum(-1, keepdims=True), v)


def filled(batch, context, kv_heads, dim, steps, spec=KV_INT8, seed=0):
    """A cache with `steps` random entries written at position 0, and those float entries."""
    k, v = normal(seed, (batch, steps, kv_heads, dim)), normal(seed + 1, (batch, steps, kv_heads, dim))
    return jquant.kv_cache(batch, context, kv_heads, dim, spec).update(k, v, 0), k, v


@pytest.mark.parametrize("batch,heads,kv_heads", [(1, 4, 4), (8, 8, 2)])  # multi-head, grouped-query
def test_attend_equals_float64_attention_over_the_dequantized_cache(batch, heads, kv_heads):
    context, dim, steps = 24, 64, 19
    cache, _, _ = filled(batch, context, kv_heads, dim, steps)
    query = normal(5, (batch, 3, heads, dim))
    positions = np.arange(context)
    keys, values = cache.key.dequantize(), cache.value.dequantize()
    lengths = np.arange(batch) % steps + 1  # a different length per sequence
    cases = [  # (attend's arguments, valid positions (b | 1, 1, s | 1, t))
        ({"length": steps}, positions < steps),
        ({"length": jnp.asarray(lengths)}, positions < lengths[:, None, None, None]),
        ({"length": jnp.asarray(np.broadcast_to(steps - 2 + np.arange(3), (batch, 3)))},  # causal over 3 steps
         positions < (steps - 2 + np.arange(3))[None, None, :, None]),
        ({"mask": positions % 3 == 0}, positions % 3 == 0),
        ({"length": steps, "mask": positions % 2 == 0}, (positions < steps) & (positions % 2 == 0)),
    ]
    outs = jax.jit(lambda c, q, kws: [c.attend(q, **kw) for kw in kws])(cache, query, [kw for kw, _ in cases])
    for out, (kwargs, valid) in zip(outs, cases):
        assert out.shape == query.shape and out.dtype == query.dtype
        np.testing.assert_allclose(out, attention64(query, keys, values, valid), atol=2e-5, err_msg=str(kwargs))


@pytest.mark.parametrize("spec,tolerance", [(KV_INT8, 0.01), (FP8, 0.05), (INT4_ASYM, 0.15)])
def test_quantized_attention_is_within_quantization_error_of_float(spec, tolerance):
    cache, k, v = filled(2, 32, 4, 64, 32, spec)
    query = normal(7, (2, 1, 4, 64), scale=0.3)
    out = cache.attend(query)
    np.testing.assert_allclose(out, attention64(query, cache.key.dequantize(), cache.value.dequantize(), True),
                               atol=2e-5)
    exact = attention64(query, k, v, True)
    error = np.linalg.norm(np.asarray(out, np.float64) - exact) / np.linalg.norm(exact)
    assert 0 < error < tolerance


def test_entries_are_quantized_once_where_written():
    cache, k, v = filled(2, 16, 2, 64, 5)
    k2, v2 = normal(3, (2, 3, 2, 64)), normal(4, (2, 3, 2, 64))
    updated = jax.jit(lambda c, a, b, i: c.update(a, b, i))(cache, k2, v2, 5)
    for stored, before, new, old in ((updated.key, cache.key, k2, k), (updated.value, cache.value, v2, v)):
        ref = reference.quantize(new, QuantSpec(8, channel_axes=(0, 1, 2)))
        np.testing.assert_array_equal(stored.q[:, 5:8], ref.q)  # the new steps, each token's own scale
        np.testing.assert_allclose(stored.scale[:, 5:8], ref.scale[..., :1], rtol=1e-6)
        np.testing.assert_array_equal(stored.q[:, :5], before.q[:, :5])  # the old steps untouched
        np.testing.assert_array_equal(stored.q[:, 8:], 0)  # the rest still empty
        np.testing.assert_allclose(stored.dequantize()[:, :5], jquant.quantize(old, KV_INT8).dequantize(), atol=0)


def test_cache_bytes():
    batch, context, kv_heads, dim = 8, 128, 8, 64
    float_bytes = 2 * batch * context * kv_heads * dim * 4
    int8 = jquant.kv_cache(batch, context, kv_heads, dim)
    assert int8.nbytes == 2 * batch * context * kv_heads * (dim + 4)  # int8 entries + a float32 scale each
    assert int8.nbytes / float_bytes == pytest.approx(0.2656, abs=1e-4) and int8.nbytes <= 0.27 * float_bytes
    assert jquant.kv_cache(batch, context, kv_heads, dim, INT4_ASYM).nbytes / float_bytes == pytest.approx((32 + 4 + 1) / 256)
    assert int8.key.value.dtype == jnp.int8 and int8.key.scale.shape == (batch, context, kv_heads, 1)


def test_jitted_decode_loop_and_a_realistic_size():
    """At (1, 2048, 8, 128): a prompt of 2038 steps written at once, then one step per iteration of
    a jitted `lax.scan` (the cache in its carry) equals all steps written at once, and each step's
    attention matches the float64 reference over the positions written so far."""
    batch, context, heads, dim, prompt, steps = 1, 2048, 8, 128, 2038, 10
    k, v = normal(0, (batch, context, heads, dim)), normal(1, (batch, context, heads, dim))
    query = normal(2, (batch, 1, heads, dim))

    @jax.jit
    def decode(cache, k, v, query):
        def step(cache, t):
            entry = lambda x: jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1)
            cache = cache.update(entry(k), entry(v), t)
            return cache, cache.attend(query, length=t + 1)[:, 0]
        cache = cache.update(k[:, :prompt], v[:, :prompt], 0)
        return jax.lax.scan(step, cache, prompt + jnp.arange(steps))

    cache, outs = decode(jquant.kv_cache(batch, context, heads, dim), k, v, query)
    at_once = jquant.kv_cache(batch, context, heads, dim).update(k, v, 0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, cache, at_once)
    keys, values = cache.key.dequantize(), cache.value.dequantize()
    for i in (0, steps - 1):
        valid = np.arange(context) <= prompt + i
        np.testing.assert_allclose(outs[i], attention64(query, keys, values, valid)[:, 0], atol=2e-5)


def test_errors_name_the_parameter():
    cache = jquant.kv_cache(2, 8, 2, 16)
    x = jnp.ones((2, 3, 2, 16))
    with pytest.raises(ValueError, match=r"index=6 .*allowed: 0 ≤ index ≤ 5"):
        cache.update(x, x, 6)  # positions 6..8 of a context of 8
    with pytest.raises(ValueError, match="index=-1"):
        cache.update(x, x, -1)
    with pytest.raises(ValueError, match=r"key must have shape \(batch=2, steps ≥ 1, kv_heads=2, head_dim=16\)"):
        cache.update(jnp.ones((2, 3, 4, 16)), x, 0)
    with pytest.raises(ValueError, match="value must have shape"):
        cache.update(x, jnp.ones((1, 3, 2, 16)), 0)
    with pytest.raises(TypeError, match="key must be a float array"):
        cache.update(jnp.ones((2, 3, 2, 16), jnp.int32), x, 0)
    with pytest.raises(ValueError, match=r"query must have shape .*multiple of kv_heads=2, got \(2, 1, 3, 16\)"):
        cache.attend(jnp.ones((2, 1, 3, 16)))
    with pytest.raises(ValueError, match="length must be"):
        cache.attend(jnp.ones((2, 1, 2, 16)), length=jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match="one scale per token and head"):
        jquant.kv_cache(2, 8, 2, 16, QuantSpec(8, channel_axes=(0, 1)))
    with pytest.raises(ValueError, match="one scale per token and head"):
        jquant.kv_cache(2, 8, 2, 16, QuantSpec(3, method="kmeans", channel_axes=(0, 1, 2)))
    with pytest.raises(TypeError, match="spec must be a jquant.QuantSpec"):
        jquant.kv_cache(2, 8, 2, 16, 8)
    with pytest.raises(ValueError, match="context must be ≥ 1"):
        jquant.kv_cache(2, 0, 2, 16)
    with pytest.raises(TypeError, match="KVCache.key must be a jquant.QArray"):
        jquant.KVCache(jnp.zeros((2, 8, 2, 16)), cache.value)


# --- Flax --------------------------------------------------------------------------------------


class LinenLM(nn.Module):
    """Embedding, one attention block (Flax's MHA, its decode cache), a head."""
    decode: bool = False

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(64, 128)(tokens)
        mask = None if self.decode else nn.make_causal_mask(tokens)
        x = x + nn.MultiHeadDotProductAttention(2, decode=self.decode, name="attn")(x, mask=mask)
        return nn.Dense(64, name="head")(x)


def test_linen_decode_cache_is_quantized_and_decodes_as_the_full_forward():
    batch, context, steps = 8, 16, 12
    tokens = jax.random.randint(jax.random.key(1), (batch, steps), 0, 64)
    params = jax.jit(LinenLM().init)(jax.random.key(0), tokens)["params"]
    policy = jquant.int8_weights()
    served = jquant.quantize_params({"params": params}, policy)

    def teacher_forced(model, variables, cache):
        step = jax.jit(lambda c, t: model.apply({**variables, "cache": c}, t, mutable=["cache"]))
        outs = []
        for t in range(steps):
            logits, updated = step(cache, tokens[:, t:t + 1])
            cache, outs = updated["cache"], outs + [logits]
        return jnp.concatenate(outs, 1), cache

    zeros = jnp.zeros((batch, context), jnp.int32)
    qmodel = jquant.flax.quantize(LinenLM(decode=True), policy, kv_cache=KV_INT8)
    cache = jax.jit(qmodel.init)(jax.random.key(0), zeros)["cache"]
    assert isinstance(cache["attn"]["cached_key"], jquant.QArray) and int(cache["attn"]["cache_index"]) == 0
    float_bytes = 2 * batch * context * 128 * 4  # Flax's float32 cached_key and cached_value
    assert jquant.KVCache(cache["attn"]["cached_key"], cache["attn"]["cached_value"]).nbytes <= 0.27 * float_bytes

    stepped, final = teacher_forced(qmodel, served, cache)
    served_full = jax.jit(jquant.flax.quantize(LinenLM(), policy).apply)(served, tokens)
    assert int(final["attn"]["cache_index"]) == steps
    scale = float(jnp.max(jnp.abs(served_full)))
    gap = float(jnp.max(jnp.abs(stepped - served_full)))
    assert 0 < gap < 0.02 * scale  # int8 keys and values: within their rounding
    # Several steps per call (a prompt at once) write and attend as one step per call does.
    prompt, updated = jax.jit(lambda v, t: qmodel.apply(v, t, mutable=["cache"]))({**served, "cache": cache}, tokens)
    np.testing.assert_allclose(prompt, stepped, atol=1e-5 * scale)
    jax.tree_util.tree_map(np.testing.assert_array_equal, updated["cache"], final)


def test_linen_rejects_what_the_quantized_cache_cannot_honour():
    class Custom(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.MultiHeadDotProductAttention(2, decode=True, name="attn",
                                                   attention_fn=lambda q, k, v, **kw: v)(x)

    with pytest.raises(ValueError, match="attention_fn=.*replaces only the default"):
        jquant.flax.quantize(Custom(), jquant.int8_weights(), kv_cache=KV_INT8).init(
            jax.random.key(0), jnp.ones((1, 8, 32)))
    with pytest.raises(TypeError, match="kv_cache must be a jquant.QuantSpec"):
        jquant.flax.quantize(LinenLM(decode=True), jquant.int8_weights(), kv_cache="int8")


class NnxLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(64, 128, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, 128, decode=False, rngs=rngs)
        self.head = nnx.Linear(128, 64, rngs=rngs)

    def __call__(self, tokens, mask=None):
        x = self.embed(tokens)
        return self.head(x + self.attn(x, mask=mask))


def test_nnx_decode_cache_is_quantized_and_decodes_as_the_full_forward():
    batch, context, steps = 1, 16, 12
    tokens = jax.random.randint(jax.random.key(1), (batch, steps), 0, 64)
    model = jquant.flax.quantize(NnxLM(nnx.Rngs(0)), jquant.int8_weights(), kv_cache=KV_INT8)
    call = nnx.jit(lambda m, t, mask=None: m(t, mask))
    full = call(model, tokens, nnx.make_causal_mask(tokens))  # no cache allocated: full-sequence attention
    jquant.flax.init_cache(model, batch, context)
    assert isinstance(model.attn.attention_fn.cached_key.get_value(), jquant.QArray)
    float_bytes = 2 * batch * context * 128 * 4
    assert model.attn.attention_fn.cached_key.get_value().nbytes * 2 <= 0.27 * float_bytes
    stepped = jnp.concatenate([call(model, tokens[:, t:t + 1]) for t in range(steps)], 1)
    scale = float(jnp.max(jnp.abs(full)))
    assert 0 < float(jnp.max(jnp.abs(stepped - full))) < 0.02 * scale
    assert int(model.attn.attention_fn.cache_index.get_value()) == steps
    jquant.flax.init_cache(model, batch, context)  # empty again: the prompt at once gives the same logits
    np.testing.assert_allclose(call(model, tokens), stepped, atol=1e-5 * scale)
    with pytest.raises(ValueError, match="no nnx.MultiHeadAttention with a quantized cache"):
        jquant.flax.init_cache(NnxLM(nnx.Rngs(0)), batch, context)
