"""Table 2: QAT train-step time, float vs jquant vs Qwix vs AQT on the same Linen models.

Run: python benchmarks/qat_step.py [--quick]
Models (`models.py`): an MLP 1024-1536-1536-10 (batch = rows) and a transformer block (width 256,
4 heads, 64 tokens; batch = tokens, i.e. batch / 64 sequences). Step: `value_and_grad` of a mean
squared output + `optax.adam` update, jitted; all candidates of one (model, batch) are timed in
alternating rounds (median). Schemes (`peers.py`): W8A8 (int8 weights and dynamic int8
activations, fake-quantized, straight-through gradients) and W4 weight-only (symmetric, groups of
64 along the contraction for jquant and Qwix; per channel for AQT).
"""

import jax
import jax.numpy as jnp
import optax

import jquant
from common import NOT_INSTALLED, Table, interleaved_ms, standalone
from models import Block, Mlp
from peers import Scheme, aqt_model, qwix_qat

SCHEMES = (Scheme("W8A8", 8, act=True), Scheme("W4 weight-only", 4, group=64))
SEQ = 64
NOTES = [
    "Weights are quantized alike (symmetric, per channel or per group of 64; AQT's int4 per "
    "channel); activations as each library's W8A8 does: jquant per tensor, Qwix and AQT per token.",
    "Qwix recognises a weight by tracing it back to the module's params and, where it cannot (under "
    "`grad`), by its shape: an activation shaped like a kernel (batch 1024 into a 1024 × 1024 Dense) "
    "stops it ('lhs and rhs cannot be both weights'), hence the MLP's width of 1536.",
    "W8A8: Qwix's QAT forward is a real int8 × int8 dot with a custom VJP (its `dot_general_qt`), "
    "and so is jquant's (`QuantDot` runs the integer path forward and takes the fake-quantized "
    "float dot's derivatives, a custom JVP); this CPU's int8 GEMM is 0.5–0.75× the f32 time "
    "(table 3), so a W8A8 step can beat float. Weight-only W4 fake-quantizes the weight and runs a "
    "float dot in all three libraries.",
    "Small steps (a few ms) are dominated by the fixed cost of the extra quantization ops per "
    "layer; from batch 1024 the matmuls dominate and the ratios approach 1.",
]


def _cases(quick: bool):
    batches = (64, 1024) if quick else (64, 1024, 8192)
    for batch in batches:
        yield "MLP", Mlp(width=1536, depth=2), batch, (batch, 1024)
    for batch in batches:
        yield "transformer block", Block(), batch, (max(batch // SEQ, 1), SEQ, 256)


def _step(apply, rngs=None):
    """A jitted train step: adam on mean(apply(params, x)²); returns (params, opt_state, loss)."""
    optimizer = optax.adam(1e-3)
    kwargs = {} if rngs is None else {"rngs": rngs}

    @jax.jit
    def step(params, opt_state, x):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(apply(p, x, **kwargs) ** 2))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, optimizer


def run(quick: bool) -> Table:
    libs = ("jquant", "Qwix", "AQT")
    columns = ["model", "batch", "scheme", "float ms"] + [f"{lib} ms (× float)" for lib in libs] + ["jquant / Qwix"]
    table = Table("QAT train step: ms (ratio to the float step)", columns)
    for name, model, batch, shape in _cases(quick):
        x = jax.random.normal(jax.random.key(1), shape)
        params = model.init(jax.random.key(0), x)
        applies = [("float", model.apply, None)]
        for scheme in SCHEMES:
            aqt = aqt_model(model, scheme)
            qwix = qwix_qat(model, scheme)
            applies += [(scheme.name, jquant.flax.quantize(model, scheme.jquant_policy()).apply, None),
                        (scheme.name, None if qwix is None else qwix.apply, None),
                        (scheme.name, None if aqt is None else aqt.apply, {"params": jax.random.key(2)})]
        present = [(apply, rngs) for _, apply, rngs in applies if apply is not None]
        fns, args = [], []
        for apply, rngs in present:
            step, optimizer = _step(apply, rngs)
            fns.append(step)
            args.append((params, optimizer.init(params), x))
        # steps of up to ~0.1 s: 10–16 samples each, in many short rounds, so that a slow phase of the
        # shared machine falls on every candidate alike; the 1 s steps of batch 8192: 6
        rounds, repeats = (2, 3) if batch > 1024 else ((5, 2) if quick else (8, 2))
        measured = iter(interleaved_ms(fns, args, rounds=rounds, repeats=repeats))
        times = [None if apply is None else next(measured) for _, apply, _ in applies]
        base = times[0]
        for i, scheme in enumerate(SCHEMES):
            ours, qwix, aqt = times[1 + 3 * i: 4 + 3 * i]
            cells = [NOT_INSTALLED if t is None else f"{t:.2f} ({t / base:.2f}x)" for t in (ours, qwix, aqt)]
            table.add(name, batch, scheme.name, f"{base:.2f}", *cells, "-" if qwix is None else f"{ours / qwix:.2f}")
    table.notes = NOTES + [_targets(table)]
    return table


def _targets(table: Table) -> str:
    """Targets: jquant step ≤ 1.1 × Qwix's and ≤ 1.3 × float, at every row."""
    vs_float = [float(r[4].split("(")[1].rstrip("x)")) for r in table.rows]
    vs_qwix = [float(r[7]) for r in table.rows if r[7] != "-"]
    parts = [f"jquant ≤ 1.3× float: {'met' if max(vs_float) <= 1.3 else 'NOT met'} (worst {max(vs_float):.2f}×, "
             f"{sum(v <= 1.3 for v in vs_float)}/{len(vs_float)} rows)"]
    if vs_qwix:
        parts.append(f"jquant ≤ 1.1× Qwix: {'met' if max(vs_qwix) <= 1.1 else 'NOT met'} (worst {max(vs_qwix):.2f}×, "
                     f"{sum(v <= 1.1 for v in vs_qwix)}/{len(vs_qwix)} rows)")
    return "Targets: " + "; ".join(parts) + "."


if __name__ == "__main__":
    standalone(run, __doc__)
