"""Mixed precision under a size budget on the byte-level LM: searched policies vs uniform ones.

Run: python examples/char_lm_search.py [--budgets 3.0 3.5 4.5]   (after examples/char_lm.py has
trained and cached the model; same flags for the model)

`jquant.search_policy` measures, for every block kernel and every candidate spec, the KL divergence
of the model's next-byte distribution from the float model's on the calibration windows when only
that kernel is quantized, then picks one spec per kernel by an exact knapsack so that the stored
bits per weight stay within the budget. The table compares the evaluation perplexity of each
searched policy with the best uniform policy (one spec for all kernels) of equal or smaller size
and with the next larger uniform policy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import char_lm
import char_lm_model as lm

import jquant
from jquant import QuantSpec

CANDIDATES = {"int8 per-channel": char_lm.INT8, "int4 g128": char_lm.INT4_G128, "3-bit g128": char_lm.INT3_G128,
              "2-bit g128": QuantSpec(2, symmetric=False, channel_axes=(1,), group_size=128)}
BLOCK_KERNELS = r"block_\d+/.*kernel"


def kl_divergence(logits, reference_logits):
    """Σ over positions of KL(p_float ‖ p_quantized) of the next-byte distributions."""
    log_p = jax.nn.log_softmax(reference_logits.astype(jnp.float32))
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32))
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[3.0, 3.5, 4.5])
    parser.add_argument("--width", type=int, default=lm.Config.width)
    parser.add_argument("--depth", type=int, default=lm.Config.depth)
    parser.add_argument("--context", type=int, default=lm.Config.context)
    parser.add_argument("--steps", type=int, default=char_lm.Training.steps)
    parser.add_argument("--eval-windows", type=int, default=1024)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "jquant" / "char_lm")
    args = parser.parse_args(argv)

    config = lm.Config(args.width, args.depth, args.context)
    splits = lm.stdlib_splits()
    params, _ = char_lm.trained_params(config, char_lm.Training(args.steps), splits["train"].data, args.cache, False)
    eval_windows = lm.windows(splits["evaluation"].data, config.context, args.eval_windows)
    calib = lm.windows(splits["calibration"].data, config.context, args.calib_windows)
    batches = [(jnp.asarray(calib[i:i + 32, :-1]),) for i in range(0, len(calib), 32)]

    results = []  # (label, bits/weight, perplexity)
    for name, spec in CANDIDATES.items():
        policy = char_lm.kernel_policy(spec)
        qtree = jquant.quantize_params(params, policy)
        bits = jquant.report(params, qtree, policy).quantized_bits_per_weight
        results.append((f"uniform {name}", bits, char_lm.perplexity(jquant.dequantize_params(qtree), eval_windows)))
        print(f"| {results[-1][0]} | {bits:.2f} | {results[-1][2]:.3f} |", flush=True)
    float_ppl = char_lm.perplexity(params, eval_windows)

    searched = []
    for budget in args.budgets:
        start = time.perf_counter()
        policy, table = jquant.search_policy(lm.forward, params, batches, budget, list(CANDIDATES.values()),
                                             include=BLOCK_KERNELS, distance=kl_divergence)
        qtree = jquant.quantize_params(params, policy)
        ppl = char_lm.perplexity(jquant.dequantize_params(qtree), eval_windows)
        counts = {name: sum(table.candidates[r.chosen] == spec for r in table.rows)
                  for name, spec in CANDIDATES.items()}
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
