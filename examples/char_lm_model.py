"""A byte-level decoder-only transformer as plain JAX functions.

`forward(params, tokens) -> logits` takes a nested dict of arrays and nothing else: every linear
layer is `x @ params[...]["kernel"]` with a 2-D kernel (in, out), so `jquant.quantize_params`,
`jquant.ptq.gptq` and `jquant.ptq.awq` see ordinary Dense kernels. Pre-norm blocks (LayerNorm →
causal multi-head attention → residual, LayerNorm → GELU MLP → residual), learned positions, a
final LayerNorm and an untied head over the 256 byte values. No biases in the linears; layers
are unrolled in Python (no `scan`), so every kernel meets its input in its own `dot_general`.
The text it learns, and how it is trained and cached, are in `_common.py` (shared by the
char_lm examples).

`Decoder` is the same model as a Flax Linen module, for serving with a KV cache: Flax's own
`nn.MultiHeadDotProductAttention` (3-D `DenseGeneral` kernels, `decode=True` keeps the cache)
and `nn.Dense` MLP; `linen_params` maps `init`'s tree onto it. The model itself stays
unmodified: `jquant.flax.quantize(Decoder(config, decode=True), policy, kv_cache=jquant.KV_INT8)`
keeps that cache int8 per token and head (its `"cache"` collection holds QArrays), and `init`
with a `(batch, context)` input allocates it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

VOCAB = 256
HEAD_DIM = 64


@dataclasses.dataclass(frozen=True)
class Config:
    """Model size; attention heads have HEAD_DIM = 64 features. `width` and `4 * width` are the
    kernels' in-dimensions (multiples of 128 let group-128 quantization apply to every kernel)."""
    width: int = 128
    depth: int = 4
    context: int = 128


def init(config: Config, key) -> Dict:
    """Parameters: normal(0, 0.02) kernels and embeddings, residual outputs scaled by 1/√(2·depth)."""
    d = config.width
    keys = iter(jax.random.split(key, 3 + 6 * config.depth))
    normal = lambda shape, std=0.02: std * jax.random.normal(next(keys), shape, jnp.float32)
    norm = lambda: {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}
    residual_std = 0.02 / math.sqrt(2 * config.depth)
    params = {"embed": {"embedding": normal((VOCAB, d))}, "pos": {"embedding": normal((config.context, d))}}
    for i in range(config.depth):
        params[f"block_{i}"] = {
            "ln1": norm(),
            "attn": {"query": {"kernel": normal((d, d))}, "key": {"kernel": normal((d, d))},
                     "value": {"kernel": normal((d, d))}, "out": {"kernel": normal((d, d), residual_std)}},
            "ln2": norm(),
            "mlp": {"up": {"kernel": normal((d, 4 * d))}, "down": {"kernel": normal((4 * d, d), residual_std)}},
        }
    params["ln_f"] = norm()
    params["head"] = {"kernel": normal((d, VOCAB))}
    return params


def layer_norm(x, p, eps: float = 1e-5):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def attention(x, p, heads: int):
    """Causal multi-head self-attention; the 2-D kernels are applied before the head split."""
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, heads, d // heads)
    q, k, v = (split(x @ p[name]["kernel"]) for name in ("query", "key", "value"))
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(d // heads)
    mask = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
    return jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, t, d) @ p["out"]["kernel"]


def forward(params, tokens):
    """Logits (batch, time, 256) float32 for int tokens (batch, time ≤ context)."""
    depth = sum(1 for name in params if name.startswith("block_"))
    heads = max(1, params["embed"]["embedding"].shape[1] // HEAD_DIM)
    x = params["embed"]["embedding"][tokens] + params["pos"]["embedding"][: tokens.shape[1]]
    for i in range(depth):
        p = params[f"block_{i}"]
        x = x + attention(layer_norm(x, p["ln1"]), p["attn"], heads)
        x = x + jax.nn.gelu(layer_norm(x, p["ln2"]) @ p["mlp"]["up"]["kernel"]) @ p["mlp"]["down"]["kernel"]
    return layer_norm(x, params["ln_f"]) @ params["head"]["kernel"]



class _Block(nn.Module):
    config: Config
    decode: bool

    @nn.compact
    def __call__(self, x, mask):
        d = self.config.width
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)
        x = x + nn.MultiHeadDotProductAttention(max(1, d // HEAD_DIM), qkv_features=d, out_features=d, use_bias=False,
                                                decode=self.decode, name="attn")(norm("ln1")(x), mask=mask)
        mlp = _Mlp(d, name="mlp")
        return x + mlp(norm("ln2")(x))


class _Mlp(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.width, use_bias=False, name="down")(
            jax.nn.gelu(nn.Dense(4 * self.width, use_bias=False, name="up")(x)))


class Decoder(nn.Module):
    """`forward` as a Linen module. `decode=False`: `(tokens (batch, time), positions (batch,
    time)) -> logits`, causal over the given time steps. `decode=True`: one token per call
    (time = 1) attending to the KV cache (the `"cache"` collection, sized by `init` with a
    `(batch, context)` input, updated with `mutable=["cache"]`); `positions` is the token's index.
    With a quantized cache (`jquant.flax.quantize(..., kv_cache=spec)`) a call may also take
    several tokens at once (a prompt), each attending causally to the cache."""
    config: Config
    decode: bool = False

    @nn.compact
    def __call__(self, tokens, positions):
        d = self.config.width
        x = nn.Embed(VOCAB, d, name="embed")(tokens) + nn.Embed(self.config.context, d, name="pos")(positions)
        mask = None if self.decode else nn.make_causal_mask(tokens)
        for i in range(self.config.depth):
            x = _Block(self.config, self.decode, name=f"block_{i}")(x, mask)
        x = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="ln_f")(x)
        return nn.Dense(VOCAB, use_bias=False, name="head")(x)


def linen_params(params: Dict) -> Dict:
    """`init`'s tree as `Decoder`'s params: the attention kernels reshaped to Flax's 3-D layouts,
    query/key/value `(width, heads, HEAD_DIM)` and out `(heads, HEAD_DIM, width)`; the rest as is."""
    heads = max(1, params["embed"]["embedding"].shape[1] // HEAD_DIM)

    def block(p):
        d = p["attn"]["query"]["kernel"].shape[0]
        attn = {name: {"kernel": p["attn"][name]["kernel"].reshape(d, heads, d // heads)}
                for name in ("query", "key", "value")}
        attn["out"] = {"kernel": p["attn"]["out"]["kernel"].reshape(heads, d // heads, d)}
        return {**p, "attn": attn}

    return {name: block(p) if name.startswith("block_") else p for name, p in params.items()}
