"""jquant.report: per-leaf bytes, bits per weight and SQNR against NumPy, totals, and the PTQ
algorithms' per-layer output errors."""

import jax.numpy as jnp
import pytest

import jquant
import jquant.ptq
from jquant import Policy, QuantSpec, Rule

import reference
from helpers import correlated_batches, normal, tanh_mlp, tanh_mlp_params


def test_int4_group128_bits_per_weight_and_report():
    params = {"layer": {"kernel": normal(0, (512, 256))}, "bias": jnp.zeros(256)}
    policy = Policy([Rule(r".*kernel", QuantSpec(4, symmetric=False, channel_axes=(-1,), group_size=128))])
    qparams = jquant.quantize_params(params, policy)
    assert qparams["layer"]["kernel"].bits_per_weight <= 4.6
    rep = jquant.report(params, qparams, policy)
    row = {r.path: r for r in rep.rows}
    k = row["layer/kernel"]
    x = params["layer"]["kernel"]
    assert k.sqnr_db == pytest.approx(reference.sqnr_db(x, qparams["layer"]["kernel"].dequantize()), abs=1e-3)
    assert k.bytes_after == qparams["layer"]["kernel"].nbytes and k.bytes_before == x.size * 4
    assert row["bias"].rule == "kept" and row["bias"].bytes_after == row["bias"].bytes_before
    assert rep.compression == pytest.approx(rep.bytes_before / rep.bytes_after)
    text = str(rep)
    assert "layer/kernel" in text and "total" in text and f"{k.bits_per_weight:.3f}" in text


def test_report_rejects_trees_of_different_structure():
    with pytest.raises(ValueError, match="differ in structure"):
        jquant.report({"a": jnp.ones(2)}, {"b": jnp.ones(2)})


def test_per_layer_errors_show_in_the_report():
    params = tanh_mlp_params(15)
    policy = Policy([Rule("w.", QuantSpec(4, channel_axes=(1,)))])
    tree, errors = jquant.ptq.gptq(tanh_mlp, params, policy, correlated_batches(17, 2, 64, 16), progress=False)
    rep = jquant.report(params, tree, policy, errors=errors)
    assert [r.output_error for r in rep.rows] == [errors["w1"].error, errors["w2"].error]
    assert "output error" in str(rep)
