"""Quantize a parameter tree with a policy: report, save, load, run.

Run: python examples/quantize_tree.py [--depth N]   (inside the environment `python3 run.py demo` sets up)

A small Linen transformer (4 pre-norm blocks by default, attention + MLP, width 256) stands in for
a pretrained model; its parameters go through two policies:
  * int8 per output channel on every kernel;
  * int4 asymmetric, group 128 on the MLP, int8 on attention, embeddings left in float (None rule).
For each: the report (bits per weight with metadata, SQNR, bytes), a save/load round trip through
`jquant.save` / `jquant.load`, and the model run on the loaded weights against the float model.
"""

import argparse
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import jquant
from jquant import Policy, QuantSpec, Rule


class Block(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, name="attn")(h, h)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(self.width, name="mlp_out")(nn.gelu(nn.Dense(4 * self.width, name="mlp_in")(h)))


class TinyLM(nn.Module):
    vocab: int = 512
    width: int = 256
    depth: int = 4

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.width, name="embed")(tokens)
        for i in range(self.depth):
            x = Block(self.width, name=f"layer_{i}")(x)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


POLICIES = {
    "int8 per-channel": jquant.int8_weights(),
    "int4 g128 MLP / int8 attention": Policy([
        Rule(r".*/embed/embedding", None),
        Rule(r".*/mlp_(in|out)/kernel", QuantSpec(4, symmetric=False, channel_axes=(-1,), group_size=128)),
        Rule(r".*kernel", QuantSpec(8, channel_axes=(-1,))),
    ]),
}


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=TinyLM.depth, help="transformer blocks")
    model = TinyLM(depth=parser.parse_args().depth)
    tokens = jax.random.randint(jax.random.key(1), (4, 64), 0, model.vocab)
    params = jax.jit(model.init)(jax.random.key(0), tokens)  # one compilation, not one per initializer
    apply = jax.jit(model.apply)
    logits = apply(params, tokens)
    for name, policy in POLICIES.items():
        print(f"\n=== {name}: {policy!r}")
        qparams = jquant.quantize_params(params, policy)
        print(jquant.report(params, qparams, policy))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model"
            jquant.save(path, qparams)  # an Orbax checkpoint directory
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            loaded = jquant.load(path)
        q_logits = apply(jquant.dequantize_params(loaded), tokens)
        agree = float(jnp.mean(jnp.argmax(q_logits, -1) == jnp.argmax(logits, -1)))
        print(f"checkpoint {size:,} bytes on disk (Orbax compresses); logits cosine to float {cosine(logits, q_logits):.6f}; "
              f"argmax agreement {agree:.4f}")


if __name__ == "__main__":
    main()
