"""Table: the integer conv_general_dilated against float, at ResNet-like shapes.

Run: python benchmarks/conv_paths.py [--quick]
Shapes: batch N, H×W input, C → O features, k×k kernel, stride, feature groups; channels-last
(`nn.Conv`'s NHWC / HWIO) unless the row says NCHW. Columns (milliseconds, ratio to f32):
  f32         float32 `lax.conv_general_dilated` (what every ratio divides by)
  bf16        bf16 × bf16 → f32 on pre-cast operands
  raw int8    `lax.conv_general_dilated(int8, int8, preferred_element_type=int32)`, nothing else
  jquant      `jquant.conv_general_dilated(QArray, QArray)` (pre-quantized operands): the chosen
              route + zero-point corrections + scales
  W8A8 served `jquant.conv_general_dilated(float x, QArray w, lhs_spec=int8 asymmetric)`: the
              activation quantized in the same call (what `QuantConv` serves)
  route       the route `jquant/_src/conv.py` chose for the float result ("int": int8 conv → int32;
              "dot": a 1×1 kernel as one int8 matrix product; "taps": one input feature per group
              (depthwise), an int32 sum over the kernel's taps; "float" / "float dot": the
              dequantized operands in one f32 conv / dot)
All candidates of a shape are timed in alternating rounds (median), so their ratios share the
machine's slow and fast phases.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jquant
from common import Table, interleaved_ms, standalone
from jquant._src import conv as conv_module

ACT = jquant.QuantSpec(8, symmetric=False)
NOTES = [
    "XLA:CPU runs int8 × int8 → int32 convolutions fast (YNNPACK) only channels-last with input "
    "features per group a multiple of 4. With 2, 3, 5 or 6 input features (an RGB stem) or another layout "
    "(NCHW: 45–70× f32) the int8 kernel is a slow generic one, so jquant convolves the dequantized "
    "operands in float32 there (the QAT forward's numbers).",
    "A depthwise conv (one input feature per group) is slow in XLA:CPU in f32 and int8 alike (a generic "
    "loop); jquant sums its kernel's taps instead — the shifted centred int8 input times each tap's "
    "kernel row, accumulated in int32, which XLA fuses into one elementwise loop: exact, and a few "
    "percent of the f32 conv's time.",
    "The int8 kernel's float result costs one more pass over the output than the f32 conv (the int32 "
    "accumulator written, read back, corrected and scaled), so it is taken only from 128 taps per output "
    "(kernel window × input features); fewer taps take the float route. A 1×1 kernel runs as a matrix "
    "product (int8, or f32 below 128 taps): XLA:CPU's f32 1×1 conv is slower than the same dot "
    "(`jquant/_src/conv.py`, module docstring, \"Routes\").",
    "jquant's cost over raw int8 is the scale multiply and, for an asymmetric activation, the "
    "zero-point correction (the kernel's sums over the taps inside the input, a batch-free map); W8A8 "
    "served adds the activation's quantization pass (min/max, round, cast), which no route avoids.",
]


def shapes(quick: bool):
    """(N, H, C, O, k, stride, groups, layout)."""
    rows = [(8, 56, 64, 64, 3, 1, 1, "NHWC"), (8, 28, 128, 128, 3, 1, 1, "NHWC"),
            (8, 14, 256, 256, 3, 1, 1, "NHWC"), (8, 7, 512, 512, 3, 1, 1, "NHWC"),
            (8, 56, 64, 256, 1, 1, 1, "NHWC"), (8, 56, 64, 128, 3, 2, 1, "NHWC"),
            (8, 224, 3, 64, 7, 2, 1, "NHWC"), (8, 56, 64, 64, 3, 1, 64, "NHWC"), (8, 28, 128, 128, 5, 1, 128, "NHWC"),
            (8, 28, 128, 128, 3, 1, 4, "NHWC"), (8, 28, 128, 128, 3, 1, 1, "NCHW"),
            (1, 56, 64, 64, 3, 1, 1, "NHWC")]
    return rows[:3] + rows[6:9] if quick else rows


def run(quick: bool) -> Table:
    rounds, repeats = (1, 3) if quick else (5, 3)  # more rounds: alternation spreads a shared machine's phases
    table = Table("Integer conv_general_dilated vs float: ms (ratio to f32)",
                  ["N", "H×W", "C→O", "k", "stride", "groups", "layout", "f32", "bf16", "raw int8", "jquant",
                   "W8A8 served", "route"])
    rng = np.random.default_rng(0)
    for n, h, c, o, k, s, g, layout in shapes(quick):
        dn = ("NHWC", "HWIO", "NHWC") if layout == "NHWC" else ("NCHW", "OIHW", "NCHW")
        xs = (n, h, h, c) if layout == "NHWC" else (n, c, h, h)
        ws = (k, k, c // g, o) if layout == "NHWC" else (o, c // g, k, k)
        wspec = jquant.QuantSpec(8, channel_axes=(dn[1].index("O"),))
        x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
        w = jnp.asarray(rng.standard_normal(ws), jnp.float32)
        xq, wq = jquant.quantize(x, ACT), jquant.quantize(w, wspec)
        conv = lambda fn, **kw: jax.jit(lambda a, b: fn(a, b, (s, s), "SAME", dimension_numbers=dn,
                                                         feature_group_count=g, **kw))
        f32 = conv(lax.conv_general_dilated)
        bf16 = conv(lax.conv_general_dilated, preferred_element_type=jnp.float32)
        raw = conv(lax.conv_general_dilated, preferred_element_type=jnp.int32)
        ours = conv(jquant.conv_general_dilated)
        served = conv(jquant.conv_general_dilated, lhs_spec=ACT)
        times = interleaved_ms([f32, bf16, raw, ours, served],
                               [(x, w), (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)), (xq.value, wq.value),
                                (xq, wq), (x, wq)], rounds=rounds, repeats=repeats)
        route = conv_module._route(xq, wq, lax.conv_dimension_numbers(xs, ws, dn), g, exact=False)
        base = times[0]
        table.add(n, f"{h}×{h}", f"{c}→{o}", k, s, g, layout, f"{base:.2f}",
                  *[f"{t:.2f} ({t / base:.2f}x)" for t in times[1:]], route)
    table.notes = NOTES + [_targets(table)]
    return table


def _targets(table: Table) -> str:
    """Target: jquant and W8A8 served ≤ 1.1 × f32 at every shape."""
    worst = max(table.rows, key=lambda r: _ratio(r[10]))
    served = max(table.rows, key=lambda r: _ratio(r[11]))
    met = _ratio(worst[10]) <= 1.1 and _ratio(served[11]) <= 1.1
    return (f"Target jquant and W8A8 served ≤ 1.1× f32 at every shape: {'met' if met else 'NOT met'} (jquant worst "
            f"{_ratio(worst[10]):.2f}× at {worst[2]} {worst[1]} groups {worst[5]} {worst[6]}; served worst "
            f"{_ratio(served[11]):.2f}× at {served[2]} {served[1]} groups {served[5]} {served[6]}).")


def _ratio(cell: str) -> float:
    return float(cell.split("(")[1].rstrip("x)"))


if __name__ == "__main__":
    standalone(run, __doc__)
