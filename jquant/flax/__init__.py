"""Flax integration: quantize an unmodified Linen or NNX model by a `Policy`.

The only part of jquant that knows Flax: its layers (Dense/DenseGeneral/Conv/Einsum, Linear/
LinearGeneral/Conv/Einsum), the Linen collections and NNX Variables that hold observers and
learned quantizers. Lower layers take plain trees.

* `quantize(model, policy)`: a Linen module → `QuantizedLinen` (same `init`/`apply`, same params);
  an NNX module → the same module, its layers switched to quantized ops in place.
* `calibrate(model, batches, variables=None)`: static activation ranges from observers, for both.
* `act_ranges(variables)`, `learned_stats(learned, policy)`: between a Linen model's observers and
  `jquant.learned`.
"""

from jquant.flax._linen import STATS, QuantizedLinen, act_ranges, learned_stats, quantize_linen
from jquant.flax._nnx import QuantStat, calibrate_nnx, quantize_nnx

__all__ = ["quantize", "calibrate", "act_ranges", "learned_stats", "QuantizedLinen", "QuantStat", "STATS"]


def quantize(model, policy):
    """Quantize a Flax model by `policy`: a Linen module → `QuantizedLinen` (same `init`/`apply`,
    same params); an NNX module → the same module, its layers switched to quantized ops in place."""
    from flax import linen as nn

    if isinstance(model, nn.Module):
        return quantize_linen(model, policy)
    return quantize_nnx(model, policy)


def calibrate(model, batches, *, variables=None, momentum: float = 0.9):
    """Static activation ranges: observe every quantized activation over `batches` (an iterable of
    argument tuples for the model's call) and keep an EMA of each batch's per-tensor range (as the
    activation spec's `calibration` picks it); from then on those activations are quantized with
    the static ranges, and serving keeps them.

    Args:
      model: a `QuantizedLinen` (then `variables` is required) or an NNX model passed through
        `quantize` (then `variables` must be None: NNX state lives in the model).
      batches: iterable of argument tuples.
      variables: the Linen variables ({"params": ...}).
      momentum: the EMA's momentum m (lo ← m·lo + (1 − m)·lo_batch); the first batch sets the range.

    Returns:
      Linen: `variables` with the `quant_stats` collection updated. NNX: `model`, updated in place.

    Raises:
      TypeError: `variables` missing for Linen, or given for NNX.
    """
    if isinstance(model, QuantizedLinen):
        if variables is None:
            raise TypeError("calibrate: a Linen model needs variables=({'params': ...})")
        import jax

        step = jax.jit(lambda v, *batch: model.calibration_step(v, *batch, momentum=momentum))
        for batch in batches:
            variables = step(variables, *batch)
        return variables
    if variables is not None:
        raise TypeError("calibrate: an NNX model holds its own state; pass variables=None")
    return calibrate_nnx(model, batches, momentum=momentum)
