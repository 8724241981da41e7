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
own learning rate through `learned_optimizer` (optax.multi_transform). Accuracies are of the
served models (QArray kernels; LSQ from `export_params`, PACT clips as static ranges from
`export_stats`) on 360 held-out digits, mean ± std over seeds (each seed: model init and batch
order).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax
from flax import linen as nn
from sklearn.datasets import load_digits

import jquant
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


def load_data():
    """Digits scaled to [0, 1] (N, 64); a fixed 80/20 split."""
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(0.8 * len(x))
    return (x[order[:cut]], data.target[order[:cut]]), (x[order[cut:]], data.target[order[cut:]])


def make_step(apply, optimizer):
    """One jitted optimizer step on the cross-entropy of `apply(variables, x)` (every leaf trains)."""

    @jax.jit
    def step(variables, opt_state, xb, yb):
        loss_fn = lambda v: optax.softmax_cross_entropy_with_integer_labels(apply(v, xb), yb).mean()
        updates, opt_state = optimizer.update(jax.grad(loss_fn)(variables), opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state

    return step


def train(step, optimizer, variables, x, y, epochs, seed):
    opt_state = optimizer.init(variables)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x) - BATCH + 1, BATCH):
            idx = order[i:i + BATCH]
            variables, opt_state = step(variables, opt_state, x[idx], y[idx])
    return variables


class Method:
    """One fine-tuning method under one policy: its optimizer and (compiled once) train step."""

    def __init__(self, name, policy, lr, step_lr):
        self.name, self.policy = name, policy
        self.qmodel = jquant.flax.quantize(Mlp(), policy)
        self.optimizer = (optax.adam(lr) if name == "STE"
                          else learned.learned_optimizer(optax.adam(lr), optax.adam(step_lr)))
        self.step = make_step(self.qmodel.apply, self.optimizer)

    def fine_tune(self, float_params, x, y, epochs, seed):
        """Train from `float_params`; returns the served variables (QArray kernels)."""
        if self.name == "STE":
            variables = train(self.step, self.optimizer, {"params": float_params}, x, y, epochs, seed)
            return {"params": jquant.quantize_params(variables["params"], self.policy)}
        # The clips start at the activations' observed max (a calibration pass on 512 examples).
        stats = self.qmodel.calibrate({"params": float_params}, x[:512], momentum=0.0)["quant_stats"]
        state = learned.init_learned(float_params, self.policy, act_stats=stats)
        if self.name == "LSQ":
            del state[learned.PACT_CLIP]
        variables = train(self.step, self.optimizer, {"params": float_params, **state}, x, y, epochs, seed)
        served = {"params": learned.export_params(variables["params"], variables, self.policy)}
        if learned.PACT_CLIP in variables:
            served["quant_stats"] = learned.export_stats(variables, self.policy)
        return served


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15, help="fine-tune epochs (float training runs 4x as many)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (model init and batch order)")
    parser.add_argument("--lr", type=float, default=1e-3, help="adam learning rate of the weights")
    parser.add_argument("--step-lr", type=float, default=1e-3, help="adam learning rate of the steps and clips")
    args = parser.parse_args()
    (x_train, y_train), (x_test, y_test) = load_data()
    model = Mlp()
    float_optimizer = optax.adam(args.lr)
    float_step = make_step(model.apply, float_optimizer)
    methods = {(config, name): Method(name, Policy([Rule(KERNEL, *CONFIGS[config])]), args.lr, args.step_lr)
               for config in CONFIGS for name in METHODS}

    def accuracy(apply, variables):
        return float(np.mean(np.argmax(np.asarray(jax.jit(apply)(variables, x_test)), -1) == y_test))

    results = {key: [] for key in [*methods, "float"]}
    for seed in range(args.seeds):
        init = {"params": model.init(jax.random.key(seed), x_train[:1])["params"]}
        float_params = train(float_step, float_optimizer, init, x_train, y_train, 4 * args.epochs, seed)["params"]
        results["float"].append(accuracy(model.apply, {"params": float_params}))
        for key, method in methods.items():
            served = method.fine_tune(float_params, x_train, y_train, args.epochs, seed)
            results[key].append(accuracy(method.qmodel.apply, served))

    def cell(values):
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"

    print(f"digits MLP 64-{WIDTH}-{WIDTH}-10: {len(x_train)} train / {len(x_test)} test; {4 * args.epochs} float "
          f"epochs, then {args.epochs} fine-tune epochs per method; adam {args.lr:g} (steps and clips "
          f"{args.step_lr:g}); float accuracy {cell(results['float'])}; served test accuracy, mean ± std over "
          f"seeds 0..{args.seeds - 1}\n")
    print("| policy (weights per channel, activations per tensor) | " + " | ".join(METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for config, (weight, act) in CONFIGS.items():
        print(f"| {config}: {weight!r}, act {act!r} | " + " | ".join(cell(results[config, name]) for name in METHODS)
              + " |")
    print("\nper seed:")
    for key, values in results.items():
        print(f"  {key if isinstance(key, str) else ' / '.join(key)}: " + ", ".join(f"{v:.3f}" for v in values))


if __name__ == "__main__":
    main()
