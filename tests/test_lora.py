"""LoRA over quantized kernels (`jquant.LoRA`, `Rule(..., lora=...)`, `jquant.merge`, the Flax
wrappers): the model starts at its base, y = x·Ŵ + (α/r)·(x·A)·B against NumPy float64, training
moves the adapters only, merge folds them in, checkpoints keep them, serving holds no float copy."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jquant
from jquant import LoRA, Policy, QuantSpec, Rule
from jquant._src import paths
from jquant._src.policy import ATTENTION_IN, ATTENTION_OUT, KERNEL

from helpers import assert_same_bits, normal

R = LoRA(4, alpha=8.0)  # scale α/r = 2
merge = jax.jit(jquant.merge, static_argnums=2, static_argnames="quantize")  # compiled: one program, not op by op


def nf4_weights(lora):
    """NF4 with groups of 64 in the presets' layouts (per head for attention)."""
    nf4 = dict(bits=4, method="nf4")
    return Policy([Rule(ATTENTION_IN, QuantSpec(channel_axes=(-2, -1), group_size=64, **nf4), ndim=3, optional=True,
                        lora=lora),
                   Rule(ATTENTION_OUT, QuantSpec(channel_axes=(-1,), group_axis=0, group_size=1, **nf4), ndim=3,
                        optional=True, lora=lora),
                   Rule(KERNEL, QuantSpec(channel_axes=(-1,), group_size=64, **nf4), optional=True, lora=lora)])


POLICIES = {"int4 g128": jquant.int4_weights(lora=R), "nf4 g64": nf4_weights(R), "int8": jquant.int8_weights(lora=R)}


