"""Learned quantization: LSQ step sizes for weights, PACT clipping values for activations.

Both are ordinary float parameters in a pytree that optax trains next to the model's params:

* **LSQ** (Esser et al. 2020, "Learned Step Size Quantization", arXiv:1902.08153): a weight's
  step s (one per tensor, channel or group — the `QuantSpec`'s granularity) is trained.
  Forward x̂ = s · clip(round(x/s), Qmin, Qmax); backward, with v = x/s,
  ∂x̂/∂x = 1 if Qmin ≤ v ≤ Qmax else 0 (straight-through), and
  ∂x̂/∂s = g · (round(v) − v) inside, g · Qmin below, g · Qmax above, where
  g = 1/√(N · Q_P), Q_P = Qmax and N is the number of elements sharing that step.
  The grid has no zero-point: a symmetric spec uses [−Qmax, Qmax] (2-bit: {−1, 0, 1}), an
  asymmetric one the full signed range [−2^(b−1), 2^(b−1)−1] (2-bit: {−2, −1, 0, 1}, LSQ's own
  signed grid), exported with zero-point 0; a mid-rise spec its levels s · (q + 1/2)
  (q = clip(floor(v)), Q_P = Qmax + 1/2, the same formulas with the half step added).
* **PACT** (Choi et al. 2018, "PACT: Parameterized Clipping Activation", arXiv:1805.06085): an
  activation's clip α (a scalar per tensor) is trained. An asymmetric spec is PACT's unsigned
  form y = clip(x, 0, α), quantized to 2^b levels with s = α/(2^b − 1) (jquant's range [0, α]:
  zero-point Qmin); a symmetric spec is the signed variant clip(x, −α, α) with s = α/Qmax.
  Backward: ∂y/∂x = 1 inside the clip, 0 outside; ∂y/∂α = 1 where x ≥ α (and −1 where x ≤ −α,
  signed), 0 inside (the rounding is straight-through).

A rotated weight spec (`QuantSpec(rotation=Hadamard())`) learns the steps of its stored values:
x̂ = R · LSQ(Rᵀ·x) along the rotation axis, the steps initialised from Rᵀ·x and exported as the
scales of the rotated QArray (`quantize(x, spec, scale=step)` stores Q(Rᵀ·x) with them). R is
orthogonal and linear, so the derivatives are LSQ's, rotated: ∂x̂/∂x = R·diag(inside)·Rᵀ.

Both estimators are `jax.custom_jvp` (as `fake_quant`), so `grad`, `jvp` and Hessian-vector
products all use them. In forward mode the g factor scales the step's tangent as it scales its
gradient in reverse mode: it is part of the estimator, not of the function.

The learned tree (`init`) is `{LSQ_STEP: steps, PACT_CLIP: clips}`; each is a nested
dict keyed by the paths of the params given (for a Linen model, its `params` collection, so that
the keys are module paths), holding a step for every kernel whose
rule has a `spec` and a clip for every kernel whose rule has an `act` (the clip of the activation
that meets that kernel). `jquant.flax` trains them in a wrapped Linen model (the two keys as
collections) and serves the clips as its static ranges. Serving goes through the existing path:
`quantize_params` gives `jquant.quantize_params`' tree of QArrays with the learned steps,
`learned_clips` each kernel's α, and `pact_range` the `act_scale`/`act_zero_point` of `QuantDot` & co.
Exported outputs equal the learned forward: the same formulas in the same float order.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import optax

from jquant._src import numerics, rotation
from jquant._src.formats import uniform
from jquant._src.formats.base import broadcast_fixed
from jquant._src.paths import leaves_with_paths, nest
from jquant._src.policy import Policy, matches, walk
from jquant._src.qarray import quantize
from jquant._src.spec import QuantSpec, untransformed
from jquant._src.ste import fake_quant

LSQ_STEP = "lsq_step"
"""Key (and Linen collection) of the learned weight steps."""
PACT_CLIP = "pact_clip"
"""Key (and Linen collection) of the learned activation clips."""

STEP_INITS = ("lsq", "absmax")


# ---------------------------------------------------------------------------------------------
# LSQ


def lsq_fake_quant(x, step, spec: QuantSpec, *, grad_scale: Optional[float] = None):
    """LSQ quantize→dequantize with a trainable step: x̂ = s · clip(round(x/s), Qmin, Qmax).

    Args:
      x: float array (a weight, or an activation with a per-tensor step).
      step: positive float steps, broadcastable to `numerics.layout(x.shape, spec).scale_shape`
        (a scalar is one step for the whole tensor).
      spec: a `method="uniform"` QuantSpec; its granularity says which elements share a step.
      grad_scale: g in ∂x̂/∂s; default 1/√(N · Qmax) with N = x.size / step.size, the number of
        elements per step (for an activation that is features × batch, as in the paper).

    Returns:
      float array of x's shape and dtype; gradients as in the module docstring.

    Raises:
      ValueError: a non-uniform method or an equalized spec, or a step that does not broadcast to the
        scale shape.
    """
    x = jnp.asarray(x)
    step = jnp.asarray(step)
    _check_lsq_spec(spec)
    lay = numerics.layout(x.shape, spec)
    if grad_scale is None:
        grad_scale = lsq_grad_scale(x.size, step.size, spec)
    step = broadcast_fixed("step", step.astype(numerics.compute_dtype(x.dtype)), spec, lay)
    if spec.rotation is None:
        return _lsq(spec, lay, float(grad_scale), x, step)
    # R · LSQ(Rᵀ·x) in the compute dtype, cast once at the end (as the rotated QArray dequantizes)
    stored = _lsq(untransformed(spec), lay, float(grad_scale), rotation.to_rotated(x, spec.rotation, lay.transform_axis), step)
    return rotation.from_rotated(stored, spec.rotation, lay.transform_axis).astype(x.dtype)


def _check_lsq_spec(spec: QuantSpec):
    if not spec.method.ranged:
        raise ValueError(f"LSQ learns the step of a uniform grid; {spec!r} has method={spec.method.name!r}")
    if spec.equalization is not None:
        raise ValueError(f"LSQ learns the steps of fixed stored values; {spec!r} has an equalization, whose r follows "
                         "the weight as it trains: use fake_quant (STE) with it, or LSQ without it")


def lsq_grad_scale(size: int, num_steps: int, spec: QuantSpec) -> float:
    """LSQ's gradient scale g = 1/√(N · Q_P), N = size / num_steps elements per step, Q_P the top
    level Qmax + offset (mid-rise: Qmax + 1/2)."""
    return 1.0 / math.sqrt(max(size // max(num_steps, 1), 1) * (spec.qmax + spec.offset))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _lsq(spec, lay, grad_scale, x, step):
    # No zero-point: the grid LSQ trains is [Qmin, Qmax] of the spec.
    return lay.from_grouped(uniform.fake_quantize_grouped(lay.to_grouped(x), step, None, spec)).astype(x.dtype)


@_lsq.defjvp
def _lsq_jvp(spec, lay, grad_scale, primals, tangents):
    x, step = primals
    dx, dstep = tangents
    out = _lsq(spec, lay, grad_scale, x, step)
    xg = lay.to_grouped(x).astype(step.dtype)
    v = xg / numerics.safe_divisor(step)
    level = uniform.unclipped_integers(xg, step, None, spec) + spec.offset  # round(v), mid-rise floor(v) + 1/2
    lowest, highest = spec.qmin + spec.offset, spec.qmax + spec.offset
    inside = (v >= lowest) & (v <= highest)
    # ∂x̂/∂s = level - v between the extreme levels; the extreme level itself beyond them.
    dstep_coef = jnp.where(inside, level - v, jnp.where(v < lowest, lowest, highest).astype(v.dtype))
    dxg = lay.to_grouped(dx).astype(step.dtype)
    tangent = jnp.where(inside, dxg, jnp.zeros_like(dxg)) + grad_scale * dstep_coef * dstep
    return out, lay.from_grouped(tangent).astype(out.dtype)


def lsq_init_step(x, spec: QuantSpec, *, init: str = "lsq"):
    """The initial step of `x` under `spec`, one per scale (shape `layout(x.shape, spec).scale_shape`).

    `init="lsq"`: the paper's s = 2 · mean|x| / √Q_P over each group; `init="absmax"`: the top
    level at the group's absmax, s = absmax / Q_P (every value inside the grid; coarser at 2–3
    bits, where clipping the tails pays). Q_P = Qmax + offset (mid-rise: Qmax + 1/2). Float32
    (float64 for float64 x); an all-zero group gets step 1. A rotated spec: the steps of Rᵀ·x.
    """
    if init not in STEP_INITS:
        raise ValueError(f"init={init!r} is unknown; allowed: {', '.join(STEP_INITS)}")
    _check_lsq_spec(spec)
    x = jnp.asarray(x)
    lay = numerics.layout(x.shape, spec)
    x = x.astype(numerics.compute_dtype(x.dtype))
    if spec.rotation is not None:
        x = rotation.to_rotated(x, spec.rotation, lay.transform_axis)
    xg = lay.to_grouped(x)
    top = spec.qmax + spec.offset
    if init == "lsq":
        step = 2 * jnp.mean(jnp.abs(xg), axis=lay.reduce_axes, keepdims=True) / math.sqrt(top)
    else:
        step = numerics.extrema(xg, lay.reduce_axes, "absmax") / top
    # A zero step would have no gradient to grow from; 1 is as good as any for an all-zero group.
    return jnp.where(step > 0, step, jnp.ones_like(step))


# ---------------------------------------------------------------------------------------------
# PACT


def pact_range(clip, spec: QuantSpec):
    """Static activation (scale, zero_point) of the clip α: the range [0, α] for an asymmetric
    spec (s = α/(2^b − 1), z = Qmin), [−α, α] for a symmetric one (s = α/Qmax, z = None) — what
    `QuantDot(act=spec, act_scale=..., act_zero_point=...)` takes to serve a PACT activation."""
    _check_pact_spec(spec)
    clip = jnp.asarray(clip)
    if spec.symmetric:
        return uniform.scale_from_range(-jnp.abs(clip), jnp.abs(clip), spec)
    return uniform.scale_from_range(jnp.zeros_like(clip), clip, spec)


def pact(x, clip, spec: QuantSpec):
    """PACT: clip the activation to [0, α] (asymmetric spec) or [−α, α] (symmetric) and quantize.

    Forward: exactly `fake_quant(x, spec, *pact_range(α, spec))` (the static-range path that
    serving runs). Backward: ∂/∂x = 1 inside the clip range, 0 outside; ∂/∂α = 1 where x ≥ α,
    −1 where x ≤ −α (symmetric), 0 elsewhere.

    Args:
      x: float activation of any shape. clip: the scalar α > 0. spec: a per-tensor uniform spec.

    Returns:
      float array of x's shape and dtype.
    """
    _check_pact_spec(spec)
    x = jnp.asarray(x)
    return _pact(spec, x, jnp.asarray(clip, numerics.compute_dtype(x.dtype)))


def _check_pact_spec(spec: QuantSpec):
    if not spec.method.ranged or spec.midrise or spec.channel_axes or spec.group_size is not None:
        raise ValueError(f"PACT learns one clip per tensor on a uniform mid-tread grid; {spec!r} is not a "
                         "per-tensor uniform spec (no channel_axes, group_size or midrise)")


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _pact(spec, x, clip):
    scale, zero_point = pact_range(clip, spec)
    return fake_quant(x, spec, scale=scale, zero_point=zero_point)


@_pact.defjvp
def _pact_jvp(spec, primals, tangents):
    x, clip = primals
    dx, dclip = tangents
    out = _pact(spec, x, clip)
    lo = -clip if spec.symmetric else jnp.zeros_like(clip)
    above = x >= clip
    below = (x <= lo) if spec.symmetric else (x < lo)
    zero = jnp.zeros_like(dx)
    dclip = jnp.asarray(dclip, dx.dtype)
    tangent = jnp.where(above | below, zero, dx) + jnp.where(above, dclip, zero)
    if spec.symmetric:
        tangent = tangent - jnp.where(below, dclip, zero)
    return out, tangent


# ---------------------------------------------------------------------------------------------
# Trees


def init(params, policy: Policy, *, step_init: str = "lsq", clip: float = 6.0,
                 act_ranges: Optional[Dict[str, tuple]] = None) -> Dict[str, dict]:
    """The learned tree for `params` under `policy`: `{LSQ_STEP: steps, PACT_CLIP: clips}`.

    Args:
      params: a parameter pytree whose paths the policy names (for a Linen model its `params`
        collection, `variables["params"]`: the keys are then the module paths its collections use).
      policy: a rule with a uniform `spec` gives its kernel a step (`lsq_init_step(kernel, spec,
        init=step_init)`), one with a uniform per-tensor `act` gives it a clip α.
      step_init: "lsq" (2 · mean|w| / √Qmax) or "absmax" (absmax / Qmax).
      clip: the initial α when `act_ranges` has no range for that kernel.
      act_ranges: optional calibrated activation ranges {kernel path: (lo, hi)} (a Linen model's
        observers give them: `jquant.flax.act_ranges(variables)`): α starts at hi
        (max(−lo, hi) for a symmetric act spec).

    Returns:
      A dict of two nested dicts keyed like the params paths.
    """
    steps, clips = {}, {}
    ranges = dict(act_ranges or {})
    for match in matches(params, policy, where="learned.init",
                         selects=lambda rule: rule.spec is not None or rule.act is not None):
        rule, key = match.rule, match.path
        if rule.spec is not None and rule.spec.method.ranged:  # sign/codebooks keep their own scales
            try:
                nest(steps, key, lsq_init_step(match.leaf, rule.spec, init=step_init))
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
        if rule.act is not None:
            _check_pact_spec(rule.act)
            lo, hi = ranges.get(key, (None, None))
            alpha = clip if hi is None else (jnp.maximum(-lo, hi) if rule.act.symmetric else hi)
            nest(clips, key, jnp.asarray(alpha, jnp.float32))
    return {LSQ_STEP: steps, PACT_CLIP: clips}


def fake_quant_params(params, learned, policy: Policy):
    """`params` with every kernel that has a learned step LSQ fake-quantized (differentiable with
    respect to both); other leaves unchanged. Feed it to an unwrapped model for weight-only LSQ."""
    steps = _flatten(learned.get(LSQ_STEP, {}))

    def lsq(match):
        step = steps.get(match.path)
        return match.leaf if step is None else lsq_fake_quant(match.leaf, step, match.rule.spec)

    return walk(params, policy, lsq, where="learned.fake_quant_params", warn_unused=False)


def quantize_params(params, learned, policy: Policy):
    """Serve the learned steps: the tree `jquant.quantize_params(params, policy)` gives, with each
    learned kernel quantized by `quantize(w, spec, scale=step)` (zero-point 0 for an asymmetric
    spec) so that it dequantizes to exactly `lsq_fake_quant(w, step, spec)`. Kernels without a
    learned step are quantized as `quantize_params` does."""
    steps = _flatten(learned.get(LSQ_STEP, {}))

    def export(match):
        leaf, spec = match.leaf, match.rule.spec
        step = steps.get(match.path)
        if step is None:
            return quantize(leaf, spec)
        lay = numerics.layout(leaf.shape, spec)
        step = jnp.broadcast_to(jnp.asarray(step, numerics.compute_dtype(leaf.dtype)), lay.scale_shape)
        zero_point = None if spec.symmetric else jnp.zeros(lay.scale_shape, jnp.int8)
        return quantize(leaf, spec, scale=step, zero_point=zero_point)

    return walk(params, policy, export, where="learned.quantize_params", warn_unused=False)


def learned_clips(learned) -> Dict[str, jax.Array]:
    """{kernel path: α} of every learned clip (float32 scalars)."""
    return {key: jnp.asarray(alpha, jnp.float32) for key, alpha in _flatten(learned.get(PACT_CLIP, {})).items()}


def optimizer(params_tx: optax.GradientTransformation,
                      learned_tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optax.multi_transform` for a tree `{"params": ..., LSQ_STEP: ..., PACT_CLIP: ...}` (a Linen
    variables dict with the learned tree merged in): `learned_tx` updates the steps and clips,
    `params_tx` everything else. With Adam the gradient scale g mostly cancels (Adam divides by
    the gradient's magnitude), which makes the steps' own learning rate the knob that matters."""
    def labels(tree):
        return {key: "learned" if key in (LSQ_STEP, PACT_CLIP) else "params" for key in tree}

    return optax.multi_transform({"params": params_tx, "learned": learned_tx}, labels)


def _flatten(tree) -> dict:
    return {path: leaf for path, leaf in leaves_with_paths(tree)}
