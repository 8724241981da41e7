"""Calibration time: quantizing one 4096 × 4096 weight with MinMax, MSE() and HQQ() calibration.

Run: python benchmarks/calibration_time.py [--quick]
Weight: a float32 Dense kernel (in, out) = (4096, 4096) drawn from a Student t with 4 degrees of
freedom times 0.02 (heavy-tailed, like trained weights), quantized asymmetric, one scale and
zero-point per output channel and group of 128 inputs, by `jax.jit(jquant.quantize)`. ms = median
wall time of the compiled call (the candidates of a row timed in alternating rounds, after a
warm-up call that compiles); SQNR = 10·log10(Σw² / Σ(w − ŵ)²) of the dequantized weight.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import jquant
from common import Table, interleaved_ms, standalone

SIZE, GROUP = 4096, 128
CALIBRATIONS = (jquant.MinMax(), jquant.MSE(), jquant.HQQ())
NOTES = [
    "MSE() scores 100 candidate clip ratios (one fake-quantization pass over the weight each); HQQ() "
    "runs 20 half-quadratic iterations, each of which scores the current grid, shrinks the error and "
    "fits scale and zero-point by least squares (a few passes over the weight, |r|^p computed once as "
    "exp(p·log|r|)). Both are one `fori_loop` under jit, so their time grows with the weight's size "
    "and the number of passes, not with the number of groups.",
    "Calibration runs once per weight, offline: a 7B-parameter model holds about 400 times a 4096² "
    "weight's parameters.",
]


def run(quick: bool) -> Table:
    rounds, repeats = (1, 2) if quick else (5, 2)
    bit_widths = (4,) if quick else (4, 3, 2)
    w = jnp.asarray(np.random.default_rng(0).standard_t(4, (SIZE, SIZE)) * 0.02, jnp.float32)
    table = Table(f"Calibration time per {SIZE}² float32 weight (asymmetric, g{GROUP}, jit)",
                  ["bits", "calibration", "ms", "vs MinMax", "SQNR dB"])
    for bits in bit_widths:
        base = jquant.QuantSpec(bits, symmetric=False, channel_axes=(1,), group_size=GROUP)
        specs = [dataclasses.replace(base, calibration=c) for c in CALIBRATIONS]
        fns = [jax.jit(lambda v, spec=spec: jquant.quantize(v, spec)) for spec in specs]
        ms = interleaved_ms(fns, [(w,)] * len(fns), rounds=rounds, repeats=repeats)
        for spec, fn, t in zip(specs, fns, ms):
            w_hat = np.asarray(fn(w).dequantize(), np.float64)
            w64 = np.asarray(w, np.float64)
            sqnr = 10 * np.log10(np.sum(w64 ** 2) / np.sum((w64 - w_hat) ** 2))
            table.add(bits, repr(spec.calibration), f"{t:.0f}", f"{t / ms[0]:.0f}x", f"{sqnr:.2f}")
    table.notes = list(NOTES)
    return table


if __name__ == "__main__":
    standalone(run, __doc__)
