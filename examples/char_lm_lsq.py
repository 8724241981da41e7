"""Quantization-aware fine-tuning of the byte-level LM at 2–4 bits: LSQ vs plain STE QAT.

Run: python examples/char_lm_lsq.py [--steps 150] [--bits 2 3 4]   (after examples/char_lm.py has
trained and cached the float model; same flags for the model)

Starting from the cached float model, every block kernel gets weight-only b-bit quantization
(`QuantSpec(b, symmetric=False, channel_axes=(1,), group_size=128)`; embeddings and head in float)
and is fine-tuned for the same steps on the same batches in two ways:
  STE QAT  loss(fake_quant_params(params, policy)): scales from each kernel's min/max every step,
           straight-through gradients;
  LSQ      loss(learned.fake_quant_params(params, learned, policy)): one trained step size per channel and group
           (LSQ gradient with g = 1/√(N·Qmax)), its own learning rate through
           `jquant.learned.optimizer`.
Both are then served the same way — QArrays (`quantize_params` / `learned.quantize_params`) dequantized
through the plain forward — and evaluated on held-out files; PTQ (round to nearest) is the
starting point of both.
"""

from __future__ import annotations

import argparse
import time

import optax

import jquant
from _common import (Training, add_lm_arguments, fit, g128, kernel_policy, lm_config, lm_loss, optimizer_step,
                     perplexity, random_windows, stdlib_splits, trained_params, windows)
from jquant import learned as jl
from jquant.learned import LSQ_STEP


def fine_tune(params, policy, data, config, steps, batch, lr, step_lr, method, seed=0):
    """(served tree, seconds) after `steps` of fine-tuning with `method` in {"float", "ste", "lsq"}
    ("float": no quantization, the reference for what the extra steps alone buy)."""
    schedule = optax.cosine_decay_schedule(lr, steps)
    weights_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    if method in ("float", "ste"):
        tree = {"params": params}
        tx = weights_tx

        def loss(tree, tokens):
            p = tree["params"] if method == "float" else jquant.fake_quant_params(tree["params"], policy,
                                                                                 warn_unused=False)
            return lm_loss(p, tokens)
    else:
        learned = jl.init(params, policy)
        tree = {"params": params, LSQ_STEP: learned[LSQ_STEP]}
        tx = jl.optimizer(weights_tx, optax.adam(optax.cosine_decay_schedule(step_lr, steps)))

        def loss(tree, tokens):
            return lm_loss(jl.fake_quant_params(tree["params"], {LSQ_STEP: tree[LSQ_STEP]}, policy), tokens)

    step = optimizer_step(loss, tx)
    start = time.perf_counter()
    tree, _, _ = fit(step, tree, tx.init(tree), random_windows(data, config.context, batch, steps, seed))
    seconds = time.perf_counter() - start
    if method == "float":
        return tree["params"], seconds
    if method == "ste":
        return jquant.quantize_params(tree["params"], policy), seconds
    return jl.quantize_params(tree["params"], {LSQ_STEP: tree[LSQ_STEP]}, policy), seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps per method")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4, help="weights' learning rate")
    parser.add_argument("--step-lr", type=float, default=1e-3, help="LSQ step sizes' learning rate")
    add_lm_arguments(parser, steps_flag="--train-steps")
    args = parser.parse_args(argv)

    config = lm_config(args)
    splits = stdlib_splits()
    train_data = splits["train"].data
    params, _ = trained_params(config, Training(args.train_steps), train_data, args.cache)
    eval_windows = windows(splits["evaluation"].data, config.context, args.eval_windows)
    float_ppl = perplexity(params, eval_windows)
    tuned, _ = fine_tune(params, None, train_data, config, args.steps, args.batch, args.lr, args.step_lr, "float")
    tuned_ppl = perplexity(tuned, eval_windows)

    lines = ["| weights (block kernels, g128) | bits/weight | PTQ (RTN) | STE QAT | LSQ |", "|---|---|---|---|---|"]
    for bits in args.bits:
        policy = kernel_policy(g128(bits))
        rtn = jquant.quantize_params(params, policy)
        cells = [perplexity(jquant.dequantize_params(rtn), eval_windows)]
        for method in ("ste", "lsq"):
            served, seconds = fine_tune(params, policy, train_data, config, args.steps, args.batch, args.lr,
                                        args.step_lr, method)
            cells.append(perplexity(jquant.dequantize_params(served), eval_windows))
            print(f"  {bits}-bit {method}: perplexity {cells[-1]:.3f} after {args.steps} steps ({seconds:.0f} s)",
                  flush=True)
        bpw = jquant.report(params, rtn, policy).quantized_bits_per_weight
        best = min(cells[1:])
        lines.append(f"| {bits}-bit asymmetric | {bpw:.2f} | {cells[0]:.3f} | "
                     + " | ".join(f"**{c:.3f}**" if c == best else f"{c:.3f}" for c in cells[1:]) + " |")
    print(f"\nfloat perplexity {float_ppl:.3f}, {tuned_ppl:.3f} after the same {args.steps} fine-tuning steps "
          f"of {args.batch} windows without quantization (every method gets those steps)\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
