"""Post-training quantization of a byte-level language model: perplexity per method and bit width.

Run: python examples/char_lm.py [--steps N] [--cache DIR] [--retrain]   (inside the environment)

A small decoder-only transformer (`char_lm_model.py`: a plain JAX `forward(params, tokens)`, a
nested dict of 2-D kernels) is trained on the Python standard library's own source (the
top-level `.py` files, split by file into train / calibration / evaluation; nothing is
downloaded). The trained parameters are cached under `--cache` (default
`~/.cache/jquant/char_lm/`), keyed by a hash of the model and training settings and of the
training text, so a second run only quantizes and evaluates (text, training and cache:
`_common.py`, shared with the other char_lm examples).

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
import re
import time

import jax

import char_lm_model as lm
import jquant
import jquant.ptq
from _common import (Training, add_lm_arguments, calibration_batches, g128, kernel_policy, lm_config,
                     perplexity, stdlib_splits, trained_params, windows)
from jquant import QuantSpec

INT8 = QuantSpec(8, channel_axes=(1,))
INT4_G128 = g128(4)
INT3_G128 = g128(3)
MXFP4 = QuantSpec(4, method="mxfp4", channel_axes=(1,), group_size=32)
NVFP4 = QuantSpec(4, method="nvfp4", channel_axes=(1,), group_size=16)
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
    ("MXFP4 RTN", MXFP4, "rtn"),
    ("MXFP4 GPTQ", MXFP4, "gptq"),
    ("NVFP4 RTN", NVFP4, "rtn"),
    ("NVFP4 GPTQ", NVFP4, "gptq"),
    ("3-bit g128 RTN", INT3_G128, "rtn"),
    ("3-bit g128 GPTQ", INT3_G128, "gptq"),
    ("3-bit k-means per-channel", KMEANS3, "rtn"),
    ("2-bit k-means per-channel", KMEANS2, "rtn"),
]


def quantize(params, spec: QuantSpec, algorithm: str, batches):
    """(float params the quantized tree approximates, quantized tree) for one row.

    GPTQ gives the quantized tree; AWQ gives float params with per-channel scales folded in
    (the same function), which are then rounded to nearest."""
    policy = kernel_policy(spec)
    if algorithm == "rtn":
        return params, jquant.quantize_params(params, policy)
    if algorithm == "gptq":
        return params, jquant.ptq.gptq(lm.forward, params, policy, batches, progress=False).params
    scaled = jquant.ptq.awq(lm.forward, params, policy, batches).params
    if algorithm == "awq":
        return scaled, jquant.quantize_params(scaled, policy)
    return scaled, jquant.ptq.gptq(lm.forward, scaled, policy, batches, progress=False).params  # awq+gptq


def table(params, eval_windows, batches, rows=ROWS) -> str:
    """The markdown table: one row per method, perplexity and Δ against the float model."""
    float_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    float_ppl = perplexity(params, eval_windows)
    lines = ["| method | bits/weight | model bytes | eval perplexity | Δ vs float |", "|---|---|---|---|---|",
             f"| float32 | 32.00 | {float_bytes:,} | {float_ppl:.3f} | - |"]
    print(lines[-1], flush=True)
    for label, spec, algorithm in rows:
        start = time.perf_counter()
        reference, qtree = quantize(params, spec, algorithm, batches)
        rep = jquant.report(reference, qtree, kernel_policy(spec))
        ppl = perplexity(jquant.dequantize_params(qtree), eval_windows)
        delta = ppl - float_ppl
        lines.append(f"| {label} | {rep.quantized_bits_per_weight:.2f} | {rep.bytes_after:,} | {ppl:.3f} | "
                     f"{delta:+.3f} ({100 * delta / float_ppl:+.1f}%) |")
        print(f"{lines[-1]}  [{time.perf_counter() - start:.1f} s]", flush=True)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_lm_arguments(parser)
    parser.add_argument("--batch", type=int, default=Training.batch)
    parser.add_argument("--lr", type=float, default=Training.lr)
    parser.add_argument("--seed", type=int, default=Training.seed)
    parser.add_argument("--calib-windows", type=int, default=128, help="calibration windows (GPTQ, AWQ)")
    parser.add_argument("--calib-batch", type=int, default=32, help="windows per calibration batch")
    parser.add_argument("--retrain", action="store_true", help="ignore a cached model")
    parser.add_argument("--only", default=None, help="regex: run only the rows whose label it matches")
    args = parser.parse_args(argv)

    config = lm_config(args)
    training = Training(args.steps, args.batch, args.lr, seed=args.seed)
    splits = stdlib_splits()
    for name, split in splits.items():
        print(f"{name}: {len(split.files)} files, {len(split.data):,} bytes")
    params, _ = trained_params(config, training, splits["train"].data, args.cache, args.retrain)

    eval_windows = windows(splits["evaluation"].data, config.context, args.eval_windows)
    calib = windows(splits["calibration"].data, config.context, args.calib_windows)
    batches = calibration_batches(calib, args.calib_batch)
    print(f"\nevaluation: {eval_windows.shape[0]} windows x {config.context} predicted bytes; calibration: "
          f"{len(calib)} windows in {len(batches)} batches; head and embeddings kept in float\n")
    rows = [row for row in ROWS if args.only is None or re.search(args.only, row[0])]
    print("\n" + table(params, eval_windows, batches, rows))


if __name__ == "__main__":
    main()