class Block(nn.Module):
    """Flax attention's kernels (query (in, heads, head_dim), out (heads, head_dim, out)) and a Dense."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((4, 32), name="query")(x)                      # (256, 4, 32)
        h = nn.DenseGeneral(128, axis=(-2, -1), name="out")(jnp.tanh(h))   # (4, 32, 128)
        return nn.Dense(8, name="head")(jnp.tanh(h))                       # (128, 8)


def _layers(params, lora):
    """[(W, bias, A, B)] float64 in call order, W dequantized."""
    out = []
    params = _dequantize(params)
    for name in ("query", "out", "head"):
        w = params[name]["kernel"]
        f64 = lambda a: np.asarray(a, np.float64)
        out.append((f64(w), f64(params[name]["bias"]), f64(lora[name]["kernel"]["lora_a"]),
                    f64(lora[name]["kernel"]["lora_b"])))
    return out


def _reference(x, layers, scale):
    """NumPy float64: each layer x·W + b + scale·(x·A)·B over its leading kernel axes, tanh between."""
    h = np.asarray(x, np.float64)
    for i, (w, b, a, bb) in enumerate(layers):
        n = a.ndim - 1
        h = np.tensordot(h, w, n) + b + scale * np.tensordot(np.tensordot(h, a, n), bb, 1)
        h = np.tanh(h) if i < len(layers) - 1 else h
    return h


_dequantize = jax.jit(jquant.dequantize_params)


def _perturbed(lora, seed=7):
    """The adapters moved by N(0, 0.05²) noise: a nonzero B, as after training."""
    leaves, tree = jax.tree_util.tree_flatten(lora)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(tree, [jnp.asarray(np.asarray(leaf) + 0.05 * rng.standard_normal(leaf.shape),
                                                           jnp.float32) for leaf in leaves])


def _qarrays(tree):
    return [leaf for leaf in jax.tree_util.tree_leaves(tree, is_leaf=paths.is_qarray) if paths.is_qarray(leaf)]


@pytest.fixture(scope="module")
def block_variables():
    """Block's variables from the wrapper's init (the same for every policy with the same LoRA)."""
    x = normal(0, (3, 5, 256))
    return x, jax.jit(jquant.flax.quantize(Block(), POLICIES["int4 g128"]).init)(jax.random.key(0), x)


@pytest.mark.parametrize("name", POLICIES)
def test_linen_starts_at_the_base_serves_the_reference_and_trains_only_the_adapters(name, block_variables):
    policy = POLICIES[name]
    x, variables = block_variables
    qmodel = jquant.flax.quantize(Block(), policy)
    lora = variables["lora"]
    assert jax.tree_util.tree_map(jnp.shape, lora) == {
        "query": {"kernel": {"lora_a": (256, 4), "lora_b": (4, 4, 32)}},
        "out": {"kernel": {"lora_a": (4, 32, 4), "lora_b": (4, 128)}},
        "head": {"kernel": {"lora_a": (128, 4), "lora_b": (4, 8)}}}
    assert all(not np.any(np.asarray(v["kernel"]["lora_b"])) for v in lora.values())
    served = jquant.quantize_params(variables["params"], policy)
    assert len(_qarrays(served)) == 3
    apply = jax.jit(qmodel.apply)
    base = apply({"params": served}, x)
    np.testing.assert_array_equal(np.asarray(apply({"params": served, "lora": lora}, x)), np.asarray(base))  # B = 0
    moved = _perturbed(lora)
    y = np.asarray(apply({"params": served, "lora": moved}, x), np.float64)
    ref = _reference(x, _layers(served, moved), R.scale)
    assert np.max(np.abs(y - ref)) <= 2e-5 * np.max(np.abs(ref))
    assert np.max(np.abs(y - np.asarray(base))) > 1e-2 * np.max(np.abs(ref))  # the adapters do something

    # Training: the adapters are the only trainable tree; the params (QArrays: integer codes and
    # scales) are a constant argument of the loss, and the optimizer state is the adapters' alone.
    kept = jax.tree_util.tree_map(np.array, served)
    target = jnp.tanh(normal(3, (3, 5, 8)))
    loss = lambda lora, params: jnp.mean((qmodel.apply({"params": params, "lora": lora}, x) - target) ** 2)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(lora, opt_state, params):
        value, grads = jax.value_and_grad(loss)(lora, params)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, value

    opt_state = tx.init(lora)
    losses = []
    for _ in range(25):
        lora, opt_state, value = step(lora, opt_state, served)
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0]
    assert_same_bits(served, kept, "served params after training")
    assert all(np.any(np.asarray(v["kernel"]["lora_b"])) for v in lora.values())


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.query = nnx.LinearGeneral(256, (4, 32), rngs=rngs)
        self.out = nnx.LinearGeneral((4, 32), 128, axis=(-2, -1), rngs=rngs)
        self.head = nnx.Linear(128, 8, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.out(jnp.tanh(self.query(x)))))


_call = nnx.jit(lambda model, x: model(x))


def test_nnx_lora_params_start_at_the_base_serve_the_reference_and_train_alone():
    policy = POLICIES["int4 g128"]  # the other formats: the Linen tests (the same ops)
    x = normal(0, (3, 5, 256))
    model = jquant.flax.quantize(NnxBlock(nnx.Rngs(0)), policy, rngs=nnx.Rngs(1))
    assert jax.tree_util.tree_map(jnp.shape, jquant.flax.adapters(model)) == {
        "query": {"kernel": {"lora_a": (256, 4), "lora_b": (4, 4, 32)}},
        "out": {"kernel": {"lora_a": (4, 32, 4), "lora_b": (4, 128)}},
        "head": {"kernel": {"lora_a": (128, 4), "lora_b": (4, 8)}}}
    base_model = NnxBlock(nnx.Rngs(0))
    qat_base = _call(jquant.flax.quantize(base_model, jquant.int4_weights()), x)
    np.testing.assert_array_equal(np.asarray(_call(model, x)), np.asarray(qat_base))  # B = 0: QAT start = base
    frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    nnx.update(model, jquant.quantize_params(nnx.state(model, frozen), policy))
    served = jax.tree_util.tree_map(np.array, nnx.state(model, frozen))
    assert len(_qarrays(served)) == 3

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    target = jnp.tanh(normal(3, (3, 5, 8)))

    @nnx.jit
    def step(model, optimizer):
        loss = lambda m: jnp.mean((m(x) - target) ** 2)
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return value

    losses = [float(step(model, optimizer)) for _ in range(25)]
    assert losses[-1] < 0.5 * losses[0]
    assert_same_bits(nnx.state(model, frozen), served, "served params after training")
    trained = jquant.flax.adapters(model)
    params = jax.tree_util.tree_map(lambda v: v, nnx.to_pure_dict(nnx.state(model, frozen)))
    y = np.asarray(_call(model, x), np.float64)
    ref = _reference(x, _layers(params, trained), R.scale)
    assert np.max(np.abs(y - ref)) <= 2e-5 * np.max(np.abs(ref))
    # merged (Ŵ + (α/r)·A·B, float) into a plain model: the same function
    merged = NnxBlock(nnx.Rngs(0))
    nnx.update(merged, merge(nnx.state(model, frozen), trained, policy))
    np.testing.assert_allclose(np.asarray(_call(merged, x)), y, rtol=1e-5, atol=1e-5)


def test_qat_lora_fake_quantizes_the_float_base_and_merge_folds_the_adapters(block_variables):
    policy = POLICIES["int4 g128"]
    x, variables = block_variables
    qmodel = jquant.flax.quantize(Block(), policy)
    lora = _perturbed(variables["lora"])
    params = variables["params"]
    qat = np.asarray(jax.jit(qmodel.apply)({"params": params, "lora": lora}, x), np.float64)
    # the float base is fake-quantized by the spec (= dequantize(quantize(W))), the adapters float
    ref = _reference(x, _layers(jquant.quantize_params(params, policy), lora), R.scale)
    assert np.max(np.abs(qat - ref)) <= 2e-5 * np.max(np.abs(ref))
    grads = jax.jit(jax.grad(lambda l: jnp.sum(qmodel.apply({"params": params, "lora": l}, x) ** 2)))(lora)
    assert all(float(jnp.sum(jnp.abs(g))) > 0 for g in jax.tree_util.tree_leaves(grads))

    # merge: W + (α/r)·A·B (float64 reference), through the plain model = the float LoRA model
    merged = merge(params, lora, policy)
    for name, (w, _, a, b) in zip(("query", "out", "head"), _layers(params, lora)):
        n = a.ndim - 1
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"], np.float64),
                                   w + R.scale * np.tensordot(a, b, 1).reshape(w.shape), rtol=0, atol=1e-6)
        assert n == (2 if name == "out" else 1)
    float_lora = jquant.int4_weights(lora=R)
    float_lora = Policy([Rule(r.pattern, None, ndim=r.ndim, optional=True, lora=R) for r in float_lora.rules])
    np.testing.assert_allclose(np.asarray(jax.jit(Block().apply)({"params": merged}, x)),
                               np.asarray(jax.jit(jquant.flax.quantize(Block(), float_lora).apply)(
                                   {"params": params, "lora": lora}, x)), rtol=1e-5, atol=1e-5)
    # re-quantized through the policy: the QArrays of the merged float kernels
    requantized = merge(params, lora, policy, quantize=True)
    assert_same_bits(requantized, jquant.quantize_params(merged, policy), "merge(quantize=True)")
    # a QLoRA tree (QArray kernels) merges as Ŵ + (α/r)·A·B
    served = jquant.quantize_params(params, policy)
    merged_q = merge(served, lora, policy)
    head = lora["head"]["kernel"]
    np.testing.assert_allclose(np.asarray(merged_q["head"]["kernel"]),
                               np.asarray(_dequantize(served)["head"]["kernel"])
                               + R.scale * np.asarray(head["lora_a"]) @ np.asarray(head["lora_b"]),
                               rtol=1e-6, atol=1e-6)


def test_a_checkpoint_keeps_the_adapters_beside_the_qarrays(tmp_path, block_variables):
    policy = POLICIES["int4 g128"]
    x, variables = block_variables
    qmodel = jquant.flax.quantize(Block(), policy)
    tree = {"params": jquant.quantize_params(variables["params"], policy), "lora": _perturbed(variables["lora"])}
    jquant.save(tmp_path / "qlora", tree)
    loaded = jquant.load(tmp_path / "qlora")
    assert_same_bits(loaded, tree, "loaded checkpoint")
    apply = jax.jit(qmodel.apply)
    np.testing.assert_array_equal(np.asarray(apply(loaded, x)), np.asarray(apply(tree, x)))


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(128)(jax.nn.gelu(nn.Dense(256)(x))), None


class _LinenStack(nn.Module):
    lora_axis: bool = True

    @nn.compact
    def __call__(self, x):
        axes = {"params": 0, "lora": 0} if self.lora_axis else {"params": 0}
        return nn.scan(_Scanned, variable_axes=axes, split_rngs={"params": True}, length=3)()(x, None)[0]


def test_scanned_layers_get_their_own_adapters_serve_and_merge():
    policy = jquant.int4_weights(stacked=1, lora=R)
    x = normal(0, (2, 8, 128))
    qmodel = jquant.flax.quantize(_LinenStack(), policy)
    variables = jax.jit(qmodel.init)(jax.random.key(0), x)
    lora = variables["lora"]["Scan_Scanned_0"]
    assert jax.tree_util.tree_map(jnp.shape, lora) == {
        "Dense_0": {"kernel": {"lora_a": (3, 256, 4), "lora_b": (3, 4, 128)}},
        "Dense_1": {"kernel": {"lora_a": (3, 128, 4), "lora_b": (3, 4, 256)}}}
    a = np.asarray(lora["Dense_0"]["kernel"]["lora_a"])
    assert not np.array_equal(a[0], a[1])  # each layer draws its own A
    trained = _perturbed(variables["lora"])
    served = jquant.quantize_params(variables["params"], policy)
    qat = jax.jit(qmodel.apply)({"params": variables["params"], "lora": trained}, x)
    np.testing.assert_allclose(np.asarray(jax.jit(qmodel.apply)({"params": served, "lora": trained}, x)),
                               np.asarray(qat), rtol=1e-5, atol=1e-5)
    float_lora = Policy(Rule(r".*kernel", None, stacked=1, lora=R))
    merged = merge(variables["params"], trained, float_lora)
    np.testing.assert_allclose(np.asarray(jax.jit(_LinenStack().apply)({"params": merged}, x)),
                               np.asarray(jax.jit(jquant.flax.quantize(_LinenStack(), float_lora).apply)(
                                   {"params": variables["params"], "lora": trained}, x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"Dense_\d/kernel: .*variable_axes=\{'params': 0, 'lora': 0\}"):
        jquant.flax.quantize(_LinenStack(lora_axis=False), policy).init(jax.random.key(0), x)


def test_nnx_stacked_layers_get_adapters_per_layer():
    class Stack(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return nnx.Linear(128, 128, rngs=rngs)

            self.layers = make(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def step(layer, x):
                return jnp.tanh(layer(x))

            return step(self.layers, x)

    policy = jquant.int4_weights(stacked=1, lora=R)
    model = jquant.flax.quantize(Stack(nnx.Rngs(0)), policy, rngs=nnx.Rngs(1))
    adapters = jquant.flax.adapters(model)["layers"]["kernel"]
    assert adapters["lora_a"].shape == (3, 128, 4) and adapters["lora_b"].shape == (3, 4, 128)
    x = normal(0, (2, 128))
    before = _call(model, x)
    frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    nnx.update(model, jquant.quantize_params(nnx.state(model, frozen), policy))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
    optimizer.update(model, grads)
    assert np.any(np.asarray(jquant.flax.adapters(model)["layers"]["kernel"]["lora_b"][2]))
    assert float(jnp.max(jnp.abs(_call(model, x) - before))) > 1e-4


def test_w8a8_lora_calibrates_static_ranges():
    # the activation observers sit under the adapters (Linen: the interceptor; NNX: LoRADot's op)
    x = normal(0, (16, 128))
    policy = jquant.w8a8(lora=R)
    qmodel = jquant.flax.quantize(nn.Dense(64), policy)
    variables = jquant.flax.calibrate(qmodel, [(x,)], variables=jax.jit(qmodel.init)(jax.random.key(0), x))
    assert float(variables["quant_stats"]["act_hi"]) == pytest.approx(float(jnp.max(x)))
    model = jquant.flax.quantize(nnx.Linear(128, 64, rngs=nnx.Rngs(0)), policy, rngs=nnx.Rngs(1))
    jquant.flax.calibrate(model, [(x,)])
    stats = nnx.state(model, jquant.flax.QuantStat)
    assert float(stats["dot_general"]["op"]["act_hi"][...]) == pytest.approx(float(jnp.max(x)))
    before = _call(model, x)
    nnx.update(model, jquant.quantize_params(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))), policy))
    np.testing.assert_allclose(np.asarray(_call(model, x)), np.asarray(before), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", [jquant.int4_weights(lora=LoRA(16)), nf4_weights(LoRA(16))], ids=["int4", "nf4"])
def test_served_qlora_holds_no_float_copy_of_its_kernels(policy):
    # 4096² Dense and Flax attention (4096, 32, 128) / (32, 128, 4096) kernels at decode shape: a
    # float copy of one would be 64 MiB (shapes only: nothing this size is computed)
    for model, x in ((nn.Dense(4096), jax.ShapeDtypeStruct((1, 4096), jnp.float32)),
                     (nn.MultiHeadDotProductAttention(32, qkv_features=4096, out_features=4096),
                      jax.ShapeDtypeStruct((1, 1, 4096), jnp.float32))):
        wrapped = jquant.flax.quantize(model, policy)
        variables = jax.eval_shape(wrapped.init, jax.random.key(0), x)
        served = {"params": jax.eval_shape(lambda p: jquant.quantize_params(p, policy), variables["params"]),
                  "lora": variables["lora"]}
        compiled = jax.jit(wrapped.apply).lower(served, x).compile()
        assert compiled.memory_analysis().temp_size_in_bytes < 4096 * 4096 * 4 / 4
        assert not re.search(r"f32\[(4096,4096|4096,32,128|32,128,4096)\]", compiled.as_text())


def test_validation_errors_name_the_parameter():
    for bad, error, match in ((0, ValueError, r"LoRA.rank must be ≥ 1"),
                              (2.0, TypeError, r"LoRA.rank must be an int"),
                              (True, TypeError, r"LoRA.rank must be an int")):
        with pytest.raises(error, match=match):
            LoRA(bad)
    for bad, error in ((0.0, ValueError), (float("nan"), ValueError), (-1, ValueError), ("8", TypeError)):
        with pytest.raises(error, match=r"LoRA.alpha must be"):
            LoRA(4, alpha=bad)
    with pytest.raises(TypeError, match=r"Rule.lora must be a jquant.LoRA or None, got int"):
        Rule(".*", None, lora=4)
    assert LoRA(8).scale == 1.0 and LoRA(4, alpha=16).scale == 4.0 and hash(LoRA(4)) == hash(LoRA(4))
    assert repr(Rule("k", None, lora=LoRA(4, alpha=8.0))) == "Rule('k', None, lora=LoRA(4, alpha=8.0))"

    class Cnn(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3, 3))(x)

    with pytest.raises(ValueError, match=r"params/Conv_0/kernel: LoRA adapters are for Dense and DenseGeneral"):
        jquant.flax.quantize(Cnn(), jquant.int8_weights(lora=R)).init(jax.random.key(0), jnp.ones((1, 8, 8, 16)))
    with pytest.raises(ValueError, match=r"kernel: LoRA adapters are for Linear and LinearGeneral .* not Conv"):
        jquant.flax.quantize(nnx.Conv(16, 4, (3, 3), rngs=nnx.Rngs(0)), jquant.int8_weights(lora=R),
                             rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"pass rngs=nnx.Rngs"):
        jquant.flax.quantize(nnx.Linear(16, 4, rngs=nnx.Rngs(0)), jquant.int8_weights(lora=R))
    with pytest.raises(TypeError, match=r"Linen model draws its adapters in init"):
        jquant.flax.quantize(nn.Dense(4), jquant.int8_weights(lora=R), rngs=nnx.Rngs(0))

    params = {"dense": {"kernel": normal(0, (16, 4))}}
    adapters = {"dense": {"kernel": {"lora_a": normal(1, (16, 2)), "lora_b": normal(2, (2, 4))}}}
    with pytest.raises(ValueError, match=r"dense/kernel: Rule\(.*lora=LoRA\(4, alpha=8.0\)\) gives it adapters but "
                                         r"lora has no 'lora_a' and 'lora_b'"):
        jquant.merge(params, {}, jquant.int8_weights(lora=R))
    with pytest.raises(ValueError, match=r"dense/kernel: adapters in lora but no kernel .* a rule with a LoRA"):
        jquant.merge(params, adapters, jquant.int8_weights())
    with pytest.raises(ValueError, match=r"^dense/kernel: adapters A \(16, 2\) and B \(2, 5\) do not fit"):
        jquant.merge(params, {"dense": {"kernel": {"lora_a": normal(1, (16, 2)), "lora_b": normal(2, (2, 5))}}},
                     jquant.int8_weights(lora=R))
