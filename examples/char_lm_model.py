"""A byte-level decoder-only transformer as plain JAX functions, and the text it learns.

`forward(params, tokens) -> logits` takes a nested dict of arrays and nothing else: every linear
layer is `x @ params[...]["kernel"]` with a 2-D kernel (in, out), so `jquant.quantize_params`,
`jquant.ptq.gptq` and `jquant.ptq.awq` see ordinary Dense kernels. Pre-norm blocks (LayerNorm →
causal multi-head attention → residual, LayerNorm → GELU MLP → residual), learned positions, a
final LayerNorm and an untied head over the 256 byte values. No biases in the linears; layers
are unrolled in Python (no `scan`), so every kernel meets its input in its own `dot_general`.

Data: the `.py` files at the top level of the standard library of the Python that runs this
(`sysconfig.get_paths()["stdlib"]`), sorted by name and split by file: file i goes to
evaluation if i % 10 == 3, to calibration if i % 10 == 7, to training otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sysconfig
from pathlib import Path
from typing import Dict, List, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


class Split(NamedTuple):
    """One split: its concatenated bytes (uint8) and the file names it came from."""
    data: np.ndarray
    files: List[str]


def stdlib_splits() -> Dict[str, Split]:
    """{"train", "calibration", "evaluation"}: the top-level stdlib `.py` files, split by file.

    Files are joined with a newline between them. The split is by index in the sorted name list
    (i % 10 == 3 → evaluation, i % 10 == 7 → calibration, else train), so the three splits share
    no file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"), key=lambda f: f.name)
    parts: Dict[str, List[Path]] = {"train": [], "calibration": [], "evaluation": []}
    for i, f in enumerate(files):
        parts["evaluation" if i % 10 == 3 else "calibration" if i % 10 == 7 else "train"].append(f)
    out = {}
    for name, chosen in parts.items():
        data = b"\n".join(f.read_bytes() for f in chosen)
        out[name] = Split(np.frombuffer(data, np.uint8), [f.name for f in chosen])
    return out


def fingerprint(data: np.ndarray) -> str:
    """Short sha256 of a byte array (the training text goes into the cache key)."""
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


def windows(data: np.ndarray, context: int, count: int) -> np.ndarray:
    """`count` windows (count, context + 1) int32 at evenly spaced offsets over all of `data`
    (so every file of a split is sampled, deterministically); input = window[:, :-1], target =
    window[:, 1:]."""
    starts = np.linspace(0, len(data) - context - 1, count).round().astype(np.int64)
    return data[starts[:, None] + np.arange(context + 1)[None, :]].astype(np.int32)
