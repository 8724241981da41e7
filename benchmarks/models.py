"""The Linen models every table uses, unmodified for float, jquant and Qwix.

`dot_general_cls` is the one hook AQT needs (it injects `AqtDotGeneral` modules into the layers);
left at None the models are plain Flax.
"""

from typing import Any

from flax import linen as nn


class Mlp(nn.Module):
    """`depth` hidden Dense layers of `width` with ReLU, then Dense(`out`)."""

    width: int = 1024
    depth: int = 2
    out: int = 10
    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = nn.relu(nn.Dense(self.width, dot_general_cls=self.dot_general_cls)(x))
        return nn.Dense(self.out, dot_general_cls=self.dot_general_cls)(x)


class Block(nn.Module):
    """A pre-norm transformer block: 4-head self-attention and a 4× GELU MLP, width 256."""

    width: int = 256
    heads: int = 4
    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_dot_general_cls=self.dot_general_cls,
                                                out_dot_general_cls=self.dot_general_cls)(h, h)
        h = nn.LayerNorm()(x)
        h = nn.gelu(nn.Dense(4 * self.width, dot_general_cls=self.dot_general_cls)(h))
        return x + nn.Dense(self.width, dot_general_cls=self.dot_general_cls)(h)
