"""The FP8 × FP8 dot's paths on this backend: latency of x̂ · ŵ for a 4096 × 4096 fp8_e4m3 weight
(a float32 scale per output channel) and an fp8_e4m3 activation (a scale per token).

Run: python benchmarks/fp8_dot.py [--quick]
Paths (`jquant._src.float_dot.dot_general(..., path=...)`): "elements" — `lax.dot_general` on the
float8 elements with `preferred_element_type=float32`, the scales multiplied once after it (what
GPU/TPU FP8 units run); "weight_only" — the activation dequantized, the weight through the
weight-only dot (decoded 512 rows at a time inside a `lax.scan`); "dequantized" — both operands
dequantized, one float32 dot. Beside them: the float32 dot of float32 operands. Median ms under
`jax.jit`, candidates timed in alternating rounds. The path `jquant.dot_general` takes by default
is the fastest measured here for the backend (`float_dot`'s docstring quotes the numbers).
"""

import jax

import jquant
from common import Table, interleaved_ms, standalone
from jquant._src import float_dot

K = N = 4096
DN = (((1,), (0,)), ((), ()))
PATHS = ("elements", "weight_only", "dequantized")


def run(quick: bool) -> Table:
    rounds, repeats = (1, 3) if quick else (2, 5)
    rows = (1, 256) if quick else (1, 16, 64, 256)
    table = Table(f"FP8 × FP8 dot paths on {jax.default_backend()}, ({K}, {N}) weight: median ms",
                  ["M", "float32 dot", *PATHS, "default path"])
    w_float = jax.random.normal(jax.random.key(0), (K, N)) * 0.05
    w = jquant.quantize(w_float, jquant.QuantSpec(8, channel_axes=(1,), method="fp8_e4m3"))
    dot = jax.jit(lambda a, b: a @ b)
    paths = [jax.jit(lambda a, b, p=p: float_dot.dot_general(a, b, DN, path=p)) for p in PATHS]
    default = jax.jit(lambda a, b: jquant.dot_general(a, b, DN))
    for m in rows:
        x_float = jax.random.normal(jax.random.key(m), (m, K))
        x = jquant.quantize(x_float, jquant.QuantSpec(8, channel_axes=(0,), method="fp8_e4m3"))
        ms = interleaved_ms([dot, *paths, default], [(x_float, w_float)] + [(x, w)] * (len(PATHS) + 1),
                            rounds=rounds, repeats=repeats)
        table.add(m, *(f"{t:.1f}" for t in ms))
    table.notes = ["XLA:CPU has no FP8 GEMM: it converts float8 operands to float32 element by element "
                   "before the dot, which costs more than the dot at these sizes; the weight-only path decodes "
                   "the weight a chunk at a time while it is in cache."]
    return table


if __name__ == "__main__":
    standalone(run, __doc__)
