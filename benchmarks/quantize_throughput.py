"""Throughput of quantize_params on a large tree, against a jitted elementwise pass (the ceiling).

Run: python benchmarks/quantize_throughput.py [--quick]
Tree: `--leaves` kernels of 4096 x 4096 float32 (64 MiB each; 16 by default = 1 GiB; --quick: 4).
GB/s = input float bytes / wall time (median of repeats, after one warm-up call).
Rows:
  copy ceiling          jit(tree_map(x * 2)): reads and writes every float once
  eager, per leaf       quantize_params(params, policy) called eagerly (one compiled program per leaf shape)
  jit, whole tree       jit(quantize_params, static policy)
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jquant
from jquant import Policy, QuantSpec, Rule


def median_s(fn, arg, repeats):
    jax.block_until_ready(fn(arg))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--leaves", type=int, default=None)
    args = parser.parse_args()
    leaves = args.leaves or (4 if args.quick else 16)
    repeats = 3 if args.quick else 5
    keys = jax.random.split(jax.random.key(0), leaves)
    params = {f"layer_{i}": {"kernel": jax.random.normal(k, (4096, 4096), jnp.float32)} for i, k in enumerate(keys)}
    gbytes = leaves * 4096 * 4096 * 4 / 1e9
    policies = {
        "int8 per-channel": Policy([Rule(r".*kernel", QuantSpec(8, channel_axes=(-1,)))]),
        "int4 asym g128": Policy([Rule(r".*kernel", QuantSpec(4, symmetric=False, channel_axes=(-1,), group_size=128))]),
    }
    print(f"jax {jax.__version__} on {jax.default_backend()}; tree: {leaves} x (4096, 4096) float32 = {gbytes:.2f} GB")
    ceiling = gbytes / median_s(jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x * 2, t)), params, repeats)
    print("| pass | GB/s | fraction of ceiling |")
    print("|---|---|---|")
    print(f"| copy ceiling (x * 2) | {ceiling:.2f} | 1.00 |")
    for name, policy in policies.items():
        eager = gbytes / median_s(lambda p: jquant.quantize_params(p, policy), params, repeats)
        jitted = gbytes / median_s(jax.jit(lambda p: jquant.quantize_params(p, policy)), params, repeats)
        print(f"| {name}, eager per leaf | {eager:.2f} | {eager / ceiling:.2f} |")
        print(f"| {name}, jit whole tree | {jitted:.2f} | {jitted / ceiling:.2f} |", flush=True)


if __name__ == "__main__":
    main()
