"""Learned quantization: LSQ step sizes for weights, PACT clipping values for activations.

The estimators: `lsq_fake_quant(x, step, spec)`, `pact(x, clip, spec)` (custom_jvp; definitions
in their docstrings). Over a parameter tree, in parallel with the float transforms of `jquant`:
`init(params, policy)` makes the learned tree, `fake_quant_params(params, learned, policy)` is
`jquant.fake_quant_params` with the learned steps, `quantize_params(params, learned, policy)`
serves them as QArrays, `optimizer(params_tx, learned_tx)` trains both.
"""

from jquant._src.learned import (LSQ_STEP, PACT_CLIP, fake_quant_params, init, learned_clips, lsq_fake_quant,
                                 lsq_grad_scale, lsq_init_step, optimizer, pact, pact_range, quantize_params)

__all__ = ["LSQ_STEP", "PACT_CLIP", "lsq_fake_quant", "lsq_grad_scale", "lsq_init_step", "pact", "pact_range",
           "init", "fake_quant_params", "quantize_params", "learned_clips", "optimizer"]
