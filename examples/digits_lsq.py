"""Learned quantization on scikit-learn's digits: plain STE QAT vs LSQ vs LSQ + PACT, a table.

Run (inside the environment): python examples/digits_lsq.py [--epochs N] [--seeds K]

An unmodified Linen MLP (64-32-32-10: narrow, so that 2-bit weights cost accuracy) is trained in
float (optax adam, 4x the fine-tune epochs), then fine-tuned under each low-bit policy (weights
per output channel, activations per tensor) by:
  STE         `jquant.flax.quantize(model, policy)` as is: weights fake-quantized on their
              absmax / min-max grid, activations on each batch's min/max, straight-through
              gradients (the existing QAT path);
  LSQ         the same wrapped model with learned weight steps (`jquant.learned`, the `lsq_step`
              collection), activations as in STE;
  LSQ + PACT  learned weight steps and learned activation clips (the `pact_clip` collection).
All three use the same float model, batches and weight optimizer; the steps and clips get their
own learning rate through `jquant.learned.optimizer` (optax.multi_transform). Accuracies are of the
served models (QArray kernels; LSQ from `learned.quantize_params`, PACT clips as static ranges from
`jquant.flax.learned_stats`) on 360 held-out digits, mean ± std over seeds (each seed: model init and batch
order). Data and training loop: `_common.py`.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax
from flax import linen as nn

import jquant
from _common import classifier_loss, digits, fit, minibatches, optimizer_step
from jquant import Policy, QuantSpec, Rule
from jquant import learned

KERNEL = r".*kernel"
BATCH = 64
WIDTH = 32  # narrow enough that 2-bit weights cost accuracy
CONFIGS = {  # name: (weight spec, activation spec)
    "W2A8 ternary": (QuantSpec(2, channel_axes=(-1,)), QuantSpec(8, symmetric=False)),
    "W2A8": (QuantSpec(2, symmetric=False, channel_axes=(-1,)), QuantSpec(8, symmetric=False)),
    "W2A2": (QuantSpec(2, symmetric=False, channel_axes=(-1,)), QuantSpec(2, symmetric=False)),
}
METHODS = ("STE", "LSQ", "LSQ + PACT")


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(WIDTH)(x))
        x = nn.relu(nn.Dense(WIDTH)(x))
        return nn.Dense(10)(x)


def train(step, optimizer, variables, x, y, epochs, seed):
    """`epochs` of `step` (from `optimizer_step`) over shuffled batches; the trained variables."""
    return fit(step, variables, optimizer.init(variables), minibatches(x, y, BATCH, epochs, seed))[0]


class Method:
    """One fine-tuning method under one policy: its optimizer and (compiled once, for every seed)
    train step, calibration pass and served forward."""

    def __init__(self, name, policy, lr, step_lr):
        self.name, self.policy = name, policy
        self.qmodel = jquant.flax.quantize(Mlp(), policy)
        self.optimizer = (optax.adam(lr) if name == "STE"
                          else learned.optimizer(optax.adam(lr), optax.adam(step_lr)))
        self.step = optimizer_step(classifier_loss(self.qmodel.apply), self.optimizer)
        self.forward = jax.jit(self.qmodel.apply)

    def fine_tune(self, float_params, x, y, epochs, seed):
        """Train from `float_params`; returns the served variables (QArray kernels)."""
        if self.name == "STE":
            variables = train(self.step, self.optimizer, {"params": float_params}, x, y, epochs, seed)
            return {"params": jquant.quantize_params(variables["params"], self.policy)}
        if self.name == "LSQ":
            state = learned.init(float_params, self.policy)
            del state[learned.PACT_CLIP]
        else:  # the clips start at the activations' observed max (a calibration pass on 512 examples)
            observed = jquant.flax.calibrate(self.qmodel, [(x[:512],)], variables={"params": float_params},
                                             momentum=0.0)
            state = learned.init(float_params, self.policy, act_ranges=jquant.flax.act_ranges(observed))
        variables = train(self.step, self.optimizer, {"params": float_params, **state}, x, y, epochs, seed)
        served = {"params": learned.quantize_params(variables["params"], variables, self.policy)}
        if learned.PACT_CLIP in variables:
            served["quant_stats"] = jquant.flax.learned_stats(variables, self.policy)
        return served


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15, help="fine-tune epochs (float training runs 4x as many)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (model init and batch order)")
    parser.add_argument("--lr", type=float, default=1e-3, help="adam learning rate of the weights")
    parser.add_argument("--step-lr", type=float, default=1e-3, help="adam learning rate of the steps and clips")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="policies to run")
    args = parser.parse_args()
    (x_train, y_train), (x_test, y_test) = digits()
    model = Mlp()
    float_optimizer = optax.adam(args.lr)
    float_step = optimizer_step(classifier_loss(model.apply), float_optimizer)
    methods = {(config, name): Method(name, Policy([Rule(KERNEL, *CONFIGS[config])]), args.lr, args.step_lr)
               for config in args.configs for name in METHODS}

    float_forward = jax.jit(model.apply)

    def accuracy(forward, variables):
        return float(np.mean(np.argmax(np.asarray(forward(variables, x_test)), -1) == y_test))

    results = {key: [] for key in [*methods, "float"]}
    for seed in range(args.seeds):
        init = {"params": model.init(jax.random.key(seed), x_train[:1])["params"]}
        float_params = train(float_step, float_optimizer, init, x_train, y_train, 4 * args.epochs, seed)["params"]
        results["float"].append(accuracy(float_forward, {"params": float_params}))
        for key, method in methods.items():
            served = method.fine_tune(float_params, x_train, y_train, args.epochs, seed)
            results[key].append(accuracy(method.forward, served))

    def cell(values):
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"

    print(f"digits MLP 64-{WIDTH}-{WIDTH}-10: {len(x_train)} train / {len(x_test)} test; {4 * args.epochs} float "
          f"epochs, then {args.epochs} fine-tune epochs per method; adam {args.lr:g} (steps and clips "
          f"{args.step_lr:g}); float accuracy {cell(results['float'])}; served test accuracy, mean ± std over "
          f"seeds 0..{args.seeds - 1}\n")
    print("| policy (weights per channel, activations per tensor) | " + " | ".join(METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for config in args.configs:
        weight, act = CONFIGS[config]
        print(f"| {config}: {weight!r}, act {act!r} | " + " | ".join(cell(results[config, name]) for name in METHODS)
              + " |")
    print("\nper seed:")
    for key, values in results.items():
        print(f"  {key if isinstance(key, str) else ' / '.join(key)}: " + ", ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
