"""QAT and PTQ on scikit-learn's digits with three unmodified Flax models: a table.

Run: python3 run.py demo   (or, inside the environment: python examples/digits_qat.py [--epochs N])

Models: a Linen MLP (64-256-256-10), a small Linen CNN (two 3x3 convs + Dense) and an NNX MLP.
Each is trained in float (optax adam), then for every policy:
  PTQ   the float params quantized by `quantize_params` and served through the wrapped model;
  QAT   the float params fine-tuned through `jquant.flax.quantize(model, policy)` (fake
        quantization, straight-through gradients, the same optax optimizer), then served
        from `quantize_params` (QArray kernels; W8A8 runs the int8×int8→int32 path).
Columns: held-out accuracy (PTQ, QAT served), argmax agreement of served vs QAT logits, the
max |served − QAT| logit difference, stored model bytes, and the QAT train step time as a
ratio to the float step (medians over 300 steps of each, timed alternately, same batch).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sklearn.datasets import load_digits

import jquant
from jquant import Policy, QuantSpec, Rule

KERNEL = r".*kernel"
POLICIES = {
    "W8A8": Policy([Rule(KERNEL, QuantSpec(8, channel_axes=(-1,)), act=QuantSpec(8))]),
    "W4 weight-only": Policy([Rule(KERNEL, QuantSpec(4, symmetric=False, channel_axes=(-1,)))]),
    "W2A8": Policy([Rule(KERNEL, QuantSpec(2, symmetric=False, channel_axes=(-1,)), act=QuantSpec(8))]),
    "W1A8 (sign)": Policy([Rule(KERNEL, QuantSpec(1, method="sign", channel_axes=(-1,)), act=QuantSpec(8))]),
}
BATCH = 64


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(256)(x))
        x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(10)(x)


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 256, rngs=rngs)
        self.out = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x.reshape(x.shape[0], -1))))


def load_data():
    """Digits scaled to [0, 1] as (N, 8, 8, 1) images; a fixed 80/20 split."""
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(0.8 * len(x))
    return (x[order[:cut]], data.target[order[:cut]]), (x[order[cut:]], data.target[order[cut:]])


class LinenRunner:
    """A Linen model (float or wrapped by a policy) as `forward(params, x) -> logits`."""

    def __init__(self, model):
        self.model = model

    def init(self, x):
        return self.model.init(jax.random.key(0), x[:1])["params"]

    def forward(self, params, policy):
        apply = self.model.apply if policy is None else jquant.flax.quantize(self.model, policy).apply
        return lambda p, x: apply({"params": p}, x)


class NnxRunner:
    """The same for an NNX model: params are the model's `nnx.Param` state."""

    def __init__(self, make_model):
        self.make_model = make_model

    def init(self, x):
        return nnx.state(self.make_model(), nnx.Param)

    def forward(self, params, policy):
        model = self.make_model()
        if policy is not None:
            jquant.flax.quantize(model, policy)
        nnx.update(model, params)
        graphdef, _ = nnx.split(model)
        return lambda p, x: nnx.merge(graphdef, p)(x)


def train(forward, params, x, y, epochs, progress, task):
    """Adam on the cross-entropy of `forward(params, x)`; returns (params, step timer)."""
    optimizer = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state, xb, yb):
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(forward(p, xb), yb).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    rng = np.random.default_rng(1)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x) - BATCH + 1, BATCH):
            idx = order[i:i + BATCH]
            params, opt_state, _ = step(params, opt_state, x[idx], y[idx])
        progress.advance(task)
    return params, functools.partial(step, params, opt_state, x[:BATCH], y[:BATCH])


def logits(runner, params, policy, x, served):
    """Logits under jit: QAT (float params) or served (`quantize_params`, QArray kernels)."""
    tree = jquant.quantize_params(params, policy) if served else params
    return jax.jit(runner.forward(params, policy))(tree, x)


def step_times_ms(float_step, qat_step, repeats=300):
    """Median milliseconds of two train steps, timed alternately so that drifts in the machine's
    speed hit both alike (sub-millisecond steps on a 2-core machine drift by tens of percent)."""
    times = {float_step: [], qat_step: []}
    for fn in times:
        jax.block_until_ready(fn())
    for _ in range(repeats):
        for fn, record in times.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            record.append(time.perf_counter() - start)
    return tuple(1e3 * float(np.median(times[fn])) for fn in (float_step, qat_step))


def model_bytes(params, policy) -> int:
    tree = params if policy is None else jquant.quantize_params(params, policy)
    return jquant.report(params, tree).bytes_after


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15, help="float training epochs (QAT fine-tunes for as many)")
    args = parser.parse_args()
    (x_train, y_train), (x_test, y_test) = load_data()
    runners = {"Linen MLP": LinenRunner(LinenMLP()), "Linen CNN": LinenRunner(LinenCNN()),
               "NNX MLP": NnxRunner(lambda: NnxMLP(nnx.Rngs(0)))}
    table = Table(title=f"digits: {len(x_train)} train / {len(x_test)} test, {args.epochs} epochs float + "
                        f"{args.epochs} epochs QAT, batch {BATCH}, jax {jax.__version__} on {jax.default_backend()}")
    for col in ("model", "policy", "PTQ acc", "QAT acc (served)", "served=QAT argmax", "max |served-QAT|",
                "bytes", "step / float step"):
        table.add_column(col, justify="left" if col in ("model", "policy") else "right")

    def accuracy(logits):
        return float(np.mean(np.argmax(np.asarray(logits), -1) == y_test))

    total = len(runners) * (1 + len(POLICIES)) * args.epochs
    with Progress(transient=True) as progress:
        task = progress.add_task("training", total=total)
        for name, runner in runners.items():
            progress.update(task, description=f"{name}: float")
            init = runner.init(x_train)
            float_params, float_step = train(runner.forward(init, None), init, x_train, y_train, args.epochs,
                                             progress, task)
            table.add_row(name, "float32", "-", f"{accuracy(logits(runner, float_params, None, x_test, False)):.3f}",
                          "-", "-", f"{model_bytes(float_params, None):,}", "1.00")
            for policy_name, policy in POLICIES.items():
                progress.update(task, description=f"{name}: {policy_name} QAT")
                ptq = accuracy(logits(runner, float_params, policy, x_test, served=True))
                qat_params, qat_step = train(runner.forward(float_params, policy), float_params, x_train, y_train,
                                             args.epochs, progress, task)
                float_ms, qat_ms = step_times_ms(float_step, qat_step)
                qat_logits = logits(runner, qat_params, policy, x_test, served=False)
                served = logits(runner, qat_params, policy, x_test, served=True)
                agree = float(np.mean(np.argmax(np.asarray(served), -1) == np.argmax(np.asarray(qat_logits), -1)))
                diff = float(jnp.max(jnp.abs(served - qat_logits)))
                table.add_row("", policy_name, f"{ptq:.3f}", f"{accuracy(served):.3f}", f"{agree:.3f}", f"{diff:.1e}",
                              f"{model_bytes(qat_params, policy):,}", f"{qat_ms / float_ms:.2f} ({qat_ms:.2f} ms)")
            table.add_section()
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
