"""What the examples share: their data, their training loop and their timer.

* Data: `digits()`, scikit-learn's handwritten digits in one fixed split, and `stdlib_splits()`,
  the Python standard library's own source split by file (the byte-level LM's text; nothing is
  downloaded), cut into model inputs by `windows`, `random_windows` and `calibration_batches`.
* Training: `optimizer_step(loss, optimizer)` compiles one optax step of `loss(tree, batch)`;
  `fit` runs it over an iterable of batches (`minibatches` of arrays, `random_windows` of text).
  `classifier_loss` and `lm_loss` are the two losses the examples train.
* Timing: `interleaved_ms` times several calls in alternating rounds.
* The byte-level LM's setup, shared by the three `char_lm*` examples: `g128`, `kernel_policy`,
  `Training`, `trained_params` (train once, cache the result), `perplexity`, `add_lm_arguments`
  and `lm_config`; the model itself is `char_lm_model.py`.

The benchmarks import this module too (`benchmarks/common.py` puts `examples/` on `sys.path`), so
the digits loader, the training loop and the alternating timer each exist once in the repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sysconfig
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import char_lm_model as lm
import jquant
from jquant import Policy, QuantSpec, Rule

# ---------------------------------------------------------------------------------------------- data

DIGITS_TEST = 360  # held-out digits; the other 1,437 train


def digits(images: bool = False):
    """scikit-learn's 1,797 handwritten digits scaled to [0, 1], in one fixed train / test split.

    The split is a permutation drawn with seed 0: its last `DIGITS_TEST` = 360 digits are the test
    set, the first 1,437 the training set (the same split in every example and benchmark).

    Args:
      images: True for (N, 8, 8, 1) images (convolutions), False for flat (N, 64) rows.

    Returns:
      ((x_train, y_train), (x_test, y_test)): x float32 as chosen, y int labels 0..9 (N,).
    """
    from sklearn.datasets import load_digits  # here, so that the text examples run without it

    data = load_digits()
    x = ((data.images[..., None] if images else data.data) / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:-DIGITS_TEST], order[-DIGITS_TEST:]
    return (x[train], data.target[train]), (x[test], data.target[test])


class Split(NamedTuple):
    """One split of the text: its concatenated bytes (uint8) and the file names it came from."""
    data: np.ndarray
    files: List[str]


def stdlib_splits() -> Dict[str, Split]:
    """{"train", "calibration", "evaluation"}: the top-level stdlib `.py` files, split by file.

    The files are those at the top level of the standard library of the Python that runs this
    (`sysconfig.get_paths()["stdlib"]`), joined with a newline between them. The split is by
    index in the sorted name list (i % 10 == 3 → evaluation, i % 10 == 7 → calibration, else
    train), so the three splits share no file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"), key=lambda f: f.name)
    parts: Dict[str, List[Path]] = {"train": [], "calibration": [], "evaluation": []}
    for i, f in enumerate(files):
        parts["evaluation" if i % 10 == 3 else "calibration" if i % 10 == 7 else "train"].append(f)
    out = {}
    for name, chosen in parts.items():
        data = b"\n".join(f.read_bytes() for f in chosen)
        out[name] = Split(np.frombuffer(data, np.uint8), [f.name for f in chosen])
    return out


def fingerprint(data: np.ndarray) -> str:
    """Short sha256 of a byte array (the training text goes into the cache key)."""
    return hashlib.sha256(data.tobytes()).hexdigest()[:16]


def windows(data: np.ndarray, context: int, count: int) -> np.ndarray:
    """`count` windows (count, context + 1) int32 at evenly spaced offsets over all of `data`
    (so every file of a split is sampled, deterministically); input = window[:, :-1], target =
    window[:, 1:]."""
    starts = np.linspace(0, len(data) - context - 1, count).round().astype(np.int64)
    return data[starts[:, None] + np.arange(context + 1)[None, :]].astype(np.int32)


