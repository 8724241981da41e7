"""Every quantization scheme on three tensors, and an integer-path classifier.

Run: python examples/schemes.py   (inside the environment that `python3 run.py demo` sets up)

Schemes: the integer grids, sign, NF4 and k-means, and the floating-point formats (FP8 e4m3/e5m2
with float32 per-channel scales, MXFP8/MXFP4 with E8M0 scales per 32, NVFP4 with E4M3 scales per 16).

Tensors:
  gaussian  (4096, 1024) N(0, 1) weights, the textbook case;
  heavy     (4096, 1024) Student-t (3 dof) weights: outliers, where granularity matters;
  digits    the (64, 10) weights of a ridge classifier fit on scikit-learn's digits (ships with
            scikit-learn; the split of `_common.digits`), evaluated on 360 held-out digits through
            jquant.QuantDot: int8 activations (dynamic, per row) × quantized weights, on the exact
            int32 path where the weights have an integer grid.
For each scheme: stored bits per weight (scales and zero-points included), SQNR in dB
(10·log10(Σx² / Σ(x - x̂)²)), bytes, and for digits the test accuracy. `--only REGEX` runs the
schemes whose name it matches, `--rows` sets the size of the Gaussian and heavy tensors.
"""

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np

import jquant
from _common import digits
from jquant import QuantSpec

SCHEMES = [
    ("int8 per-tensor", QuantSpec(8)),
    ("int8 per-channel", QuantSpec(8, channel_axes=(1,))),
    ("int8 asym per-channel", QuantSpec(8, symmetric=False, channel_axes=(1,))),
    ("int8 per-channel percentile 99.99", QuantSpec(8, channel_axes=(1,), calibration=jquant.Percentile(99.99))),
    ("int4 per-channel", QuantSpec(4, channel_axes=(1,))),
    ("int4 per-channel MSE clip", QuantSpec(4, channel_axes=(1,), calibration=jquant.MSE())),
    ("int4 mid-rise per-channel MSE clip", QuantSpec(4, midrise=True, channel_axes=(1,), calibration=jquant.MSE())),
    ("int3 mid-rise per-channel MSE clip", QuantSpec(3, midrise=True, channel_axes=(1,), calibration=jquant.MSE())),
    ("int4 asym group-32", QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=32)),
    ("int3 asym group-32", QuantSpec(3, symmetric=False, channel_axes=(1,), group_size=32)),
    ("int2 asym group-16", QuantSpec(2, symmetric=False, channel_axes=(1,), group_size=16)),
    ("1-bit sign per-channel", QuantSpec(1, method="sign", channel_axes=(1,))),
    ("nf4 group-64", QuantSpec(4, method="nf4", channel_axes=(1,), group_size=64)),
    ("4-bit k-means per-channel", QuantSpec(4, method="kmeans", channel_axes=(1,))),
    ("3-bit k-means per-channel", QuantSpec(3, method="kmeans", channel_axes=(1,))),
    ("2-bit k-means per-channel", QuantSpec(2, method="kmeans", channel_axes=(1,))),
    ("fp8 e4m3 per-channel", QuantSpec(8, method="fp8_e4m3", channel_axes=(1,))),
    ("fp8 e5m2 per-channel", QuantSpec(8, method="fp8_e5m2", channel_axes=(1,))),
    ("mxfp8 (blocks of 32)", QuantSpec(8, method="mxfp8", channel_axes=(1,), group_size=32)),
    ("mxfp4 (blocks of 32)", QuantSpec(4, method="mxfp4", channel_axes=(1,), group_size=32)),
    ("nvfp4 (blocks of 16)", QuantSpec(4, method="nvfp4", channel_axes=(1,), group_size=16)),
]
DN = (((1,), (0,)), ((), ()))


def sqnr_db(x, x_hat) -> float:
    x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
    return float(10 * np.log10(np.sum(x ** 2) / max(np.sum((x - x_hat) ** 2), 1e-300)))


def digits_classifier():
    """Ridge regression to one-hot labels: weights (64, 10), bias (10,), and the held-out digits."""
    (x_train, y_train), (x_test, y_test) = digits()
    xt = np.concatenate([x_train, np.ones((len(x_train), 1), np.float32)], axis=1)
    targets = np.eye(10, dtype=np.float32)[y_train]
    solution = np.linalg.solve(xt.T @ xt + 1e-1 * np.eye(65), xt.T @ targets)
    return (jnp.asarray(solution[:64], jnp.float32), jnp.asarray(solution[64], jnp.float32),
            jnp.asarray(x_test), np.asarray(y_test))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096, help="rows of the (rows, 1024) Gaussian/heavy tensors")
    parser.add_argument("--only", default=None, help="regex: run only the schemes whose name it matches")
    args = parser.parse_args()
    rows = args.rows
    keys = jax.random.split(jax.random.key(0), 2)
    tensors = {
        "gaussian": jax.random.normal(keys[0], (rows, 1024), jnp.float32),
        "heavy": jax.random.t(keys[1], 3.0, (rows, 1024), jnp.float32),
    }
    w, b, x_test, y_test = digits_classifier()
    act_spec = QuantSpec(8, symmetric=False, channel_axes=(0,))  # dynamic, per row, asymmetric (pixels ≥ 0)

    @jax.jit
    def accuracy_float(w):
        return jnp.mean(jnp.argmax(x_test @ w + b, axis=1) == y_test)

    def accuracy_int(wq):
        logits = jax.jit(lambda x, wq: jquant.QuantDot(act=act_spec)(x, wq, DN))(x_test, wq) + b
        return float(jnp.mean(jnp.argmax(logits, axis=1) == y_test))

    print(f"jquant schemes — jax {jax.__version__} on {jax.default_backend()}\n")
    header = (f"| {'scheme':<26} | {'bits/w':>6} | {'gaussian SQNR':>13} | {'heavy SQNR':>10} | "
              f"{f'{rows}x1024 bytes':>15} | {'digits SQNR':>11} | {'digits acc':>10} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    float_bytes = tensors["gaussian"].nbytes
    print(f"| {'float32':<26} | {32:>6.2f} | {'-':>13} | {'-':>10} | {float_bytes:>15,} | {'-':>11} | "
          f"{float(accuracy_float(w)):>10.3f} |")
    schemes = [(name, spec) for name, spec in SCHEMES if args.only is None or re.search(args.only, name)]
    for name, spec in schemes:
        quantized = {k: jquant.quantize(v, spec) for k, v in tensors.items()}
        wq = jquant.quantize(w, spec)
        g = quantized["gaussian"]
        print(f"| {name:<26} | {g.bits_per_weight:>6.2f} | {sqnr_db(tensors['gaussian'], g.dequantize()):>13.2f} | "
              f"{sqnr_db(tensors['heavy'], quantized['heavy'].dequantize()):>10.2f} | {g.nbytes:>15,} | "
              f"{sqnr_db(w, wq.dequantize()):>11.2f} | {accuracy_int(wq):>10.3f} |")
    print("\nbits/w counts scales (float32; MX: one E8M0 byte per 32; NVFP4: one E4M3 byte per 16 and a float32 "
          "tensor scale), zero-points (int8) and k-means levels (float32).")
    print("digits acc: held-out accuracy through jquant.QuantDot with int8 activations: the int32 integer path for "
          "uniform and sign weights, dequantized codebook and floating-point (fp8/MX/NVFP4) weights otherwise; "
          "float32 is a float matmul.")


if __name__ == "__main__":
    main()
