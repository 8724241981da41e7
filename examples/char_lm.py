"""Post-training quantization of a byte-level language model: perplexity per method and bit width.

Run: python examples/char_lm.py [--steps N] [--cache DIR] [--retrain]   (inside the environment)

A small decoder-only transformer (`char_lm_model.py`: a plain JAX `forward(params, tokens)`, a
nested dict of 2-D kernels) is trained on the Python standard library's own source (the
top-level `.py` files, split by file into train / calibration / evaluation; nothing is
downloaded). The trained parameters are cached under `--cache` (default
`~/.cache/jquant/char_lm/`), keyed by a hash of the model and training settings and of the
training text, so a second run only quantizes and evaluates.

Each row quantizes the same float parameters and reports the evaluation perplexity
exp(mean cross-entropy per byte):
  RTN, k-means  `jquant.quantize_params(params, policy)` (round to nearest / Lloyd codebooks);
  GPTQ, AWQ     `jquant.ptq.gptq` / `jquant.ptq.awq` with calibration windows from files that
                appear in neither the training nor the evaluation split.
Quantized params are served dequantized (`jquant.dequantize_params`) through the same jitted
forward. Policy: every `kernel` (attention query/key/value/out, MLP up/down) is quantized; the
byte and position embeddings (lookups, not matmuls) and the output head stay in float, as in
GPTQ's and AWQ's own LLM results. bits/weight counts everything stored for the quantized
kernels (codes, scales, zero-points, codebooks); "model bytes" is the whole parameter tree.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import char_lm_model as lm

import jquant
import jquant.ptq
from jquant import Policy, QuantSpec, Rule


def kernel_policy(spec: QuantSpec) -> Policy:
    """`spec` on every block kernel; the head (and, unmatched, the embeddings) stay in float."""
    return Policy([Rule(r"head/kernel", None), Rule(r".*kernel", spec)])


INT8 = QuantSpec(8, channel_axes=(1,))
INT4_G128 = QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=128)
INT3_G128 = QuantSpec(3, symmetric=False, channel_axes=(1,), group_size=128)
KMEANS3 = QuantSpec(3, method="kmeans", channel_axes=(1,))
KMEANS2 = QuantSpec(2, method="kmeans", channel_axes=(1,))

# (row label, spec, algorithm): "rtn" is quantize_params (k-means specs give Lloyd codebooks);
# "awq+gptq" runs GPTQ on the AWQ-scaled params.
ROWS = [
    ("int8 per-channel RTN", INT8, "rtn"),
    ("int4 g128 RTN", INT4_G128, "rtn"),
    ("int4 g128 GPTQ", INT4_G128, "gptq"),
    ("int4 g128 AWQ", INT4_G128, "awq"),
    ("int4 g128 AWQ + GPTQ", INT4_G128, "awq+gptq"),
    ("3-bit g128 RTN", INT3_G128, "rtn"),
    ("3-bit g128 GPTQ", INT3_G128, "gptq"),
    ("3-bit k-means per-channel", KMEANS3, "rtn"),
    ("2-bit k-means per-channel", KMEANS2, "rtn"),
]


@dataclasses.dataclass(frozen=True)
class Training:
    """Training settings (with the model config and the training text, the cache key)."""
    steps: int = 600
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0


def cache_key(config: lm.Config, training: Training, text_fingerprint: str) -> str:
    blob = json.dumps({"config": dataclasses.asdict(config), "training": dataclasses.asdict(training),
                       "text": text_fingerprint, "version": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def loss_fn(params, batch):
    """Mean cross-entropy (nats per byte) of predicting batch[:, 1:] from batch[:, :-1]."""
    logits = lm.forward(params, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def optimizer_step(loss, optimizer: optax.GradientTransformation):
    """The jitted step (tree, opt_state, batch) -> (tree, opt_state, loss) of `loss(tree, batch)`."""
    @jax.jit
    def step(tree, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(tree, batch)
        updates, opt_state = optimizer.update(grads, opt_state, tree)
        return optax.apply_updates(tree, updates), opt_state, value

    return step


def random_windows(rng: np.random.Generator, data: np.ndarray, context: int, batch: int):
    """`batch` windows (batch, context + 1) int32 at random offsets of `data` (training batches)."""
    starts = rng.integers(0, len(data) - context - 1, batch)
    return jnp.asarray(data[starts[:, None] + np.arange(context + 1)[None, :]], jnp.int32)


def train(config: lm.Config, training: Training, data: np.ndarray):
    """AdamW (warmup, cosine decay, clip 1.0) on random windows of `data`; (params, seconds, loss)."""
    warmup = max(1, min(100, training.steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, training.lr, warmup, max(training.steps, warmup + 1),
                                                  training.lr / 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=training.weight_decay))
    params = lm.init(config, jax.random.key(training.seed))
    opt_state = optimizer.init(params)
    step = optimizer_step(loss_fn, optimizer)
    rng = np.random.default_rng(training.seed)
    start, losses = time.perf_counter(), []
    for i in range(training.steps):
        batch = random_windows(rng, data, config.context, training.batch)
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(loss)
        if (i + 1) % max(1, training.steps // 10) == 0 or i + 1 == training.steps:
            recent = float(jnp.mean(jnp.stack(losses[-20:])))
            print(f"  step {i + 1}/{training.steps}  train loss {recent:.3f} nats/byte  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    final = float(jnp.mean(jnp.stack(losses[-20:])))
    return jax.block_until_ready(params), time.perf_counter() - start, final


def trained_params(config: lm.Config, training: Training, data: np.ndarray, cache: Path, retrain: bool):
    """Train, or load the cached result for the same settings and text; (params, info dict)."""
    path = cache / f"{cache_key(config, training, lm.fingerprint(data))}.jqc"
    if path.exists() and not retrain:
        saved = jquant.load(path)
        print(f"loaded trained params from {path} (trained in {float(saved['train_seconds']):.0f} s)")
        return saved["params"], saved
    print(f"training {config} with {training} ...", flush=True)
    params, seconds, final = train(config, training, data)
    saved = {"params": params, "train_seconds": seconds, "final_train_loss": final}
    cache.mkdir(parents=True, exist_ok=True)
    jquant.save(path, saved)
    print(f"trained in {seconds:.0f} s, cached at {path}")
    return params, saved


@jax.jit
def _nll_sum(params, batch):
    logits = lm.forward(params, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).sum()


def perplexity(params, eval_windows: np.ndarray, batch: int = 64) -> float:
    """exp(mean cross-entropy per predicted byte) over the evaluation windows."""
    total = 0.0
    for i in range(0, len(eval_windows), batch):
        total += float(_nll_sum(params, jnp.asarray(eval_windows[i:i + batch])))
    return math.exp(total / (eval_windows.shape[0] * (eval_windows.shape[1] - 1)))


def quantize(params, spec: QuantSpec, algorithm: str, calibration_batches):
    """(float params the quantized tree approximates, quantized tree) for one row.

    GPTQ returns the quantized tree; AWQ returns float params with per-channel scales folded in
    (the same function), which are then rounded to nearest."""
    policy = kernel_policy(spec)
    if algorithm == "rtn":
        return params, jquant.quantize_params(params, policy)
    if algorithm == "gptq":
        return params, jquant.ptq.gptq(lm.forward, params, policy, calibration_batches, progress=False)
    scaled = jquant.ptq.awq(lm.forward, params, policy, calibration_batches)
    if algorithm == "awq":
        return scaled, jquant.quantize_params(scaled, policy)
    return scaled, jquant.ptq.gptq(lm.forward, scaled, policy, calibration_batches, progress=False)  # awq+gptq


def table(params, eval_windows, calibration_batches, rows=ROWS) -> str:
    """The markdown table: one row per method, perplexity and Δ against the float model."""
    float_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    float_ppl = perplexity(params, eval_windows)
    lines = ["| method | bits/weight | model bytes | eval perplexity | Δ vs float |", "|---|---|---|---|---|",
             f"| float32 | 32.00 | {float_bytes:,} | {float_ppl:.3f} | - |"]
    print(lines[-1], flush=True)
    for label, spec, algorithm in rows:
        start = time.perf_counter()
        reference, qtree = quantize(params, spec, algorithm, calibration_batches)
        rep = jquant.report(reference, qtree, kernel_policy(spec))
        ppl = perplexity(jquant.dequantize_params(qtree), eval_windows)
        delta = ppl - float_ppl
        lines.append(f"| {label} | {rep.quantized_bits_per_weight:.2f} | {rep.bytes_after:,} | {ppl:.3f} | "
                     f"{delta:+.3f} ({100 * delta / float_ppl:+.1f}%) |")
        print(f"{lines[-1]}  [{time.perf_counter() - start:.1f} s]", flush=True)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=lm.Config.width)
    parser.add_argument("--depth", type=int, default=lm.Config.depth)
    parser.add_argument("--context", type=int, default=lm.Config.context)
    parser.add_argument("--steps", type=int, default=Training.steps)
    parser.add_argument("--batch", type=int, default=Training.batch)
    parser.add_argument("--lr", type=float, default=Training.lr)
    parser.add_argument("--seed", type=int, default=Training.seed)
    parser.add_argument("--eval-windows", type=int, default=1024, help="evaluation windows of `context` bytes")
    parser.add_argument("--calib-windows", type=int, default=128, help="calibration windows (GPTQ, AWQ)")
    parser.add_argument("--calib-batch", type=int, default=32, help="windows per calibration batch")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "jquant" / "char_lm")
    parser.add_argument("--retrain", action="store_true", help="ignore a cached model")
    parser.add_argument("--only", default=None, help="regex: run only the rows whose label it matches")
    args = parser.parse_args(argv)

    config = lm.Config(args.width, args.depth, args.context)
    training = Training(args.steps, args.batch, args.lr, seed=args.seed)
    splits = lm.stdlib_splits()
    for name, split in splits.items():
        print(f"{name}: {len(split.files)} files, {len(split.data):,} bytes")
    params, _ = trained_params(config, training, splits["train"].data, args.cache, args.retrain)

    eval_windows = lm.windows(splits["evaluation"].data, config.context, args.eval_windows)
    calib = lm.windows(splits["calibration"].data, config.context, args.calib_windows)
    calibration_batches = [(jnp.asarray(calib[i:i + args.calib_batch, :-1]),)
                           for i in range(0, len(calib), args.calib_batch)]
    print(f"\nevaluation: {eval_windows.shape[0]} windows x {config.context} predicted bytes; calibration: "
          f"{len(calib)} windows in {len(calibration_batches)} batches; head and embeddings kept in float\n")
    rows = [row for row in ROWS if args.only is None or re.search(args.only, row[0])]
    print("\n" + table(params, eval_windows, calibration_batches, rows))


if __name__ == "__main__":
    main()
