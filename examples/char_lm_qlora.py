"""QLoRA: fine-tune the byte-level LM on a new domain with its base weights quantized and frozen.

Run: python examples/char_lm_qlora.py [--steps 200] [--rank 8]   (inside the environment; the float
model is the char_lm examples' one, trained and cached as `_common.py` says; same flags for it)

The LM learned the top-level files of the Python standard library. Here it is fine-tuned on a
part it never saw, the `email` package (a domain shift: its files, split by file into tune and
evaluation parts), served as the Flax Linen `Decoder` (`char_lm_model.py`: attention kernels in
Flax's 3-D layouts). Four ways, the same steps on the same batches:

  float full FT   every parameter trains (AdamW);
  float LoRA      `Rule(kernel, None, lora=LoRA(r))`: float kernels frozen, adapters train;
  int4 g128 QLoRA `jquant.int4_weights(lora=LoRA(r))`: every kernel an int4 QArray (groups of
                  128 inputs; per head for attention), frozen, adapters train;
  NF4 QLoRA       the same layouts with NF4 codes in groups of 64 (QLoRA's, Dettmers et al. 2023).

LoRA on every kernel (attention query/key/value/out, MLP up/down, head), α = 2r; embeddings and
LayerNorms frozen in float. The adapters are the only trainable tree: the step differentiates
with respect to the `"lora"` collection and takes the (quantized) params as an argument it does
not differentiate (nor fold into the compiled program as a constant).
Reported: trainable parameters; weight bytes, frozen (the params tree, QArrays with their
scales and zero-points) and trainable (the adapters, or the whole model), and what is resident
in all against the float model; perplexity on the held-out email files before and after; the
median train step (the four steps timed in alternating rounds on one batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sysconfig
from pathlib import Path
from typing import Dict, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import char_lm_model as lm
import jquant
import jquant.flax
from _common import (Training, add_lm_arguments, interleaved_ms, lm_config, random_windows, stdlib_splits,
                     trained_params, windows)
from jquant import LoRA, Policy

DOMAIN = "email"


def domain_splits(package: str = DOMAIN, every: int = 4):
    """(tune bytes, evaluation bytes): the `.py` files of a stdlib package sorted by path, every
    `every`-th (index % every == 1) held out for evaluation, joined with a newline."""
    files = sorted((Path(sysconfig.get_paths()["stdlib"]) / package).rglob("*.py"))
    parts = ([f for i, f in enumerate(files) if i % every != 1], [f for i, f in enumerate(files) if i % every == 1])
    return tuple(np.frombuffer(b"\n".join(f.read_bytes() for f in part), np.uint8) for part in parts)


def policies(rank: int) -> Dict[str, Policy]:
    """The three LoRA policies (module docstring); α = 2r."""
    lora = LoRA(rank, alpha=2.0 * rank)
    int4 = jquant.int4_weights(lora=lora)
    nf4 = Policy([dataclasses.replace(r, spec=dataclasses.replace(
        r.spec, symmetric=True, method="nf4", group_size=64 if r.spec.group_size == 128 else r.spec.group_size))
        for r in int4.rules])
    return {"float LoRA": Policy([dataclasses.replace(r, spec=None) for r in int4.rules]),
            "int4 g128 QLoRA": int4, "NF4 QLoRA": nf4}


def nbytes(tree) -> int:
    """Bytes of a tree's arrays, a QArray's codes, scales and zero-points included."""
    return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, jquant.QArray)))


def count(tree) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


class Method(NamedTuple):
    """One way to fine-tune: `apply(variables, tokens)`, the trainable tree and the frozen one
    (`variables = combine(trainable, frozen)`)."""
    apply: object
    trainable: object
    frozen: object
    combine: object


def methods(params, config: lm.Config, rank: int, key) -> Dict[str, Method]:
    decoder = lm.Decoder(config)
    tokens = jnp.zeros((1, config.context), jnp.int32)
    out = {"float full FT": Method(decoder.apply, params, {}, lambda trainable, frozen: {"params": trainable})}
    for name, policy in policies(rank).items():
        model = jquant.flax.quantize(decoder, policy)
        lora = jax.jit(model.init)(key, tokens, _positions(tokens))["lora"]  # same key: the same A for all
        frozen = jquant.quantize_params(params, policy, warn_unused=False)
        out[name] = Method(model.apply, lora, frozen, lambda trainable, frozen: {"params": frozen, "lora": trainable})
    return out


def _positions(tokens):
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


def make_step(method: Method, optimizer):
    """The jitted step (trainable, opt_state, frozen, batch) -> (trainable, opt_state, loss):
    gradients of the trainable tree only; the frozen tree (QArrays) is an argument, not a
    constant folded into the program."""
    def loss(trainable, frozen, batch):
        inputs = batch[:, :-1]
        logits = method.apply(method.combine(trainable, frozen), inputs, _positions(inputs))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @jax.jit
    def step(trainable, opt_state, frozen, batch):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return step


def make_perplexity(method: Method, eval_windows: np.ndarray, batch: int = 64):
    """perplexity(trainable): exp(mean cross-entropy per predicted byte) over the evaluation
    windows (one compiled program for the method)."""
    @jax.jit
    def nll(trainable, frozen, chunk):
        inputs = chunk[:, :-1]
        logits = method.apply(method.combine(trainable, frozen), inputs, _positions(inputs))
        return optax.softmax_cross_entropy_with_integer_labels(logits, chunk[:, 1:]).sum()

    def perplexity(trainable) -> float:
        total = sum(float(nll(trainable, method.frozen, jnp.asarray(eval_windows[i:i + batch])))
                    for i in range(0, len(eval_windows), batch))
        return math.exp(total / (eval_windows.shape[0] * (eval_windows.shape[1] - 1)))

    return perplexity


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps per method")
    parser.add_argument("--batch", type=int, default=16, help="windows per fine-tuning step")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (α = 2r)")
    parser.add_argument("--lr", type=float, default=3e-4, help="full fine-tune learning rate (AdamW)")
    parser.add_argument("--lora-lr", type=float, default=3e-3, help="adapters' learning rate (Adam)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    add_lm_arguments(parser, steps_flag="--train-steps")
    parser.set_defaults(eval_windows=256)  # ~ the held-out files' 44 kB in 128-byte windows
    args = parser.parse_args(argv)

    config = lm_config(args)
    params, _ = trained_params(config, Training(args.train_steps), stdlib_splits()["train"].data, args.cache)
    params = lm.linen_params(params)
    tune, evaluation = domain_splits()
    eval_windows = windows(evaluation, config.context, args.eval_windows)
    print(f"{DOMAIN}: tune {len(tune):,} bytes, evaluation {len(evaluation):,} bytes "
          f"({eval_windows.shape[0]} windows); {args.steps} steps of {args.batch} windows\n")

    schedule = lambda lr: optax.warmup_cosine_decay_schedule(0.0, lr, max(1, args.steps // 10), max(args.steps, 2))
    runs = methods(params, config, args.rank, jax.random.key(1))
    float_bytes = nbytes(params)
    rows, steps, states = [], [], []
    for name, method in runs.items():
        full = name == "float full FT"
        optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                                optax.adamw(schedule(args.lr), weight_decay=0.01) if full
                                else optax.adam(schedule(args.lora_lr)))
        step = make_step(method, optimizer)
        perplexity = make_perplexity(method, eval_windows)
        before = perplexity(method.trainable)
        trainable, opt_state = method.trainable, optimizer.init(method.trainable)
        for batch in random_windows(tune, config.context, args.batch, args.steps, seed=0):
            trainable, opt_state, loss = step(trainable, opt_state, method.frozen, batch)
        after = perplexity(trainable)
        print(f"  {name}: perplexity {before:.3f} -> {after:.3f} (last loss {float(loss):.3f})", flush=True)
        rows.append([name, count(trainable), nbytes(method.frozen), nbytes(trainable), before, after])
        steps.append(step)
        states.append((trainable, opt_state, method.frozen, batch))
    times = interleaved_ms(steps, states, rounds=args.rounds, repeats=3)

    lora_ppl, lora_ms = rows[1][5], times[1]
    lines = [f"| method | trainable params | frozen weight bytes (× float) | trainable bytes | resident × float | "
             f"{DOMAIN} perplexity before → after | × float LoRA | train step ms | × float LoRA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (name, trainable, frozen, trained_bytes, before, after), ms in zip(rows, times):
        lines.append(f"| {name} | {trainable:,} | {frozen:,} ({frozen / float_bytes:.3f}) | {trained_bytes:,} | "
                     f"{(frozen + trained_bytes) / float_bytes:.3f} | {before:.3f} → {after:.3f} | "
                     f"{after / lora_ppl:.3f} | {ms:.1f} | {ms / lora_ms:.2f} |")
    print(f"\nfloat model: {float_bytes:,} weight bytes; rank {args.rank}, α = {2 * args.rank}; step times: medians "
          f"of {args.rounds} alternating rounds\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
