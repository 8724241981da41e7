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
ratio to the float step (medians over 300 steps of each, timed alternately, same batch;
`--timing-steps`). Data, training loop and timer: `_common.py`.
Below the table, for the served Linen CNN: how many int8 × int8 → int32 convolutions its served
program (jaxpr) runs, per policy with an activation spec — the first of its two convs has one
input feature (9 taps), where jquant convolves the dequantized operands in float32 instead
(`jquant/_src/conv.py`, "Routes").
"""

from __future__ import annotations

import argparse
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import jquant
from _common import classifier_loss, digits, fit, interleaved_ms, minibatches, optimizer_step
from jquant import Policy, QuantSpec, Rule

KERNEL = r".*kernel"
POLICIES = {
    "W8A8": Policy([Rule(KERNEL, QuantSpec(8, channel_axes=(-1,)), act=QuantSpec(8))]),
    "W4 weight-only": Policy([Rule(KERNEL, QuantSpec(4, symmetric=False, channel_axes=(-1,)))]),
    "W2A8": Policy([Rule(KERNEL, QuantSpec(2, symmetric=False, channel_axes=(-1,)), act=QuantSpec(8))]),
    "W1A8 (sign)": Policy([Rule(KERNEL, QuantSpec(1, method="sign", channel_axes=(-1,)), act=QuantSpec(8))]),
    "FP8 W8A8 (e4m3)": jquant.fp8_w8a8(),
    # MX/NV blocks run along a Dense kernel's input axis (rank 2); the CNN's conv kernels (1 and 16
    # input features: no block of 16 or 32 fits) keep an explicit int8 per-channel rule (optional: the
    # MLPs have none)
    "MXFP4 weight-only": Policy([Rule(KERNEL, QuantSpec(4, method="mxfp4", group_size=32, channel_axes=(-1,)), ndim=2),
                                 Rule(KERNEL, QuantSpec(8, channel_axes=(-1,)), ndim=4, optional=True)]),
    "NVFP4 weight-only": Policy([Rule(KERNEL, QuantSpec(4, method="nvfp4", group_size=16, channel_axes=(-1,)), ndim=2),
                                 Rule(KERNEL, QuantSpec(8, channel_axes=(-1,)), ndim=4, optional=True)]),
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


def train(forward, params, x, y, epochs, on_step):
    """Adam on the cross-entropy of `forward(params, x)`; returns (params, one more train step as a
    call without arguments, for timing)."""
    optimizer = optax.adam(1e-3)
    step = optimizer_step(classifier_loss(forward), optimizer)
    params, opt_state, _ = fit(step, params, optimizer.init(params), minibatches(x, y, BATCH, epochs, seed=1), on_step)
    return params, functools.partial(step, params, opt_state, (x[:BATCH], y[:BATCH]))


def int8_convolutions(jaxpr) -> int:
    """How many int8 × int8 convolutions a (closed) jaxpr runs, nested jaxprs included."""
    count = 0
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        count += eqn.primitive.name == "conv_general_dilated" and all(v.aval.dtype == jnp.int8 for v in eqn.invars)
        count += sum(int8_convolutions(p) for p in eqn.params.values() if hasattr(p, "eqns") or hasattr(p, "jaxpr"))
    return count


def model_bytes(tree) -> int:
    """Stored bytes of every array of `tree`, a QArray's scales and zero-points included."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda leaf: isinstance(leaf, jquant.QArray))
    return sum(leaf.nbytes for leaf in leaves)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15, help="float training epochs (QAT fine-tunes for as many)")
    parser.add_argument("--timing-steps", type=int, default=300, help="train steps timed per model and policy")
    parser.add_argument("--policies", default=None, help="regex: run only the policies whose name it matches")
    args = parser.parse_args()
    policies = {name: policy for name, policy in POLICIES.items()
                if args.policies is None or re.search(args.policies, name)}
    (x_train, y_train), (x_test, y_test) = digits(images=True)
    runners = {"Linen MLP": LinenRunner(LinenMLP()), "Linen CNN": LinenRunner(LinenCNN()),
               "NNX MLP": NnxRunner(lambda: NnxMLP(nnx.Rngs(0)))}
    table = Table(title=f"digits: {len(x_train)} train / {len(x_test)} test, {args.epochs} epochs float + "
                        f"{args.epochs} epochs QAT, batch {BATCH}, jax {jax.__version__} on {jax.default_backend()}")
    for col in ("model", "policy", "PTQ acc", "QAT acc (served)", "served=QAT argmax", "max |served-QAT|",
                "bytes", "step / float step"):
        table.add_column(col, justify="left" if col in ("model", "policy") else "right")

    def accuracy(logits):
        return float(np.mean(np.argmax(np.asarray(logits), -1) == y_test))

    served_convs = []
    total = len(runners) * (1 + len(policies)) * args.epochs * (len(x_train) // BATCH)
    with Progress(transient=True) as progress:
        task = progress.add_task("training", total=total)
        advance = lambda i, losses: progress.advance(task)
        for name, runner in runners.items():
            progress.update(task, description=f"{name}: float")
            init = runner.init(x_train)
            float_forward = runner.forward(init, None)
            float_params, float_step = train(float_forward, init, x_train, y_train, args.epochs, advance)
            table.add_row(name, "float32", "-", f"{accuracy(jax.jit(float_forward)(float_params, x_test)):.3f}",
                          "-", "-", f"{model_bytes(float_params):,}", "1.00")
            for policy_name, policy in policies.items():
                progress.update(task, description=f"{name}: {policy_name} QAT")
                qat_forward = runner.forward(float_params, policy)
                # one jitted function serves the float tree (QAT logits) and the quantized trees of
                # PTQ and QAT (served logits): two compilations per policy, not three
                logits = jax.jit(qat_forward)
                ptq = accuracy(logits(jquant.quantize_params(float_params, policy), x_test))
                qat_params, qat_step = train(qat_forward, float_params, x_train, y_train, args.epochs, advance)
                float_ms, qat_ms = interleaved_ms([float_step, qat_step], [(), ()], rounds=args.timing_steps,
                                                  repeats=1)
                served_params = jquant.quantize_params(qat_params, policy)
                qat_logits, served = logits(qat_params, x_test), logits(served_params, x_test)
                agree = float(np.mean(np.argmax(np.asarray(served), -1) == np.argmax(np.asarray(qat_logits), -1)))
                diff = float(jnp.max(jnp.abs(served - qat_logits)))
                table.add_row("", policy_name, f"{ptq:.3f}", f"{accuracy(served):.3f}", f"{agree:.3f}", f"{diff:.1e}",
                              f"{model_bytes(served_params):,}", f"{qat_ms / float_ms:.2f} ({qat_ms:.2f} ms)")
                if name == "Linen CNN" and policy.rules[0].act is not None:
                    int8 = int8_convolutions(jax.make_jaxpr(qat_forward)(served_params, x_test))
                    served_convs.append(f"  {policy_name}: {int8} int8 × int8 → int32 convolution(s); served = QAT "
                                        f"argmax {agree:.3f}, max |served − QAT| {diff:.1e}")
            table.add_section()
    Console(width=140).print(table)
    print("Linen CNN served (2 conv layers; the first, one input feature and 9 taps, convolves the dequantized "
          "operands in float32):")
    print("\n".join(served_convs))


if __name__ == "__main__":
    main()
