"""Table 4: weight-only inference, latency and weight memory, float vs jquant vs Qwix.

Run: python benchmarks/weight_only.py [--quick]
Model: a Linen MLP 4096-4096-4096-4096-4096 (4 Dense kernels of 4096², 268 MB in float32), served
under `jax.jit` with quantized weights and float activations: jquant `quantize_params` + the
wrapped model (on CPU a QArray kernel is taken a few rows at a time inside the dot, see
`jquant/_src/dot.py`), Qwix `quantize_params` + its PTQ model. Temporaries: the compiled
forward's `memory_analysis().temp_size_in_bytes` (a float copy of one kernel would be 67 MB). Schemes: int8 per output channel; int4 symmetric, groups of 128 per output channel.
Latency: median ms of one forward pass, candidates timed in alternating rounds. Bytes: every
array of the served parameter tree (scales and biases included; Qwix's `jnp.int4` counted at 4
bits).
"""

import jax
import jax.numpy as jnp

import jquant
from common import NOT_INSTALLED, Table, interleaved_ms, standalone, tree_bytes
from models import Mlp
from peers import Scheme, qwix_ptq

WIDTH = 4096
SCHEMES = (Scheme("int8", 8), Scheme("int4 g128", 4, group=128))
NOTES = [
    "Weight-only serving turns the stored integers back into float weights inside the compiled "
    "forward; the float matmul then runs as before. Memory shrinks 4× (int8) and ~7.5× (int4); "
    "speed depends on whether the conversion costs less than the float weight bytes it saves.",
    "Converting a whole 4096² int8 kernel to float32 on XLA:CPU costs several times the f32 dot at "
    "small batch (Qwix pays that). jquant converts a few rows at a time inside a `lax.scan` while "
    "they are in cache and never holds a float copy of the weight (chunks of 512 rows here, 256 "
    "at batch 256, where the float chunk beside the batch's accumulator would otherwise pass a quarter "
    "of the float kernel). "
    "Sub-byte codes packed along the output axis are decoded by bit planes (the columns of each "
    "nibble multiplied on their own, the outputs interleaved), never shuffled.",
]


def run(quick: bool) -> Table:
    rounds, repeats = (1, 3) if quick else (2, 5)
    batches = (1, 64) if quick else (1, 16, 64, 256)
    model = Mlp(width=WIDTH, depth=3, out=WIDTH)
    table = Table("Weight-only inference: latency ms and weight MB (ratio to float)",
                  ["scheme", "batch", "float ms", "jquant ms", "Qwix ms", "float MB", "jquant MB", "Qwix MB",
                   "temporaries MB float / jquant / Qwix"])
    x1 = jnp.ones((1, WIDTH))
    params = model.init(jax.random.key(0), x1)
    float_mb = tree_bytes(params) / 1e6
    forward = jax.jit(model.apply)
    for scheme in SCHEMES:
        served = jquant.quantize_params(params, scheme.jquant_policy())
        ours = jax.jit(jquant.flax.quantize(model, scheme.jquant_policy()).apply)
        qwix = qwix_ptq(model, scheme, x1)
        if qwix is not None:
            ptq, quantize = qwix
            qwix_params = {"params": quantize(params["params"])}
            theirs = jax.jit(ptq.apply)
        for batch in batches:
            x = jax.random.normal(jax.random.key(batch), (batch, WIDTH))
            fns, args = [forward, ours], [(params, x), (served, x)]
            if qwix is not None:
                fns.append(theirs)
                args.append((qwix_params, x))
            times = interleaved_ms(fns, args, rounds=rounds, repeats=repeats)
            base = times[0]
            cells = [f"{t:.2f} ({t / base:.2f}x)" for t in times[1:]] + ([NOT_INSTALLED] if qwix is None else [])
            mbytes = [tree_bytes(served) / 1e6] + ([tree_bytes(qwix_params) / 1e6] if qwix is not None else [])
            mb_cells = [f"{b:.1f} ({b / float_mb:.3f}x)" for b in mbytes] + ([NOT_INSTALLED] if qwix is None else [])
            temps = [_temporaries(fn, *a) for fn, a in zip(fns, args)] + ([NOT_INSTALLED] if qwix is None else [])
            table.add(scheme.name, batch, f"{base:.2f}", *cells, f"{float_mb:.1f}", *mb_cells, " / ".join(temps))
    table.notes = NOTES + [_targets(table)]
    return table


def _temporaries(fn, *args) -> str:
    return f"{fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 1e6:.1f}"


def _targets(table: Table) -> str:
    """Targets: jquant ≤ 1.0× the float latency at batch ≤ 64 and ≤ 1.1× at 256; compiled
    temporaries under a quarter of one float kernel (16.8 MB); int4 weights ≤ 0.15× float bytes."""
    ratio = lambda cell: float(cell.split("(")[1].rstrip("x)"))
    slow = [f"{r[0]} batch {r[1]} ({ratio(r[3]):.2f}x)" for r in table.rows
            if ratio(r[3]) > (1.1 if int(r[1]) >= 256 else 1.0)]
    big = [f"{r[0]} batch {r[1]}" for r in table.rows if float(r[8].split(" / ")[1]) >= WIDTH * WIDTH * 4 / 4 / 1e6]
    int4 = max(ratio(r[6]) for r in table.rows if r[0].startswith("int4"))
    verdict = lambda misses: "met" if not misses else "NOT met: " + ", ".join(misses)
    return (f"Targets: latency ≤ 1.0× float at batch ≤ 64, ≤ 1.1× at 256: {verdict(slow)}; jquant temporaries "
            f"< ¼ float kernel: {verdict(big)}; int4 weights ≤ 0.15× float bytes: "
            f"{verdict([] if int4 <= 0.15 else [f'{int4:.3f}x'])}.")


if __name__ == "__main__":
    standalone(run, __doc__)
