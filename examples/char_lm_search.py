"""Mixed precision under a size budget on the byte-level LM: searched policies vs uniform ones.

Run: python examples/char_lm_search.py [--budgets 3.0 3.5 4.5]   (after examples/char_lm.py has
trained and cached the model; same flags for the model)

`jquant.ptq.search_policy` measures, for every block kernel and every candidate spec, the KL divergence
of the model's next-byte distribution from the float model's on the calibration windows when only
that kernel is quantized, then picks one spec per kernel by an exact knapsack so that the stored
bits per weight stay within the budget. The table compares the evaluation perplexity of each
searched policy with the best uniform policy (one spec for all kernels) of equal or smaller size
and with the next larger uniform policy.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import char_lm_model as lm
import jquant
from _common import (Training, add_lm_arguments, calibration_batches, g128, kernel_policy, lm_config,
                     perplexity, stdlib_splits, trained_params, windows)
from jquant import QuantSpec

CANDIDATES = {"int8 per-channel": QuantSpec(8, channel_axes=(1,)), "int4 g128": g128(4), "3-bit g128": g128(3),
              "2-bit g128": g128(2)}
BLOCK_KERNELS = r"block_\d+/.*kernel"


def kl_divergence(logits, reference_logits):
    """Σ over positions of KL(p_float ‖ p_quantized) of the next-byte distributions."""
    log_p = jax.nn.log_softmax(reference_logits.astype(jnp.float32))
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32))
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[3.0, 3.5, 4.5])
    parser.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES),
                        help="the specs the search may choose from (and the uniform policies compared)")
    add_lm_arguments(parser)
    parser.add_argument("--calib-windows", type=int, default=64)
    args = parser.parse_args(argv)

    config = lm_config(args)
    splits = stdlib_splits()
    params, _ = trained_params(config, Training(args.steps), splits["train"].data, args.cache)
    eval_windows = windows(splits["evaluation"].data, config.context, args.eval_windows)
    batches = calibration_batches(windows(splits["calibration"].data, config.context, args.calib_windows), 32)
    candidates = {name: CANDIDATES[name] for name in args.candidates}

    results = []  # (label, bits/weight, perplexity)
    for name, spec in candidates.items():
        policy = kernel_policy(spec)
        qtree = jquant.quantize_params(params, policy)
        bits = jquant.report(params, qtree, policy).quantized_bits_per_weight
        results.append((f"uniform {name}", bits, perplexity(jquant.dequantize_params(qtree), eval_windows)))
        print(f"| {results[-1][0]} | {bits:.2f} | {results[-1][2]:.3f} |", flush=True)
    float_ppl = perplexity(params, eval_windows)

    searched = []
    for budget in args.budgets:
        start = time.perf_counter()
        policy, table = jquant.ptq.search_policy(lm.forward, params, batches, budget, list(candidates.values()),
                                             include=BLOCK_KERNELS, distance=kl_divergence)
        qtree = jquant.quantize_params(params, policy)
        ppl = perplexity(jquant.dequantize_params(qtree), eval_windows)
        counts = {name: sum(table.candidates[r.chosen] == spec for r in table.rows)
                  for name, spec in candidates.items()}
        mix = ", ".join(f"{n}× {name}" for name, n in counts.items() if n)
        searched.append((f"searched ≤ {budget:g} bits ({mix})", table.bits_per_weight, ppl))
        print(f"| {searched[-1][0]} | {table.bits_per_weight:.2f} | {ppl:.3f} |  [{time.perf_counter() - start:.0f} s]",
              flush=True)

    print(f"\nfloat perplexity {float_ppl:.3f}; block kernels only (embeddings and head in float)\n")
    print("| policy | bits/weight | eval perplexity | best uniform of ≤ that size | smallest larger uniform |")
    print("|---|---|---|---|---|")
    for label, bits, ppl in sorted(results + searched, key=lambda r: r[1]):
        if label.startswith("uniform"):
            print(f"| {label} | {bits:.2f} | {ppl:.3f} | | |")
            continue
        smaller = [r for r in results if r[1] <= bits]
        larger = [r for r in results if r[1] > bits]
        cells = [_versus(ppl, min(smaller, key=lambda r: r[2]) if smaller else None),
                 _versus(ppl, min(larger, key=lambda r: r[1]) if larger else None)]
        print(f"| **{label}** | {bits:.2f} | {ppl:.3f} | {cells[0]} | {cells[1]} |")


def _versus(ppl, uniform):
    if uniform is None:
        return "-"
    verdict = "better" if ppl < uniform[2] else "worse"
    return f"{uniform[0]} ({uniform[1]:.2f} bits): {uniform[2]:.3f}, searched {verdict}"


if __name__ == "__main__":
    main()
