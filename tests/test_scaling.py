"""jquant.ptq AWQ / SmoothQuant: scales folded into params leave the float function unchanged,
and make quantization lose less."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import jquant
import jquant.ptq
from jquant import Policy, QuantSpec, Rule

from helpers import block_params, layer_norm, outlier_batches, transformer_block as block

POLICY = Policy([Rule(r".*kernel", QuantSpec(3, symmetric=False, channel_axes=(1,), group_size=16))])


def test_awq_keeps_the_function_and_beats_round_to_nearest():
    params, batches = block_params(3), outlier_batches(4, 5)
    *calibration, (held_out,) = batches
    with pytest.warns(UserWarning, match=r"2 weight\(s\) not scaled.*o/kernel.*down/kernel"):
        scaled, errors = jquant.ptq.awq(block, params, POLICY, calibration)
    np.testing.assert_allclose(np.asarray(block(scaled, held_out)), np.asarray(block(params, held_out)),
                               rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(block(params, held_out)))))
    assert set(errors) == {"q/kernel", "k/kernel", "v/kernel", "up/kernel"}
    assert all(awq <= rtn for awq, rtn in errors.values())
    assert any(awq < 0.8 * rtn for awq, rtn in errors.values())
    reference = block(params, held_out)

    def error(tree):
        return float(jnp.mean((block(jquant.dequantize_params(tree), held_out) - reference) ** 2))

    assert error(jquant.quantize_params(scaled, POLICY)) < error(jquant.quantize_params(params, POLICY))


def test_smoothquant_balances_activation_and_weight_ranges():
    params, batches = block_params(5), outlier_batches(6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        smoothed, errors = jquant.ptq.smoothquant(block, params, POLICY, batches, alpha=0.5)
    x = np.concatenate([np.asarray(b[0]) for b in batches])
    h_before = np.asarray(layer_norm(jnp.asarray(x), params["ln1"]))
    h_after = np.asarray(layer_norm(jnp.asarray(x), smoothed["ln1"]))
    w_after = np.max([np.abs(np.asarray(smoothed[n]["kernel"])).max(1) for n in "qkv"], axis=0)
    w_before = np.max([np.abs(np.asarray(params[n]["kernel"])).max(1) for n in "qkv"], axis=0)
    # α = 1/2: both sides end at √(max|X| · max|W|) per channel
    balanced = np.sqrt(np.abs(h_before).max(0) * w_before)
    np.testing.assert_allclose(np.abs(h_after).max(0), balanced, rtol=1e-3)
    np.testing.assert_allclose(w_after, balanced, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(block(smoothed, batches[0][0])), np.asarray(block(params, batches[0][0])),
                               rtol=1e-4, atol=1e-3)


def test_scaling_rejects_bad_options():
    with pytest.raises(ValueError, match="grid"):
        jquant.ptq.awq(block, block_params(0), POLICY, outlier_batches(0, 1), grid=0)
    with pytest.raises(ValueError, match="alpha"):
        jquant.ptq.smoothquant(block, block_params(0), POLICY, outlier_batches(0, 1), alpha=1.5)
    with pytest.raises(ValueError, match="batches is empty"):
        jquant.ptq.awq(block, block_params(0), POLICY, [])
