"""jquant.flax: quantize (Linen and NNX) — QAT trains, serving matches QAT — and calibrate, whose
observers keep an EMA of each activation's range as its spec's calibration picks it."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from sklearn.datasets import load_digits

import jquant
from jquant._src.formats import uniform
from jquant._src import paths
from jquant import HQQ, MSE, MinMax, Percentile, Policy, QuantSpec, Rule
from jquant.flax import _observers as observers

from helpers import Mlp, NnxMlp, int8_convs, normal

W8A8 = Policy([Rule(r".*kernel", QuantSpec(8, channel_axes=(1,)), act=QuantSpec(8))])
W2A8 = Policy([Rule(r".*kernel", QuantSpec(2, symmetric=False, channel_axes=(1,)), act=QuantSpec(8))])


class Cnn(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    return x[order[:1400]], data.target[order[:1400]], x[order[1400:]], data.target[order[1400:]]


def _train(apply, params, x, y, epochs=25):
    optimizer = optax.adam(2e-3)

    @jax.jit
    def step(params, opt_state, xb, yb):
        loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, xb), yb).mean()
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    rng = np.random.default_rng(1)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x) - 63, 64):
            params, opt_state = step(params, opt_state, x[order[i:i + 64]], y[order[i:i + 64]])
    return params


def _accuracy(logits, y):
    return float(np.mean(np.argmax(np.asarray(logits), -1) == y))


def test_linen_qat_trains_and_serving_matches(digits):
    x, y, xt, yt = digits
    model = Mlp()
    params = model.init(jax.random.key(0), x[:1])
    float_acc = _accuracy(model.apply(_train(model.apply, params, x, y), xt), yt)
    for policy, allowed_drop in ((W8A8, 0.01), (W2A8, 0.04)):
        qmodel = jquant.flax.quantize(model, policy)
        qinit = qmodel.init(jax.random.key(0), x[:1])
        assert jax.tree_util.tree_structure(qinit) == jax.tree_util.tree_structure(params)
        # quantization really changes the function
        assert float(jnp.max(jnp.abs(jax.jit(qmodel.apply)(params, xt) - jax.jit(model.apply)(params, xt)))) > 1e-3
        trained = _train(qmodel.apply, params, x, y)
        qat_logits = jax.jit(qmodel.apply)(trained, xt)
        assert _accuracy(qat_logits, yt) >= float_acc - allowed_drop
        served = jquant.quantize_params(trained, policy)
        kernels = [leaf for path, leaf in paths.leaves_with_paths(served) if path.endswith("kernel")]
        assert len(kernels) == 2 and all(isinstance(k, jquant.QArray) for k in kernels)
        served_logits = jax.jit(qmodel.apply)(served, xt)
        agree = np.mean(np.argmax(np.asarray(served_logits), -1) == np.argmax(np.asarray(qat_logits), -1))
        assert agree >= 0.99


def test_linen_w8a8_serving_runs_the_integer_dot(digits):
    x = digits[0][:8]
    qmodel = jquant.flax.quantize(Mlp(), W8A8)
    served = jquant.quantize_params(qmodel.init(jax.random.key(0), x), W8A8)
    jaxpr = str(jax.make_jaxpr(qmodel.apply)(served, x))
    assert "preferred_element_type=int32" in jaxpr
    # weight-only serving dequantizes instead: no integer dot
    w4 = Policy([Rule(r".*kernel", QuantSpec(4, channel_axes=(1,)))])
    served_w4 = jquant.quantize_params(jquant.dequantize_params(served), w4)
    jaxpr = str(jax.make_jaxpr(jquant.flax.quantize(Mlp(), w4).apply)(served_w4, x))
    assert "preferred_element_type=int32" not in jaxpr


def test_linen_conv_qat_gradients_and_serving(digits):
    x = digits[0][:16].reshape(16, 8, 8, 1)
    policy = Policy([Rule(r".*kernel", QuantSpec(4, channel_axes=(-1,)), act=QuantSpec(8))])
    qmodel = jquant.flax.quantize(Cnn(), policy)
    params = qmodel.init(jax.random.key(0), x)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(qmodel.apply(p, x) ** 2)))(params)
    assert float(jnp.sum(jnp.abs(grads["params"]["Conv_0"]["kernel"]))) > 0
    qat = jax.jit(qmodel.apply)(params, x)
    served = jax.jit(qmodel.apply)(jquant.quantize_params(params, policy), x)
    np.testing.assert_allclose(np.asarray(served), np.asarray(qat), rtol=1e-4, atol=1e-4)


class DeepCnn(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


W8A8_CONV = Policy([Rule(r".*kernel", QuantSpec(8, channel_axes=(-1,)), act=QuantSpec(8, symmetric=False))])


def test_linen_cnn_serves_w8a8_on_the_integer_conv(digits):
    """The second conv (16 input features, 144 taps) runs int8 × int8 → int32 (the first, one input
    feature, takes the float route: jquant._src.conv, "Routes"); served equals QAT to float rounding."""
    x = digits[0][:32].reshape(32, 8, 8, 1)
    qmodel = jquant.flax.quantize(DeepCnn(), W8A8_CONV)
    params = qmodel.init(jax.random.key(0), x)
    qat = jax.jit(qmodel.apply)(params, x)
    served_params = jquant.quantize_params(params, W8A8_CONV)
    assert int8_convs(jax.make_jaxpr(qmodel.apply)(served_params, x)) == 1
    served = jax.jit(qmodel.apply)(served_params, x)
    np.testing.assert_allclose(np.asarray(served), np.asarray(qat), rtol=1e-4, atol=1e-4)


def test_nnx_cnn_serves_w8a8_on_the_integer_conv(digits):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
            self.conv2 = nnx.Conv(16, 16, (3, 3), strides=2, rngs=rngs)
            self.head = nnx.Linear(256, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
            return self.head(x.reshape(x.shape[0], -1))

    x = digits[0][:32].reshape(32, 8, 8, 1)
    model = Net(nnx.Rngs(0))
    jquant.flax.quantize(model, W8A8_CONV)
    qat = _forward(model, x)
    nnx.update(model, jquant.quantize_params(nnx.state(model, nnx.Param), W8A8_CONV))
    assert isinstance(model.conv2.kernel.get_value(), jquant.QArray)
    assert int8_convs(jax.make_jaxpr(lambda m, x: m(x))(model, x)) == 1
    served = _forward(model, x)
    np.testing.assert_allclose(np.asarray(served), np.asarray(qat), rtol=1e-4, atol=1e-4)


def test_linen_rule_paths_and_none_rules(digits):
    x = digits[0][:4]
    policy = Policy([Rule(r"params/Dense_1/kernel", None),
                     Rule(r"params/Dense_0/kernel", QuantSpec(2, channel_axes=(1,)))])
    qmodel = jquant.flax.quantize(Mlp(), policy)
    params = qmodel.init(jax.random.key(0), x)
    # only Dense_0 is quantized: the result equals applying the fake-quantized Dense_0 kernel by hand
    fq = jquant.fake_quant_params(params, policy)
    np.testing.assert_allclose(np.asarray(qmodel.apply(params, x)), np.asarray(Mlp().apply(fq, x)), rtol=1e-5,
                               atol=1e-6)


def test_linen_einsum_qat_and_serving():
    class WithEinsum(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((4, 3), "bi,io->bo")(x)

    policy = Policy([Rule(r".*kernel", QuantSpec(4, channel_axes=(-1,)), act=QuantSpec(8))])
    x = jax.random.normal(jax.random.key(1), (5, 4))
    qmodel = jquant.flax.quantize(WithEinsum(), policy)
    params = qmodel.init(jax.random.key(0), x)
    layer = params["params"]["Einsum_0"]
    expected = (jquant.fake_quant(x, QuantSpec(8)) @ jquant.fake_quant(layer["kernel"], policy.rules[0].spec)
                + layer["bias"])
    qat = jax.jit(qmodel.apply)(params, x)
    np.testing.assert_allclose(np.asarray(qat), np.asarray(expected), rtol=1e-6, atol=1e-6)
    served = jax.jit(qmodel.apply)(jquant.quantize_params(params, policy), x)
    np.testing.assert_allclose(np.asarray(served), np.asarray(qat), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(qmodel.apply(p, x) ** 2)))(params)
    assert float(jnp.sum(jnp.abs(grads["params"]["Einsum_0"]["kernel"]))) > 0


_forward = nnx.jit(lambda model, x: model(x))


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.dense = nnx.Linear(256, 16, rngs=rngs)
        self.head = nnx.Einsum("bi,oi->bo", (10, 16), rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(x))
        return self.head(nnx.relu(self.dense(x.reshape(x.shape[0], -1))))


def test_nnx_qat_and_serving(digits):
    x = digits[0][:16].reshape(16, 8, 8, 1)
    policy = Policy([Rule(r"head/kernel", QuantSpec(8, channel_axes=(0,)), act=QuantSpec(8)),
                     Rule(r".*kernel", QuantSpec(8, channel_axes=(-1,)), act=QuantSpec(8))])
    model = NnxNet(nnx.Rngs(0))
    float_out = _forward(model, x)
    jquant.flax.quantize(model, policy)
    qat = _forward(model, x)
    assert float(jnp.max(jnp.abs(qat - float_out))) > 1e-4
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(model)
    for name in ("conv", "dense", "head"):
        assert float(jnp.sum(jnp.abs(getattr(grads, name).kernel[...]))) > 0, name
    nnx.update(model, jquant.quantize_params(nnx.state(model, nnx.Param), policy))
    assert isinstance(model.dense.kernel.get_value(), jquant.QArray)
    served = _forward(model, x)
    np.testing.assert_allclose(np.asarray(served), np.asarray(qat), rtol=1e-4, atol=1e-4)


def _ema_reference(batches, momentum):
    lo = hi = None
    for b in batches:
        b_lo, b_hi = float(np.min(b)), float(np.max(b))
        lo = b_lo if lo is None else momentum * lo + (1 - momentum) * b_lo
        hi = b_hi if hi is None else momentum * hi + (1 - momentum) * b_hi
    return lo, hi


CALIBRATED = Policy([Rule(r".*kernel", QuantSpec(8, channel_axes=(1,)), act=QuantSpec(8, symmetric=False))])


def test_linen_calibration_observes_ema_and_serves_static_ranges(digits):
    x = digits[0]
    batches = [x[i * 32:(i + 1) * 32] for i in range(4)]
    qmodel = jquant.flax.quantize(Mlp(), CALIBRATED)
    variables = qmodel.init(jax.random.key(0), x[:1])
    assert set(variables) == {"params"}  # init adds no statistics
    variables = jquant.flax.calibrate(qmodel, [(b,) for b in batches], variables=variables, momentum=0.8)
    stats = variables["quant_stats"]["Dense_0"]  # the first layer sees x itself
    lo, hi = _ema_reference(batches, 0.8)
    np.testing.assert_allclose([float(stats["act_lo"]), float(stats["act_hi"])], [lo, hi], rtol=1e-6)
    assert int(stats["count"]) == 4
    static = jax.jit(qmodel.apply)(variables, x[:64])
    dynamic = jax.jit(qmodel.apply)({"params": variables["params"]}, x[:64])
    assert float(jnp.max(jnp.abs(static - dynamic))) > 1e-4
    # the static ranges really are the calibrated ones: a manual forward pass with them
    act, weight = CALIBRATED.rules[0].act, CALIBRATED.rules[0].spec
    h = x[:64]
    for name, activation in (("Dense_0", jax.nn.relu), ("Dense_1", lambda v: v)):
        layer_stats = variables["quant_stats"][name]
        scale, zero_point = uniform.scale_from_range(layer_stats["act_lo"], layer_stats["act_hi"], act)
        layer = variables["params"][name]
        h = activation(jquant.fake_quant(h, act, scale=scale, zero_point=zero_point)
                       @ jquant.fake_quant(layer["kernel"], weight) + layer["bias"])
    np.testing.assert_allclose(np.asarray(static), np.asarray(h), rtol=1e-5, atol=1e-5)
    served = jax.jit(qmodel.apply)(jquant.quantize_params(variables, CALIBRATED), x[:64])
    np.testing.assert_allclose(np.asarray(served), np.asarray(static), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="per-tensor"):
        bad = Policy([Rule(r".*kernel", QuantSpec(8), act=QuantSpec(8, channel_axes=(0,)))])
        jquant.flax.calibrate(jquant.flax.quantize(Mlp(), bad), [(batches[0],)], variables=variables)


def test_nnx_calibration(digits):
    x = digits[0]
    batches = [(x[i * 32:(i + 1) * 32],) for i in range(3)]

    model = jquant.flax.quantize(NnxMlp(64, 32, 10, nnx.Rngs(0)), CALIBRATED)
    dynamic = _forward(model, x[:64])
    jquant.flax.calibrate(model, batches, momentum=0.5)
    observer = model.hidden.dot_general
    lo, hi = _ema_reference([b[0] for b in batches], 0.5)
    np.testing.assert_allclose([float(observer.act_lo.get_value()), float(observer.act_hi.get_value())], [lo, hi],
                               rtol=1e-6)
    static = _forward(model, x[:64])
    assert float(jnp.max(jnp.abs(static - dynamic))) > 1e-4
    nnx.update(model, jquant.quantize_params(nnx.state(model, nnx.Param), CALIBRATED))
    served = _forward(model, x[:64])
    np.testing.assert_allclose(np.asarray(served), np.asarray(static), rtol=1e-4, atol=1e-4)


def test_static_fp8_activation_ranges(digits):
    # FP8 W8A8 (the preset) calibrated: the observed per-tensor range gives s = max(−lo, hi) / 448,
    # the Linen and NNX models serve it, and serving equals the calibrated QAT forward
    x = digits[0]
    batches = [(x[i * 32:(i + 1) * 32],) for i in range(3)]
    policy = jquant.fp8_w8a8()
    act = policy.rules[-1].act
    lo, hi = _ema_reference([b[0] for b in batches], 0.5)
    qmodel = jquant.flax.quantize(Mlp(), policy)
    variables = jquant.flax.calibrate(qmodel, batches, variables=qmodel.init(jax.random.key(0), x[:1]), momentum=0.5)
    stats = variables["quant_stats"]["Dense_0"]
    np.testing.assert_allclose([float(stats["act_lo"]), float(stats["act_hi"])], [lo, hi], rtol=1e-6)
    scale, zero_point = observers.static_scale([stats[k] for k, _ in observers.initial_stats()], act)
    assert zero_point is None and float(scale) == np.float32(max(-lo, hi)) / np.float32(448)
    static = jax.jit(qmodel.apply)(variables, x[:64])
    dynamic = jax.jit(qmodel.apply)({"params": variables["params"]}, x[:64])
    assert float(jnp.max(jnp.abs(static - dynamic))) > 1e-5
    served = jax.jit(qmodel.apply)(jquant.quantize_params(variables, policy), x[:64])
    np.testing.assert_allclose(np.asarray(served), np.asarray(static), rtol=1e-4, atol=1e-4)

    model = jquant.flax.quantize(NnxMlp(64, 32, 10, nnx.Rngs(0)), policy)
    jquant.flax.calibrate(model, batches, momentum=0.5)
    observer = model.hidden.dot_general
    np.testing.assert_allclose([float(observer.act_lo.get_value()), float(observer.act_hi.get_value())], [lo, hi],
                               rtol=1e-6)
    static = _forward(model, x[:64])
    nnx.update(model, jquant.quantize_params(nnx.state(model, nnx.Param), policy))
    np.testing.assert_allclose(np.asarray(_forward(model, x[:64])), np.asarray(static), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="per-tensor uniform or FP8"):
        mx = Policy([Rule(r".*kernel", None, act=QuantSpec(4, method="mxfp4", group_size=32))])
        jquant.flax.calibrate(jquant.flax.quantize(Mlp(), mx), batches[:1], variables=variables)


@pytest.mark.parametrize("calibration", [MinMax(), Percentile(99.0), MSE(num_ratios=20), HQQ(iters=5)], ids=repr)
def test_activation_observers_follow_the_spec_calibration(calibration):
    # HQQ at 4 bits, where its fitted range is ~5% off the min/max one (at 8 bits, 0.3%)
    act = QuantSpec(4 if isinstance(calibration, HQQ) else 8, symmetric=False, calibration=calibration)
    batches = [np.asarray(normal(20 + i, (64, 32))) for i in range(3)]
    stats = tuple(make() for _, make in observers.initial_stats())
    for x in batches:
        stats = observers.observe(stats, jnp.asarray(x), act, 0.5, "test")
    expected = None
    for x in batches:
        if isinstance(calibration, (MSE, HQQ)):
            qa = jquant.quantize(x, act)  # the searched / fitted range, recovered from scale and zero-point
            scale, zero = float(qa.scale.reshape(())), float(qa.zero_point.reshape(()))
            batch = np.array([(act.qmin - zero) * scale, (act.qmax - zero) * scale])
        else:
            batch = np.percentile(x.astype(np.float64), [100 - getattr(calibration, "percentile", 100),
                                                         getattr(calibration, "percentile", 100)])
        expected = batch if expected is None else 0.5 * expected + 0.5 * batch
    tolerance = 0.03 if isinstance(calibration, MSE) else 1e-5  # MSE: lo/hi rebuilt from a rounded zero-point
    np.testing.assert_allclose([float(stats[0]), float(stats[1])], expected, rtol=tolerance, atol=tolerance)
    assert int(stats[2]) == 3
    poisoned = batches[1].copy()
    poisoned[5, 7] = np.nan  # a (64, 32) batch: where XLA:CPU's vectorised min/max used to drop it
    stats = observers.observe(stats, jnp.asarray(poisoned), act, 0.5, "test")
    assert np.isnan(float(stats[0])) and np.isnan(float(stats[1]))


def test_nnx_spec_that_does_not_fit_a_kernel_names_its_path():
    class Block(nnx.Module):
        def __init__(self):
            self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=256, decode=False, rngs=nnx.Rngs(0))

    # the output projection (heads, head_dim, out) = (4, 64, 256): group 128 along head_dim does not fit
    policy = Policy(Rule(r".*out/kernel", QuantSpec(4, channel_axes=(-1,), group_size=128)))
    with pytest.raises(ValueError, match="attn/out/kernel: rule 0 .* does not fit shape \\(4, 64, 256\\)"):
        jquant.flax.quantize(Block(), policy)


ATTENTION_PRESETS = {"int8": jquant.int8_weights(), "int4": jquant.int4_weights(), "w8a8": jquant.w8a8()}


@pytest.mark.parametrize("name", ATTENTION_PRESETS)
def test_presets_give_flax_attention_per_head_scales(name):
    policy = ATTENTION_PRESETS[name]
    x = normal(3, (2, 16, 256))
    linen = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=256)
    params = linen.init(jax.random.key(0), x)
    served = jquant.quantize_params(params, policy)
    # query/key/value (256, 4, 64): a scale per head and head_dim entry (int4: and per group of 128 inputs);
    # out (4, 64, 256): a scale per head and output channel
    qkv = (2, 1, 4, 64) if name == "int4" else (1, 4, 64)
    for layer in ("query", "key", "value"):
        assert served["params"][layer]["kernel"].scale.shape == qkv
    assert served["params"]["out"]["kernel"].scale.shape == (4, 1, 1, 256)
    wrapped = jquant.flax.quantize(linen, policy)
    apply = jax.jit(wrapped.apply)
    np.testing.assert_allclose(np.asarray(apply(served, x)), np.asarray(apply(params, x)), rtol=1e-5, atol=1e-5)
    if name == "w8a8":  # the out projection's per-head scales are contraction groups: all 4 run the integer dot
        assert str(jax.make_jaxpr(wrapped.apply)(served, x)).count("preferred_element_type=int32") == 4

    model = jquant.flax.quantize(nnx.MultiHeadAttention(num_heads=4, in_features=256, decode=False,
                                                        rngs=nnx.Rngs(0)), policy)
    call = nnx.jit(lambda m, x: m(x))
    qat = call(model, x)
    nnx.update(model, jquant.quantize_params(nnx.state(model, nnx.Param), policy))
    assert model.out.kernel.get_value().scale.shape == (4, 1, 1, 256)
    np.testing.assert_allclose(np.asarray(call(model, x)), np.asarray(qat), rtol=1e-5, atol=1e-5)


def test_preset_attention_rules_skip_a_2d_kernel_named_out():
    params = {"out": {"kernel": normal(4, (64, 32))}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rank-guarded attention rules are optional: no unused-rule warning
        served = jquant.quantize_params(params, jquant.int4_weights(group_size=32))
    assert served["out"]["kernel"].scale.shape == (2, 1, 32)  # the general rule: per channel, groups of 32


class _ScannedBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=128)(h, h)
        return x + nn.Dense(128)(nn.gelu(nn.Dense(256)(nn.LayerNorm()(x)))), None


class _LinenStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.scan(_ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(x, None)[0]


class _NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=128, decode=False, rngs=rngs)
        self.up = nnx.Linear(128, 256, rngs=rngs)
        self.down = nnx.Linear(256, 128, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        return x + self.down(nnx.gelu(self.up(x)))


class _NnxStack(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _NnxBlock(rngs)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def step(block, x):
            return block(x)

        return step(self.blocks, x)


STACKED_PRESETS = {"int4": jquant.int4_weights(group_size=64, stacked=1), "w8a8": jquant.w8a8(stacked=1)}


@pytest.mark.parametrize("name", STACKED_PRESETS)
@pytest.mark.parametrize("shape", [(2, 8, 128), (1, 1, 128)], ids=["batch", "decode"])
def test_scanned_stacks_serve_per_layer_scales_equal_to_qat(name, shape):
    policy = STACKED_PRESETS[name]
    x = normal(5, shape)

    def check(served_tree, served, qat):
        qarrays = [leaf for leaf in jax.tree_util.tree_leaves(served_tree, is_leaf=lambda l: isinstance(l, jquant.QArray))
                   if isinstance(leaf, jquant.QArray)]
        assert len(qarrays) == 6 and all(q.scale.shape[0] == 3 for q in qarrays)  # q, k, v, out, up, down
        # float32 compute: served = QAT to float rounding (bf16 QAT fake-quantizes the bf16-cast kernel:
        # test_top_level_layers_with_bf16_compute_quantize_and_serve_bf16)
        np.testing.assert_allclose(np.asarray(served), np.asarray(qat), rtol=1e-5, atol=1e-5)

    linen = jquant.flax.quantize(_LinenStack(), policy)
    params = linen.init(jax.random.key(0), x)
    served = jquant.quantize_params(params, policy)
    check(served, jax.jit(linen.apply)(served, x), jax.jit(linen.apply)(params, x))

    model = jquant.flax.quantize(_NnxStack(nnx.Rngs(0)), policy)
    call = nnx.jit(lambda m, x: m(x))
    qat = call(model, x)
    served = jquant.quantize_params(nnx.state(model, nnx.Param), policy)
    nnx.update(model, served)
    check(served, call(model, x), qat)


def test_a_stack_under_an_unstacked_rule_is_an_error_naming_the_kernel():
    x = normal(5, (2, 8, 128))
    with pytest.raises(ValueError, match=r"params/Scan_ScannedBlock_0/Dense_0/kernel: .*\(1 leading stack axes.*stacked=1"):
        jquant.flax.quantize(_LinenStack(), jquant.int8_weights()).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"blocks/attn/key/kernel: .*stacked=1"):
        jquant.flax.quantize(_NnxStack(nnx.Rngs(0)), jquant.int8_weights())
    # a tree quantized with scales shared across the stack cannot be served as if per layer
    plain = _LinenStack()
    params = plain.init(jax.random.key(0), x)
    shared = jquant.quantize_params(params, Policy(Rule(r".*Dense_0/kernel", QuantSpec(8, channel_axes=(-1,)))))
    policy = Policy(Rule(r".*Dense_0/kernel", QuantSpec(8, channel_axes=(-1,)), stacked=1))
    with pytest.raises(ValueError, match=r"params/Scan_ScannedBlock_0/Dense_0/kernel: a QArray of shape \(3, 256, 128\).*stacked=1"):
        jquant.flax.quantize(plain, policy).apply(shared, x)


@pytest.mark.parametrize("policy", [jquant.int8_weights(), jquant.int4_weights(), jquant.int4_weights(group_size=None)],
                         ids=["int8", "int4", "int4-per-channel"])
@pytest.mark.parametrize("model,x", [
    (nn.Sequential([nn.Dense(4096), nn.Dense(4096)]), jax.ShapeDtypeStruct((1, 4096), jnp.float32)),
    # Flax's attention: 3-D DenseGeneral kernels (4096, 32, 128) and (32, 128, 4096)
    (nn.MultiHeadDotProductAttention(32, qkv_features=4096, out_features=4096), jax.ShapeDtypeStruct((1, 1, 4096), jnp.float32)),
], ids=["dense", "attention"])
def test_a_served_model_holds_no_float_copy_of_its_weights(policy, model, x):
    # served weight-only under jit and in a jitted generation loop: a float copy of one kernel
    # would be 64 MiB (shapes only: nothing this size is computed)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    served = jax.eval_shape(lambda p: jquant.quantize_params(p, policy), params)
    wrapped = jquant.flax.quantize(model, policy)

    def generate(p, h):
        return jax.lax.fori_loop(0, 4, lambda i, h: jnp.tanh(wrapped.apply(p, h)), h)

    for fn in (wrapped.apply, generate):
        compiled = jax.jit(fn).lower(served, x).compile()
        assert compiled.memory_analysis().temp_size_in_bytes < 4096 * 4096 * 4 / 4
        assert not re.search(r"f32\[(4096,4096|4096,32,128|32,128,4096)\]", compiled.as_text())


def test_a_served_nnx_attention_holds_no_float_copy_of_its_weights():
    # nnx.MultiHeadAttention's LinearGeneral kernels (4096, 32, 128) and (32, 128, 4096), int4 g128
    model = nnx.MultiHeadAttention(32, 4096, qkv_features=4096, decode=False, rngs=nnx.Rngs(0))
    jquant.flax.quantize(model, jquant.int4_weights())
    nnx.update(model, jquant.quantize_params(nnx.state(model, nnx.Param), jquant.int4_weights()))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, 1, 4096), jnp.float32)
    compiled = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, x).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 4096 * 4096 * 4 / 4
    assert not re.search(r"f32\[(4096,32,128|32,128,4096)\]", compiled.as_text())


def test_an_unwrapped_model_given_served_params_says_so():
    dense = nn.Dense(8)
    served = jquant.quantize_params(dense.init(jax.random.key(0), jnp.ones((1, 16))), jquant.int8_weights())
    linear = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    nnx.update(linear, jquant.quantize_params(nnx.state(linear, nnx.Param), jquant.int8_weights()))
    for call in (lambda: dense.apply(served, jnp.ones((1, 16))), lambda: linear(jnp.ones((1, 16)))):
        with pytest.raises(TypeError, match="QArray was given where a float array is needed.*jquant.flax.quantize"):
            call()


def test_w8a8_qat_loss_with_a_nan_weight_is_nan():
    model = nn.Dense(256)
    params = model.init(jax.random.key(0), jnp.ones((1, 512)))
    params = jax.tree_util.tree_map(lambda v: v.at[(3,) * v.ndim].set(jnp.nan) if v.ndim == 2 else v, params)
    qmodel = jquant.flax.quantize(model, jquant.w8a8())
    loss = jax.jit(lambda p, x: jnp.mean(qmodel.apply(p, x) ** 2))(params, normal(1, (8, 512)))
    assert np.isnan(float(loss))


@pytest.mark.parametrize("policy", [jquant.int8_weights(), jquant.int4_weights(group_size=32), jquant.w8a8()],
                         ids=["int8", "int4", "w8a8"])
def test_top_level_layers_with_bf16_compute_quantize_and_serve_bf16(policy):
    """A top-level layer is matched by the rule for its `kernel`; served outputs keep the layer's
    bf16 compute dtype. Weight-only serving equals the float layer on the dequantized kernel; W8A8
    serving equals QAT."""
    x = normal(0, (4, 64))
    weight_only = policy.rules[0].act is None

    def check(served, qat, float_on_dequantized):
        assert served.dtype == jnp.bfloat16 and qat.dtype == jnp.bfloat16
        expected = float_on_dequantized if weight_only else qat
        np.testing.assert_allclose(np.asarray(served, np.float32), np.asarray(expected, np.float32), rtol=2e-2,
                                   atol=2e-2)

    dense = nn.Dense(32, dtype=jnp.bfloat16)
    linen = jquant.flax.quantize(dense, policy)
    variables = linen.init(jax.random.key(0), x)
    qat = linen.apply(variables, x)
    assert float(jnp.max(jnp.abs(qat - dense.apply(variables, x)))) > 0  # the layer is quantized
    qparams = jquant.quantize_params(variables, policy)
    dequantized = {"params": {**qparams["params"], "kernel": qparams["params"]["kernel"].dequantize()}}
    check(jax.jit(linen.apply)(qparams, x), qat, dense.apply(dequantized, x))

    model = nnx.Linear(64, 32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    float_out = model(x)
    jquant.flax.quantize(model, policy)
    qat = model(x)
    assert float(jnp.max(jnp.abs(qat - float_out))) > 0
    nnx.update(model, jquant.quantize_params(nnx.state(model, nnx.Param), policy))
    kernel = model.kernel.get_value()
    assert isinstance(kernel, jquant.QArray)
    float_on_dequantized = (x.astype(jnp.bfloat16) @ kernel.dequantize().astype(jnp.bfloat16)
                            + model.bias.get_value().astype(jnp.bfloat16))
    check(model(x), qat, float_on_dequantized)


BF16_QAT_SPECS = {
    "int4 g128": QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=128),
    "int4 g128 HQQ + Hadamard + equalization": QuantSpec(
        4, symmetric=False, channel_axes=(1,), group_size=128, calibration=HQQ(), rotation=jquant.Hadamard(),
        equalization=jquant.Equalize()),
    "int8": QuantSpec(8, channel_axes=(1,))}


@pytest.mark.parametrize("framework", ["linen", "nnx"])
@pytest.mark.parametrize("name", list(BF16_QAT_SPECS))
@pytest.mark.parametrize("act", [None, QuantSpec(8)], ids=["weight-only", "A8"])
def test_bf16_layers_quantize_the_float32_kernel_in_qat_as_serving_does(framework, name, act):
    """A bf16 layer with float32 params: QAT quantizes the float32 kernel (the layer casts the
    fake-quantized one to bf16), as `quantize_params` does, not the kernel Flax would cast to bf16
    first — whose codes differ (by one step, in ~1% of int4 g128 codes and ~5% of int8 ones on
    this weight) and so would the outputs. At 2^25 multiply-adds W8A8/W4A8 QAT runs the integer
    path: served and QAT are one computation on the same codes."""
    spec = BF16_QAT_SPECS[name]
    policy = Policy([Rule(r".*kernel", spec, act=act)])
    x = normal(3, (64, 1024)).astype(jnp.bfloat16)
    w = normal(4, (1024, 512)) * 0.05
    cast_codes = jquant.quantize(w.astype(jnp.bfloat16).astype(jnp.float32), spec)
    served_codes = jquant.quantize(w, spec)
    assert float(jnp.mean(cast_codes.value != served_codes.value)) > 0.005  # what the cast would change
    if framework == "linen":
        model = nn.Dense(512, dtype=jnp.bfloat16)
        params = {"params": {"kernel": w, "bias": jnp.zeros(512)}}
        qmodel = jquant.flax.quantize(model, policy)
        qat, served = jax.jit(qmodel.apply)(params, x), jax.jit(qmodel.apply)(jquant.quantize_params(params, policy), x)
        float_on_dequantized = model.apply(jquant.dequantize_params(jquant.quantize_params(params, policy)), x)
    else:
        model = nnx.Linear(1024, 512, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        model.kernel.set_value(w)
        float_on_dequantized = None
        jquant.flax.quantize(model, policy)
        qat = nnx.jit(lambda m, v: m(v))(model, x)
        nnx.update(model, jquant.quantize_params(nnx.state(model, nnx.Param), policy))
        served = nnx.jit(lambda m, v: m(v))(model, x)
    assert qat.dtype == served.dtype == jnp.bfloat16
    if act is not None:
        np.testing.assert_array_equal(np.asarray(served, np.float32), np.asarray(qat, np.float32))
    else:  # the same x̂·ŵ in bf16, summed in another order: within a few bf16 roundings
        err = np.asarray(served, np.float32) - np.asarray(qat, np.float32)
        assert np.sqrt(np.mean(err ** 2)) < 2 ** -8 * np.sqrt(np.mean(np.asarray(qat, np.float32) ** 2))
    if float_on_dequantized is not None and act is None and spec.rotation is None:  # (a rotation: x·R online)
        np.testing.assert_array_equal(np.asarray(qat, np.float32), np.asarray(float_on_dequantized, np.float32))


def test_a_policy_that_misses_the_model_is_reported():
    class WithEmbed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(x + nn.Embed(3, 8)(jnp.zeros(x.shape[:1], jnp.int32)))

    x = jnp.ones((2, 8))
    typo = Policy([Rule(r".*kernal", QuantSpec(8))])
    with pytest.warns(UserWarning, match=r"Linen init.*matched no float leaf: Rule\('\.\*kernal'"):
        jquant.flax.quantize(WithEmbed(), typo).init(jax.random.key(0), x)
    embeddings = jquant.int8_weights(embeddings=True)
    with pytest.warns(UserWarning, match=r"params/Embed_0/embedding \(rule 3\)"):  # not a layer's kernel
        jquant.flax.quantize(WithEmbed(), embeddings).init(jax.random.key(0), x)
    with pytest.warns(UserWarning, match=r"jquant.flax.quantize: 1 policy rule\(s\) matched no float leaf"):
        jquant.flax.quantize(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), typo)
