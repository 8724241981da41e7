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
  HQQ           the same with `calibration=jquant.HQQ()`: each group's scale and zero-point fitted
                to the weights (data-free) instead of their min/max;
  GPTQ, AWQ     `jquant.ptq.gptq` / `jquant.ptq.awq` with calibration windows from files that
                appear in neither the training nor the evaluation split;
  + Hadamard    the weight stored as Q(Rᵀ·W) with a randomized Hadamard rotation R along its
                inputs (`rotation=jquant.Hadamard()`), for RTN or GPTQ (Hessian in the rotated basis);
  + equalization  the weight stored as r·Q(W / r), r from its own input-row norms
                (`equalization=jquant.Equalize()`, data-free).
Quantized params are served dequantized (`jquant.dequantize_params`) through the same jitted
forward, except the W4A8 / W4A4 rows: there every kernel is multiplied by `jquant.dot_general`
with the activation quantized per token (asymmetric, 8 or 4 bits) — after rotating it online
for a rotated weight. Policy: every `kernel` (attention query/key/value/out, MLP up/down) is quantized; the
byte and position embeddings (lookups, not matmuls) and the output head stay in float, as in
GPTQ's and AWQ's own LLM results. bits/weight counts everything stored for the quantized
kernels (codes, scales, zero-points, codebooks); "model bytes" is the whole parameter tree.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from typing import NamedTuple, Optional

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
INT2_G128 = g128(2)
INT2_G64 = QuantSpec(2, symmetric=False, channel_axes=(1,), group_size=64)
INT3_G64 = QuantSpec(3, symmetric=False, channel_axes=(1,), group_size=64)


A8, A4 = (QuantSpec(bits, symmetric=False, channel_axes=(0, 1)) for bits in (8, 4))  # per token


def hqq(spec: QuantSpec) -> QuantSpec:
    """`spec` with its grid fitted by HQQ (`jquant.HQQ()`) instead of the min/max range."""
    return dataclasses.replace(spec, calibration=jquant.HQQ())


def rotated(spec: QuantSpec) -> QuantSpec:
    """`spec` stored in a Hadamard-rotated basis along the contraction (`jquant.Hadamard()`)."""
    return dataclasses.replace(spec, rotation=jquant.Hadamard())


def equalized(spec: QuantSpec) -> QuantSpec:
    """`spec` with each kernel's input rows scaled by its own norms first (`jquant.Equalize()`)."""
    return dataclasses.replace(spec, equalization=jquant.Equalize())


class Row(NamedTuple):
    """label; weight spec; algorithm: "rtn" is quantize_params (k-means specs give Lloyd codebooks),
    "awq+gptq" runs GPTQ on the AWQ-scaled params, "gptq-ft" is GPTQ with act-order fitting each
    kernel to the float model's output (`act_order=True, float_target=True`); act: None serves the
    dequantized weights, a spec serves every kernel through `jquant.dot_general` with the
    activation quantized by it (per token; a rotated weight rotates the activation first, and the
    rotated one is quantized)."""

    label: str
    spec: QuantSpec
    algorithm: str
    act: Optional[QuantSpec] = None


