"""Flax integration: quantize an unmodified Linen or NNX model by a `Policy`.

The only part of jquant that knows Flax: its layers (Dense/DenseGeneral/Conv/Einsum, Linear/
LinearGeneral/Conv/Einsum), the Linen collections and NNX Variables that hold observers and
learned quantizers. Lower layers take plain trees.

* `quantize(model, policy)`: a Linen module → `QuantizedLinen` (same `init`/`apply`, same params);
  an NNX module → the same module, its layers switched to quantized ops in place.
* `calibrate(model, batches, variables=None)`: static activation ranges from observers, for both.
* `quantize(model, policy, kv_cache=spec)`: Flax's attention decode caches (Linen
  `MultiHeadDotProductAttention(decode=True)`, NNX `MultiHeadAttention`) kept quantized per token
  and head (`jquant.KVCache`); `init_cache(model, batch, context)` allocates an NNX model's.
* `act_ranges(variables)`, `learned_stats(learned, policy)`: between a Linen model's observers and
  `jquant.learned`.
* LoRA (`Rule(..., lora=jquant.LoRA(r))`): Linen adapters in the `"lora"` collection (`LORA`),
  NNX adapters as `nnx.LoRAParam`s; `adapters(model)` (NNX) keys them like the kernels for
  `jquant.merge`.
"""

from jquant.flax._linen import LORA, STATS, QuantizedLinen, act_ranges, learned_stats, quantize_linen
from jquant.flax._nnx import QuantStat, adapters, calibrate_nnx, quantize_nnx
from jquant.flax._kvcache import QuantizedCacheLinen, init_cache, with_kv_cache

__all__ = ["quantize", "calibrate", "act_ranges", "learned_stats", "adapters", "QuantizedLinen", "QuantStat",
           "STATS", "LORA", "init_cache", "QuantizedCacheLinen"]


def quantize(model, policy, *, rngs=None, kv_cache=None):
    """Quantize a Flax model by `policy`: a Linen module → `QuantizedLinen` (same `init`/`apply`,
    same params; LoRA adapters come from `init`'s key); an NNX module → the same module, its layers
    switched to quantized ops in place (LoRA adapters drawn from `rngs`, an `nnx.Rngs`).

    `kv_cache`: a QuantSpec (e.g. `jquant.KV_INT8`) for the attention layers' decode caches:
    Linen `MultiHeadDotProductAttention(decode=True)` and NNX `MultiHeadAttention` keep their
    keys and values quantized per token and head (`jquant.KVCache`; NNX allocates them with
    `jquant.flax.init_cache(model, batch, context)`); None: Flax's float caches.

    Raises:
      TypeError: `rngs` given for a Linen model, or missing for an NNX policy with LoRA rules;
        `kv_cache` not a QuantSpec.
    """
    from flax import linen as nn

    if isinstance(model, nn.Module):
        if rngs is not None:
            raise TypeError("jquant.flax.quantize: a Linen model draws its adapters in init(key, ...); pass rngs=None")
        wrapped = quantize_linen(model, policy)
    else:
        wrapped = quantize_nnx(model, policy, rngs)
    return wrapped if kv_cache is None else with_kv_cache(wrapped, kv_cache)


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
