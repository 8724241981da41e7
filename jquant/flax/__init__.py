"""Flax integration: quantize an unmodified Linen or NNX model by a `Policy`."""

from jquant.flax.linen import STATS, QuantizedLinen, quantize_linen
from jquant.flax.nnx import ObservedOp, QuantStat, calibrate_nnx, quantize_nnx

__all__ = ["quantize", "QuantizedLinen", "quantize_linen", "STATS", "quantize_nnx", "calibrate_nnx", "QuantStat",
           "ObservedOp"]


def quantize(model, policy):
    """Quantize a Flax model by `policy`: a Linen module → `QuantizedLinen` (same `init`/`apply`,
    same params); an NNX module → the same module, its layers switched to quantized ops in place."""
    from flax import linen as nn

    if isinstance(model, nn.Module):
        return quantize_linen(model, policy)
    return quantize_nnx(model, policy)
