"""QAT train-step time: float vs jquant (W8A8, W4 weight-only) on the same model, batch and optimizer.

Run: python benchmarks/qat_step.py [--quick]
Models: a Linen MLP (1024-1024-1024-10) and a Linen transformer block (width 256, 4 heads, seq 64;
batch counts sequences). Step = value_and_grad + optax.adam update, jitted; median of repeats
after a warm-up. Ratio = jquant step / float step (target ≤ 1.3).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import jquant
from jquant import Policy, QuantSpec, Rule

POLICIES = {
    "W8A8": Policy([Rule(r".*kernel", QuantSpec(8, channel_axes=(-1,)), act=QuantSpec(8))]),
    "W4 g64 weight-only": Policy([Rule(r".*kernel", QuantSpec(4, symmetric=False, channel_axes=(-1,), group_size=64))]),
}


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(1024)(x))
        x = nn.relu(nn.Dense(1024)(x))
        return nn.Dense(10)(x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4)(h, h)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(256)(nn.gelu(nn.Dense(1024)(h)))


def step_ms(apply, params, x, repeats):
    optimizer = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean(apply(p, x) ** 2))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    jax.block_until_ready(step(params, opt_state))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, opt_state))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 5 if args.quick else 15
    batches = (64, 1024) if args.quick else (64, 1024, 8192)
    cases = [("MLP", Mlp(), lambda b: jnp.ones((b, 1024)))]
    cases.append(("transformer block", Block(), lambda b: jnp.ones((max(b // 64, 1), 64, 256))))
    print(f"jax {jax.__version__} on {jax.default_backend()}")
    print("| model | batch | float ms | " + " | ".join(f"{p} ms (ratio)" for p in POLICIES) + " |")
    print("|---|---|---|" + "---|" * len(POLICIES))
    for name, model, make_x in cases:
        for batch in batches:
            x = make_x(batch)
            params = model.init(jax.random.key(0), x)
            base = step_ms(model.apply, params, x, repeats)
            cells = []
            for policy in POLICIES.values():
                t = step_ms(jquant.flax.quantize(model, policy).apply, params, x, repeats)
                cells.append(f"{t:.2f} ({t / base:.2f}x)")
            print(f"| {name} | {batch} | {base:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
