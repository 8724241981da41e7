"""Integer dot_general vs float on this machine: a table of milliseconds and ratios to f32.

Run: python benchmarks/dot_paths.py [--quick]
Shapes (M, K, N): lhs (M, K) activations, rhs (K, N) weights (a Dense kernel). Columns:
  f32        float32 x float32 lax.dot_general (the baseline every ratio divides by)
  bf16       bf16 x bf16 -> f32 on pre-cast operands
  raw_int8   lax.dot_general(int8, int8, preferred_element_type=int32) on the same layout, no padding
  jquant     jquant.dot_general(QArray, QArray): int path + scales (both operands pre-quantized)
  jquant_dyn jquant.dot_general(float lhs, QArray rhs, lhs_spec=int8 per-row): dynamic quantization
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jquant

DN = (((1,), (0,)), ((), ()))


def median_ms(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    args = parser.parse_args()
    repeats = 10 if args.quick else 30
    shapes = [(1, 4096, 4096), (8, 4096, 4096), (512, 1024, 1024)] if args.quick else [
        (1, 4096, 4096), (2, 4096, 4096), (8, 4096, 4096), (64, 4096, 4096), (512, 1024, 1024),
        (2048, 2048, 2048), (1, 4096, 11008)]
    act_spec = jquant.QuantSpec(8, channel_axes=(0,))
    w_spec = jquant.QuantSpec(8, channel_axes=(1,))
    f32 = jax.jit(lambda a, b: lax.dot_general(a, b, DN))
    bf16 = jax.jit(lambda a, b: lax.dot_general(a, b, DN, preferred_element_type=jnp.float32))
    raw = jax.jit(lambda a, b: lax.dot_general(a, b, DN, preferred_element_type=jnp.int32))
    jq = jax.jit(lambda a, b: jquant.dot_general(a, b, DN))
    jq_dyn = jax.jit(lambda a, b: jquant.dot_general(a, b, DN, lhs_spec=act_spec))
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    print("| M | K | N | f32 ms | bf16 | raw int8 | jquant | jquant dynamic |")
    print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for m, k, n in shapes:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        xq, wq = jquant.quantize(x, act_spec), jquant.quantize(w, w_spec)
        base = median_ms(f32, x, w, repeats=repeats)
        cols = [median_ms(bf16, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), repeats=repeats),
                median_ms(raw, xq.value, wq.value, repeats=repeats),
                median_ms(jq, xq, wq, repeats=repeats),
                median_ms(jq_dyn, x, wq, repeats=repeats)]
        cells = " | ".join(f"{c:.2f} ({c / base:.2f}x)" for c in cols)
        print(f"| {m} | {k} | {n} | {base:.2f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
