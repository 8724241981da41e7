"""jquant.learned: LSQ steps and PACT clips — forward vs NumPy float64, the estimators' gradients,
export to QArrays / static ranges, optax training, jit/grad/jvp/vmap."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jquant
from jquant._src import paths
from jquant import Policy, QuantSpec, Rule
from jquant import learned

import reference
from helpers import Mlp, normal

SHAPE = (16, 6)

SPECS = [
    QuantSpec(2),
    QuantSpec(2, symmetric=False, channel_axes=(1,)),
    QuantSpec(4, channel_axes=(1,)),
    QuantSpec(3, channel_axes=(1,), group_size=4),
    QuantSpec(8, symmetric=False, group_size=8, group_axis=0),
    QuantSpec(2, midrise=True, channel_axes=(0,)),
]
IDS = [repr(s) for s in SPECS]


def _lsq_reference(x, step, spec):
    """NumPy float64: x̂ = s · (clip(round(x/s), Qmin, Qmax) + offset) (mid-rise: floor)."""
    x = np.asarray(x, np.float64)
    s = reference.expand(np.asarray(step, np.float64), x.shape, spec)
    v = x / s
    q = np.floor(v) if spec.midrise else reference.round_half_even(v)
    return s * (np.clip(q, spec.qmin, spec.qmax) + spec.offset)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_lsq_forward_matches_reference_and_export(spec):
    x = normal(0, SHAPE)
    step = learned.lsq_init_step(x, spec) * 0.8  # clip some values
    assert step.shape == reference.scale_shape(x.shape, spec)
    out = learned.lsq_fake_quant(x, step, spec)
    np.testing.assert_allclose(np.asarray(out), _lsq_reference(x, step, spec), rtol=1e-6, atol=1e-6)
    # exported QArray dequantizes to exactly the LSQ forward
    policy = Policy([Rule("w", spec)])
    qa = learned.quantize_params({"w": x}, {learned.LSQ_STEP: {"w": step}}, policy)["w"]
    assert isinstance(qa, jquant.QArray) and qa.spec == spec
    np.testing.assert_array_equal(np.asarray(qa.dequantize()), np.asarray(out))


def test_lsq_gradients_by_hand():
    # 2-bit asymmetric spec: LSQ's signed grid {-2, -1, 0, 1}·s, Q_P = 1.
    spec = QuantSpec(2, symmetric=False)
    x = jnp.asarray([-3.0, -1.2, -0.4, 0.2, 0.6, 1.4, 2.6], jnp.float32)
    s = jnp.float32(0.5)
    v = np.asarray(x, np.float64) / 0.5  # [-6, -2.4, -0.8, 0.4, 1.2, 2.8, 5.2]
    out = learned.lsq_fake_quant(x, s, spec)
    np.testing.assert_allclose(np.asarray(out), [-1.0, -1.0, -0.5, 0.0, 0.5, 0.5, 0.5])
    cot = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    gx, gs = jax.grad(lambda x, s: jnp.sum(cot * learned.lsq_fake_quant(x, s, spec)), argnums=(0, 1))(x, s)
    inside = (v >= -2) & (v <= 1)
    np.testing.assert_array_equal(np.asarray(gx), np.where(inside, cot, 0))
    coef = np.where(inside, np.round(v) - v, np.where(v < -2, -2.0, 1.0))  # [-2, -2, 0.2, -0.4, -0.2, 1, 1]
    g = 1 / math.sqrt(7 * 1)
    np.testing.assert_allclose(float(gs), g * np.sum(np.asarray(cot) * coef), rtol=1e-6)
    # an explicit grad_scale replaces g; forward mode gives the same estimator
    gs1 = jax.grad(lambda s: jnp.sum(cot * learned.lsq_fake_quant(x, s, spec, grad_scale=1.0)))(s)
    np.testing.assert_allclose(float(gs1), np.sum(np.asarray(cot) * coef), rtol=1e-6)
    _, tangent = jax.jvp(lambda s: learned.lsq_fake_quant(x, s, spec), (s,), (jnp.float32(1.0),))
    np.testing.assert_allclose(np.asarray(tangent), g * coef, rtol=1e-6)


@pytest.mark.parametrize("spec", SPECS[1:], ids=IDS[1:])
def test_lsq_per_channel_and_group_step_gradients(spec):
    x = normal(0, SHAPE)
    step = learned.lsq_init_step(x, spec)
    gs = jax.grad(lambda s: jnp.sum(learned.lsq_fake_quant(x, s, spec)))(step)
    assert gs.shape == step.shape
    # the reference: per element coef, summed over each step's group, times g = 1/sqrt(N Q_P)
    xs = np.asarray(x, np.float64)
    s = reference.expand(np.asarray(step, np.float64), x.shape, spec)
    v = xs / s
    level = (np.floor(v) + 0.5) if spec.midrise else reference.round_half_even(v)
    lo, hi = spec.qmin + spec.offset, spec.qmax + spec.offset
    coef = np.where((v >= lo) & (v <= hi), level - v, np.where(v < lo, lo, hi))
    which = reference.expand(np.arange(step.size).reshape(step.shape), x.shape, spec)  # each element's step
    n = x.size // step.size
    expect = np.zeros(step.size)
    np.add.at(expect, which.ravel(), coef.ravel())
    np.testing.assert_allclose(np.asarray(gs).ravel(), expect / math.sqrt(n * hi), rtol=1e-5, atol=1e-6)


def test_lsq_init():
    x = normal(0, (32, 4))
    spec = QuantSpec(3, channel_axes=(1,))
    np.testing.assert_allclose(np.asarray(learned.lsq_init_step(x, spec)).ravel(),
                               2 * np.mean(np.abs(np.asarray(x)), 0) / math.sqrt(3), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(learned.lsq_init_step(x, spec, init="absmax")).ravel(),
                               np.max(np.abs(np.asarray(x)), 0) / 3, rtol=1e-6)
    assert float(learned.lsq_init_step(jnp.zeros((4, 4)), QuantSpec(4))[0, 0]) == 1.0
    with pytest.raises(ValueError, match="init="):
        learned.lsq_init_step(x, spec, init="mse")
    with pytest.raises(ValueError, match="uniform"):
        learned.lsq_fake_quant(x, 1.0, QuantSpec(1, method="sign"))
    with pytest.raises(ValueError, match="broadcast"):
        learned.lsq_fake_quant(x, jnp.ones(3), spec)


@pytest.mark.parametrize("symmetric", [False, True])
def test_pact_forward_and_gradient_rule(symmetric):
    spec = QuantSpec(2, symmetric=symmetric)
    alpha = jnp.float32(1.5)
    x = jnp.asarray([-2.0, -1.5, -0.7, 0.0, 0.4, 1.0, 1.5, 3.0], jnp.float32)
    xs = np.asarray(x, np.float64)
    lo = -1.5 if symmetric else 0.0
    levels = 1 if symmetric else 3  # s = α/Qmax signed, α/(2^b - 1) unsigned
    s = 1.5 / levels
    expect = s * reference.round_half_even(np.clip(xs, lo, 1.5) / s)
    np.testing.assert_allclose(np.asarray(learned.pact(x, alpha, spec)), expect, rtol=1e-6)
    cot = jnp.arange(1.0, 9.0)
    gx, ga = jax.grad(lambda x, a: jnp.sum(cot * learned.pact(x, a, spec)), argnums=(0, 1))(x, alpha)
    above, below = xs >= 1.5, (xs <= lo) if symmetric else (xs < lo)
    np.testing.assert_array_equal(np.asarray(gx), np.where(above | below, 0, cot))
    dalpha = np.sum(np.where(above, cot, 0)) - (np.sum(np.where(below, cot, 0)) if symmetric else 0)
    assert float(ga) == dalpha
    # the forward is the static-range fake quantization that serving runs
    scale, zero_point = learned.pact_range(alpha, spec)
    np.testing.assert_array_equal(np.asarray(learned.pact(x, alpha, spec)),
                                  np.asarray(jquant.fake_quant(x, spec, scale=scale, zero_point=zero_point)))
    with pytest.raises(ValueError, match="per-tensor"):
        learned.pact(x, alpha, QuantSpec(2, channel_axes=(0,)))


def test_jit_grad_vmap_jvp():
    spec = QuantSpec(3, channel_axes=(1,))
    x = normal(0, (5, 8, 6))
    step = learned.lsq_init_step(x[0], spec)
    f = lambda x, s: learned.lsq_fake_quant(x, s, spec)
    batched = jax.jit(jax.vmap(f, in_axes=(0, None)))(x, step)
    np.testing.assert_array_equal(np.asarray(batched), np.stack([np.asarray(f(xi, step)) for xi in x]))
    g = jax.jit(jax.grad(lambda s: jnp.sum(jax.vmap(f, in_axes=(0, None))(x, s) ** 2)))(step)
    assert g.shape == step.shape and bool(jnp.all(jnp.isfinite(g)))
    # Hessian-vector product (forward over reverse) runs through both custom JVPs
    loss = lambda s, a: jnp.sum(learned.pact(f(x[0], s), a, QuantSpec(4, symmetric=False)) ** 2)
    hvp = jax.jvp(jax.grad(loss), (step, jnp.float32(2.0)), (jnp.ones_like(step), jnp.float32(0.0)))[1]
    assert hvp.shape == step.shape


POLICY = Policy([Rule(r".*kernel", QuantSpec(2, symmetric=False, channel_axes=(-1,)),
                      act=QuantSpec(4, symmetric=False))])


def _data():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(256, 16)).astype(np.float32)
    y = (x[:, :10] @ rng.standard_normal((10, 10))).argmax(-1)
    return jnp.asarray(x), jnp.asarray(y)


def test_tree_init_linen_training_and_export():
    x, y = _data()
    qmodel = jquant.flax.quantize(Mlp(hidden=32), POLICY)
    params = qmodel.init(jax.random.key(0), x[:1])["params"]
    stats = jquant.flax.calibrate(qmodel, [(x,)], variables={"params": params})
    state = learned.init(params, POLICY, act_ranges=jquant.flax.act_ranges(stats))
    assert jax.tree.map(jnp.shape, state) == {
        learned.LSQ_STEP: {"Dense_0": {"kernel": (1, 32)}, "Dense_1": {"kernel": (1, 10)}},
        learned.PACT_CLIP: {"Dense_0": {"kernel": ()}, "Dense_1": {"kernel": ()}}}
    assert float(state[learned.PACT_CLIP]["Dense_0"]["kernel"]) == float(stats["quant_stats"]["Dense_0"]["act_hi"])

    variables = {"params": params, **state}
    optimizer = learned.optimizer(optax.adam(1e-2), optax.adam(1e-2))
    loss_fn = lambda v: optax.softmax_cross_entropy_with_integer_labels(qmodel.apply(v, x), y).mean()

    @jax.jit
    def step(v, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(v)
        updates, opt_state = optimizer.update(grads, opt_state, v)
        return optax.apply_updates(v, updates), opt_state, loss

    opt_state = optimizer.init(variables)
    trained, losses = variables, []
    for _ in range(60):
        trained, opt_state, loss = step(trained, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
    for key in (learned.LSQ_STEP, learned.PACT_CLIP):
        changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), trained[key], variables[key])
        assert all(jax.tree.leaves(changed)), key

    # serving: QArray kernels with the learned steps, the clips as static ranges — same logits
    served = {"params": learned.quantize_params(trained["params"], trained, POLICY),
              "quant_stats": jquant.flax.learned_stats(trained, POLICY)}
    kinds = jax.tree.map(type, jquant.quantize_params(trained["params"], POLICY), is_leaf=paths.is_qarray)
    assert jax.tree.map(type, served["params"], is_leaf=paths.is_qarray) == kinds
    np.testing.assert_allclose(np.asarray(jax.jit(qmodel.apply)(served, x)),
                               np.asarray(jax.jit(qmodel.apply)(trained, x)), atol=1e-4)
    # the functional path: LSQ fake-quantized params = the exported kernels dequantized
    fq = learned.fake_quant_params(trained["params"], trained, POLICY)
    deq = jquant.dequantize_params(served["params"])
    for a, b in zip(jax.tree.leaves(fq), jax.tree.leaves(deq)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_learned_optimizer_gives_steps_their_own_rate():
    tree = {"params": {"w": jnp.ones(3)}, learned.LSQ_STEP: {"w": jnp.ones(())}}
    grads = jax.tree.map(jnp.ones_like, tree)
    optimizer = learned.optimizer(optax.sgd(1.0), optax.sgd(0.01))
    updates, _ = optimizer.update(grads, optimizer.init(tree), tree)
    np.testing.assert_allclose(np.asarray(updates["params"]["w"]), -1.0)
    np.testing.assert_allclose(float(updates[learned.LSQ_STEP]["w"]), -0.01)
