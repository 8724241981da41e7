"""Calibration (MinMax / Percentile / MSE) against NumPy float64 and the optimal quantizer of N(0, 1)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import QuantSpec
from jquant._src.calibration import MSE, MinMax, Percentile

import reference
from helpers import normal


# --- references -------------------------------------------------------------------------------

def _reference_uniform(x, lo, hi, bits, symmetric, midrise=False):
    """Quantize rows of `x` (float64) with per-row range [lo, hi] (arrays of shape (rows, 1))."""
    if midrise:
        qmin, qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
        s = np.maximum(np.abs(lo), np.abs(hi)) / 2 ** (bits - 1)
        q = np.clip(np.floor(x / np.where(s == 0, 1, s)), qmin, qmax)
        return s * (q + 0.5)
    qmax = 2 ** (bits - 1) - 1
    if symmetric:
        s = np.maximum(np.abs(lo), np.abs(hi)) / qmax
        return s * np.clip(np.round(x / np.where(s == 0, 1, s)), -qmax, qmax)
    qmin = -qmax - 1
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    s = (hi - lo) / (qmax - qmin)
    z = np.clip(qmin - np.round(lo / s), qmin, qmax)
    return s * (np.clip(np.round(x / s) + z, qmin, qmax) - z)


def _normal_cdf(t):
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


def _normal_pdf(t):
    return math.exp(-t * t / 2) / math.sqrt(2 * math.pi)


def _uniform_midrise_mse(levels, step):
    """Exact MSE of the mid-rise uniform quantizer with `levels` levels and step `step` on N(0,1):
    Σ over cells [a, b] of ∫ (x - y)² φ(x) dx, with ∫x²φ = Φ - xφ, ∫xφ = -φ."""
    half = levels // 2
    edges = [-math.inf] + [k * step for k in range(-half + 1, half)] + [math.inf]
    total = 0.0
    for i in range(levels):
        a, b = edges[i], edges[i + 1]
        y = (i - half + 0.5) * step
        cdf = _normal_cdf(b) - _normal_cdf(a)
        pdf = (_normal_pdf(b) if math.isfinite(b) else 0.0) - (_normal_pdf(a) if math.isfinite(a) else 0.0)
        xpdf = (b * _normal_pdf(b) if math.isfinite(b) else 0.0) - (a * _normal_pdf(a) if math.isfinite(a) else 0.0)
        total += (cdf - xpdf) + 2 * y * pdf + y * y * cdf
    return total


def _optimal_uniform_mse(levels):
    """Minimum over the step of `_uniform_midrise_mse` (grid search, then golden-section)."""
    steps = np.linspace(0.05, 2.0, 400)
    best = steps[int(np.argmin([_uniform_midrise_mse(levels, d) for d in steps]))]
    a, b = best - 0.01, best + 0.01
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if _uniform_midrise_mse(levels, c) < _uniform_midrise_mse(levels, d):
            b = d
        else:
            a = c
    return _uniform_midrise_mse(levels, (a + b) / 2)


# --- calibration ------------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_range_is_numpy_percentile(symmetric):
    x = np.asarray(normal(0, (6, 500))) + np.linspace(-1, 1, 6, dtype=np.float32)[:, None]
    spec = QuantSpec(4, symmetric=symmetric, channel_axes=(0,), calibration=Percentile(99.0))
    qa = jquant.quantize(x, spec)
    x64 = x.astype(np.float64)
    if symmetric:
        top = np.percentile(np.abs(x64), 99.0, axis=1, keepdims=True)
        # jnp.percentile interpolates in float32: a few ulps of the neighbours' gap
        np.testing.assert_allclose(np.asarray(qa.scale), top / 7, rtol=1e-5)
    else:
        lo = np.minimum(np.percentile(x64, 1.0, axis=1, keepdims=True), 0)
        hi = np.maximum(np.percentile(x64, 99.0, axis=1, keepdims=True), 0)
        np.testing.assert_allclose(np.asarray(qa.scale), (hi - lo) / 15, rtol=1e-5)
    x_hat = np.asarray(qa.dequantize(), np.float64)
    expected = _reference_uniform(x64, -top if symmetric else lo, top if symmetric else hi, 4, symmetric)
    assert np.mean(np.abs(x_hat - expected) > 1e-5) < 0.01  # only float32 rounding ties may differ


@pytest.mark.parametrize("bits,symmetric,midrise", [(2, True, True), (3, False, False), (4, True, False),
                                                    (8, True, False), (4, False, False)])
def test_mse_search_finds_the_best_candidate_ratio(bits, symmetric, midrise):
    x = np.array(normal(1, (5, 2000)))
    x[0, :3] = [9.0, -7.0, 8.0]  # outliers make clipping worthwhile
    cal = MSE(num_ratios=50, min_ratio=0.1)
    spec = QuantSpec(bits, symmetric=symmetric, midrise=midrise, channel_axes=(0,), calibration=cal)
    got = np.asarray(jquant.quantize(x, spec).dequantize(), np.float64)
    x64 = x.astype(np.float64)
    if symmetric:
        absmax = np.max(np.abs(x64), axis=1, keepdims=True)
        lo, hi = -absmax, absmax
    else:
        lo, hi = x64.min(axis=1, keepdims=True), x64.max(axis=1, keepdims=True)
    errors = np.stack([np.sum((_reference_uniform(x64, lo * r, hi * r, bits, symmetric, midrise) - x64) ** 2, axis=1)
                       for r in np.linspace(0.1, 1.0, 50)])
    best, at_one = errors.min(axis=0), errors[-1]
    got_error = np.sum((got - x64) ** 2, axis=1)
    np.testing.assert_array_less(got_error, best * (1 + 1e-4) + 1e-12)
    assert got_error[0] < at_one[0]  # the outlier row really was clipped


@pytest.mark.parametrize("bits,published", [(2, 0.11885), (3, 0.03744), (4, 0.011543)])
def test_mse_clipping_reaches_the_optimal_uniform_quantizer(bits, published):
    optimum = _optimal_uniform_mse(2 ** bits)
    assert optimum == pytest.approx(published, rel=2e-3)  # Max (1960), recomputed from the density
    x = normal(2, (8, 1 << 14))
    spec = QuantSpec(bits, midrise=True, channel_axes=(0,), calibration=MSE())
    assert reference.mse(x, jquant.quantize(x, spec).dequantize()) <= 1.02 * optimum


def test_clipping_calibrations_reduce_error_on_heavy_tails():
    x = np.random.default_rng(3).standard_t(3, (4, 4096)).astype(np.float32)
    errors = {name: reference.mse(x, jquant.quantize(x, QuantSpec(4, channel_axes=(0,), calibration=cal)).dequantize())
              for name, cal in (("minmax", MinMax()), ("percentile", Percentile(99.9)), ("mse", MSE()))}
    assert errors["mse"] < errors["percentile"] < errors["minmax"]


def test_mse_calibration_is_jittable_and_grouped():
    x = normal(4, (256, 64))
    spec = QuantSpec(4, channel_axes=(1,), group_size=64, calibration=MSE(num_ratios=20))
    eager = jquant.quantize(x, spec)
    jitted = jax.jit(lambda v: jquant.quantize(v, spec))(x)
    assert jitted.scale.shape == eager.scale.shape == (4, 1, 64)
    np.testing.assert_allclose(np.asarray(jitted.scale), np.asarray(eager.scale), rtol=1e-6)


def test_zero_groups_and_empty_tensors_stay_zero():
    x = np.zeros((3, 8), np.float32)
    x[1] = np.linspace(-1, 1, 8)
    for cal in (Percentile(99.0), MSE(num_ratios=10)):
        for midrise in (False, True):
            out = np.asarray(jquant.quantize(x, QuantSpec(3, midrise=midrise, channel_axes=(0,),
                                                          calibration=cal)).dequantize())
            assert np.all(out[[0, 2]] == 0) and np.all(np.isfinite(out))
        empty = jquant.quantize(np.zeros((0, 4), np.float32), QuantSpec(8, calibration=cal))
        assert empty.dequantize().shape == (0, 4)


def test_clipped_values_get_zero_gradient():
    x = jnp.asarray(np.concatenate([np.linspace(-1, 1, 99), [50.0]]).astype(np.float32))
    spec = QuantSpec(8, calibration=Percentile(99.0))
    grad = jax.grad(lambda v: jnp.sum(jquant.fake_quant(v, spec)))(x)
    assert grad[-1] == 0 and np.all(np.asarray(grad[:-1]) == 1)


# --- validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("make,message", [
    (lambda: Percentile(30), "percentile"), (lambda: Percentile(101), "percentile"),
    (lambda: MSE(num_ratios=0), "num_ratios"), (lambda: MSE(min_ratio=0), "min_ratio"),
    (lambda: MSE(norm=-1.0), "norm"),
])
def test_bad_calibrations_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()