def random_windows(data: np.ndarray, context: int, batch: int, steps: int, seed: int) -> Iterator[jax.Array]:
    """`steps` training batches, each `batch` windows (batch, context + 1) int32 at random offsets
    of `data` (drawn by `np.random.default_rng(seed)`, so the same seed gives the same batches)."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(data) - context - 1, batch)
        yield jnp.asarray(data[starts[:, None] + np.arange(context + 1)[None, :]], jnp.int32)


def calibration_batches(calibration_windows: np.ndarray, batch: int) -> List[tuple]:
    """The windows' inputs (window[:, :-1]) in batches of `batch`, each a 1-tuple of arguments of
    `forward(params, tokens)`: the `calibration_batches` of `jquant.ptq` and `search_policy`."""
    return [(jnp.asarray(calibration_windows[i:i + batch, :-1]),)
            for i in range(0, len(calibration_windows), batch)]


# ------------------------------------------------------------------------------------------ training

def optimizer_step(loss: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """The jitted step (tree, opt_state, batch) -> (tree, opt_state, loss) of `loss(tree, batch)`.

    Every leaf of `tree` trains (an optimizer such as `jquant.learned.optimizer` may give
    some leaves their own rate). Make the step once and reuse it: each call of this function
    compiles anew."""
    @jax.jit
    def step(tree, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(tree, batch)
        updates, opt_state = optimizer.update(grads, opt_state, tree)
        return optax.apply_updates(tree, updates), opt_state, value

    return step


def fit(step: Callable, tree, opt_state, batches: Iterable, on_step: Optional[Callable] = None):
    """Apply `step` (from `optimizer_step`) to every batch in turn.

    Args:
      step, tree, opt_state: the step and its starting state.
      batches: the batches, in order (`minibatches`, `random_windows`).
      on_step: if given, called as `on_step(i, losses)` after step i (1-based), for progress.

    Returns:
      (tree, opt_state, losses): the trained state and every step's loss (on the device).
    """
    losses = []
    for batch in batches:
        tree, opt_state, loss = step(tree, opt_state, batch)
        losses.append(loss)
        if on_step is not None:
            on_step(len(losses), losses)
    return tree, opt_state, losses


def minibatches(x: np.ndarray, y: np.ndarray, batch: int, epochs: int, seed: int) -> Iterator[tuple]:
    """(x, y) batches of `batch` rows, a fresh permutation per epoch (`np.random.default_rng(seed)`);
    the remainder of each epoch (fewer than `batch` rows) is left out."""
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i:i + batch]
            yield x[idx], y[idx]


def classifier_loss(apply: Callable) -> Callable:
    """loss(tree, (x, y)): the mean cross-entropy of the logits `apply(tree, x)` for int labels y."""
    def loss(tree, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(apply(tree, x), y).mean()

    return loss


# ---------------------------------------------------------------------------------------------- timing

def interleaved_ms(fns: Sequence[Callable], args_per_fn: Sequence[tuple], *, rounds: int, repeats: int) -> List[float]:
    """Median milliseconds of each `fns[i](*args_per_fn[i])`, measured in `rounds` alternating rounds.

    Each call is run once untimed first (compilation), then every round times `repeats` calls of
    each candidate in turn, outputs blocked on. Alternating the candidates spreads slow phases of
    a shared machine over all of them, so the ratios between them are fairer than timing each
    candidate in one block (sub-millisecond steps on a 2-core machine drift by tens of percent).
    """
    for fn, args in zip(fns, args_per_fn):
        jax.block_until_ready(fn(*args))
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for i, (fn, args) in enumerate(zip(fns, args_per_fn)):
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                samples[i].append(time.perf_counter() - start)
    return [1e3 * float(np.median(s)) for s in samples]


# ------------------------------------------------------------------------------ the byte-level LM

CACHE = Path.home() / ".cache" / "jquant" / "char_lm"


def g128(bits: int) -> QuantSpec:
    """The grouped spec every char_lm example uses: `bits` asymmetric (min/max), one scale and
    zero-point per output channel and group of 128 inputs."""
    return QuantSpec(bits, symmetric=False, channel_axes=(1,), group_size=128)


def kernel_policy(spec: QuantSpec) -> Policy:
    """`spec` on every block kernel; the head (and, unmatched, the embeddings) stay in float."""
    return Policy([Rule(r"head/kernel", None), Rule(r".*kernel", spec)])


def lm_loss(params, batch):
    """Mean cross-entropy (nats per byte) of predicting batch[:, 1:] from batch[:, :-1]."""
    logits = lm.forward(params, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@jax.jit
def _nll_sum(params, batch):
    logits = lm.forward(params, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).sum()


def perplexity(params, eval_windows: np.ndarray, batch: int = 64) -> float:
    """exp(mean cross-entropy per predicted byte) over the evaluation windows."""
    total = 0.0
    for i in range(0, len(eval_windows), batch):
        total += float(_nll_sum(params, jnp.asarray(eval_windows[i:i + batch])))
    return math.exp(total / (eval_windows.shape[0] * (eval_windows.shape[1] - 1)))


@dataclasses.dataclass(frozen=True)
class Training:
    """Training settings (with the model config and the training text, the cache key)."""
    steps: int = 600
    batch: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0


def _cache_key(config: lm.Config, training: Training, text_fingerprint: str) -> str:
    blob = json.dumps({"config": dataclasses.asdict(config), "training": dataclasses.asdict(training),
                       "text": text_fingerprint, "version": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_lm(config: lm.Config, training: Training, data: np.ndarray):
    """AdamW (warmup, cosine decay, clip 1.0) on random windows of `data`; (params, seconds, loss),
    the loss being the mean of the last 20 steps' (nats per byte). Prints progress ten times."""
    warmup = max(1, min(100, training.steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, training.lr, warmup, max(training.steps, warmup + 1),
                                                  training.lr / 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=training.weight_decay))
    params = lm.init(config, jax.random.key(training.seed))
    start = time.perf_counter()

    def progress(i, losses):
        if i % max(1, training.steps // 10) == 0 or i == training.steps:
            print(f"  step {i}/{training.steps}  train loss {float(jnp.mean(jnp.stack(losses[-20:]))):.3f} nats/byte  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)

    batches = random_windows(data, config.context, training.batch, training.steps, training.seed)
    params, _, losses = fit(optimizer_step(lm_loss, optimizer), params, optimizer.init(params), batches, progress)
    final = float(jnp.mean(jnp.stack(losses[-20:])))
    return jax.block_until_ready(params), time.perf_counter() - start, final


def trained_params(config: lm.Config, training: Training, data: np.ndarray, cache: Path, retrain: bool = False):
    """Train, or load the cached result for the same settings and text; (params, info dict)."""
    path = cache / f"{_cache_key(config, training, fingerprint(data))}.jqc"
    if path.exists() and not retrain:
        saved = jquant.load(path)
        print(f"loaded trained params from {path} (trained in {float(saved['train_seconds']):.0f} s)")
        return saved["params"], saved
    print(f"training {config} with {training} ...", flush=True)
    params, seconds, final = train_lm(config, training, data)
    saved = {"params": params, "train_seconds": seconds, "final_train_loss": final}
    cache.mkdir(parents=True, exist_ok=True)
    jquant.save(path, saved)
    print(f"trained in {seconds:.0f} s, cached at {path}")
    return params, saved


def add_lm_arguments(parser: argparse.ArgumentParser, steps_flag: str = "--steps") -> None:
    """The flags that pick the trained LM: --width, --depth, --context, its training steps (under
    `steps_flag`), --eval-windows and --cache; `lm_config(args)` reads the model's."""
    parser.add_argument("--width", type=int, default=lm.Config.width)
    parser.add_argument("--depth", type=int, default=lm.Config.depth)
    parser.add_argument("--context", type=int, default=lm.Config.context)
    parser.add_argument(steps_flag, type=int, default=Training.steps, help="training steps of the float model")
    parser.add_argument("--eval-windows", type=int, default=1024, help="evaluation windows of `context` bytes")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where trained models are cached")


def lm_config(args: argparse.Namespace) -> lm.Config:
    """The model config of the flags `add_lm_arguments` added."""
    return lm.Config(args.width, args.depth, args.context)