ROWS = [Row(*row) for row in [
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
    ("2-bit g128 RTN", INT2_G128, "rtn"),
    ("2-bit g64 RTN", INT2_G64, "rtn"),
    ("int4 g128 HQQ", hqq(INT4_G128), "rtn"),
    ("3-bit g128 HQQ", hqq(INT3_G128), "rtn"),
    ("2-bit g128 HQQ", hqq(INT2_G128), "rtn"),
    ("2-bit g64 HQQ", hqq(INT2_G64), "rtn"),
    ("3-bit g128 RTN + Hadamard", rotated(INT3_G128), "rtn"),
    ("int4 g128 RTN + equalization", equalized(INT4_G128), "rtn"),
    ("3-bit g128 RTN + equalization", equalized(INT3_G128), "rtn"),
    ("3-bit g128 RTN + Hadamard + equalization", equalized(rotated(INT3_G128)), "rtn"),
    ("int4 g128 HQQ + equalization", equalized(hqq(INT4_G128)), "rtn"),
    ("3-bit g128 HQQ + equalization", equalized(hqq(INT3_G128)), "rtn"),
    ("2-bit g128 HQQ + equalization", equalized(hqq(INT2_G128)), "rtn"),
    ("3-bit g128 GPTQ + Hadamard", rotated(INT3_G128), "gptq"),
    ("3-bit g64 RTN", INT3_G64, "rtn"),
    ("3-bit g64 GPTQ", INT3_G64, "gptq"),
    ("3-bit g64 RTN + Hadamard", rotated(INT3_G64), "rtn"),
    ("3-bit g64 GPTQ + Hadamard", rotated(INT3_G64), "gptq"),
    ("3-bit g128 GPTQ (act-order, float target)", INT3_G128, "gptq-ft"),
    ("3-bit g128 GPTQ (act-order, float target) + Hadamard", rotated(INT3_G128), "gptq-ft"),
    ("2-bit g128 GPTQ", INT2_G128, "gptq"),
    ("2-bit g128 RTN + Hadamard", rotated(INT2_G128), "rtn"),
    ("2-bit g128 GPTQ + Hadamard", rotated(INT2_G128), "gptq"),
    ("2-bit g64 GPTQ", INT2_G64, "gptq"),
    ("2-bit g64 RTN + Hadamard", rotated(INT2_G64), "rtn"),
    ("2-bit g64 GPTQ + Hadamard", rotated(INT2_G64), "gptq"),
    ("2-bit g64 GPTQ (act-order, float target) + Hadamard", rotated(INT2_G64), "gptq-ft"),
    ("W4A8 per-token (int4 g128 RTN)", INT4_G128, "rtn", A8),
    ("W4A8 per-token (int4 g128 RTN) + Hadamard", rotated(INT4_G128), "rtn", A8),
    ("W4A4 per-token (int4 g128 GPTQ)", INT4_G128, "gptq", A4),
    ("W4A4 per-token (int4 g128 GPTQ) + Hadamard", rotated(INT4_G128), "gptq", A4),
]]


def quantize(params, spec: QuantSpec, algorithm: str, batches):
    """(float params the quantized tree approximates, quantized tree) for one row.

    GPTQ gives the quantized tree; AWQ gives float params with per-channel scales folded in
    (the same function), which are then rounded to nearest."""
    policy = kernel_policy(spec)
    if algorithm == "rtn":
        return params, jquant.quantize_params(params, policy)
    if algorithm in ("gptq", "gptq-ft"):
        fit = dict(act_order=True, float_target=True) if algorithm == "gptq-ft" else {}
        return params, jquant.ptq.gptq(lm.forward, params, policy, batches, progress=False, **fit).params
    scaled = jquant.ptq.awq(lm.forward, params, policy, batches).params
    if algorithm == "awq":
        return scaled, jquant.quantize_params(scaled, policy)
    return scaled, jquant.ptq.gptq(lm.forward, scaled, policy, batches, progress=False).params  # awq+gptq


@jax.tree_util.register_pytree_node_class
class _Served:
    """A kernel leaf that `x @ leaf` multiplies through `jquant.dot_general` with the activation
    quantized by `act` (the model's `x @ kernel` stays as written)."""

    def __init__(self, kernel: jquant.QArray, act: QuantSpec):
        self.kernel, self.act = kernel, act

    def tree_flatten(self):
        return (self.kernel,), self.act

    @classmethod
    def tree_unflatten(cls, act, children):
        return cls(children[0], act)

    def __rmatmul__(self, x):
        return jquant.dot_general(x, self.kernel, (((x.ndim - 1,), (0,)), ((), ())), lhs_spec=self.act)


def served(qtree, act: QuantSpec):
    """`qtree` with every QArray kernel served with activations quantized by `act`."""
    return jax.tree_util.tree_map(lambda leaf: _Served(leaf, act) if isinstance(leaf, jquant.QArray) else leaf,
                                  qtree, is_leaf=lambda leaf: isinstance(leaf, jquant.QArray))


def table(params, eval_windows, batches, rows=ROWS) -> str:
    """The markdown table: one row per method, perplexity and Δ against the float model."""
    float_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    float_ppl = perplexity(params, eval_windows)
    lines = ["| method | bits/weight | model bytes | eval perplexity | Δ vs float |", "|---|---|---|---|---|",
             f"| float32 | 32.00 | {float_bytes:,} | {float_ppl:.3f} | - |"]
    print(lines[-1], flush=True)
    for label, spec, algorithm, act in rows:
        start = time.perf_counter()
        reference, qtree = quantize(params, spec, algorithm, batches)
        rep = jquant.report(reference, qtree, kernel_policy(spec))
        ppl = perplexity(jquant.dequantize_params(qtree) if act is None else served(qtree, act), eval_windows)
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
