"""Run by tests/test_distributed.py in its own process: 8 simulated CPU devices (the flag must be
set before jax starts). Sharded trees quantized under jit and the integer dot of sharded operands,
`jquant.dot_general` inside `jax.shard_map`, QArrays through shard_map's in/out specs, rotated
weights, and checkpoints of sharded trees. Prints one JSON line of facts."""

import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jquant  # noqa: E402
from jquant import Policy, QuantSpec, Rule  # noqa: E402

DN = (((1,), (0,)), ((), ()))
ROWS = QuantSpec(8, channel_axes=(0,))  # activations: one scale per row, whole on every device

# The unsharded references, compiled: one program each instead of every eager op (eager = jit bit
# for bit: tests/test_determinism.py).
quantize = jax.jit(jquant.quantize, static_argnums=1)
dequantize = jax.jit(jquant.dequantize)
unsharded_dot = jax.jit(lambda a, b: jquant.dot_general(a, b, DN, lhs_spec=ROWS))


def _equal(a, b):
    return all(np.asarray(u).tobytes() == np.asarray(v).tobytes()
               for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def _last_axis(qa, axis_name):
    """in_specs for a QArray sharded along its last (output-channel) axis: every leaf — storage,
    scale, zero-point — has the channel axis last."""
    return jax.tree_util.tree_map(lambda a: P(*([None] * (a.ndim - 1)), axis_name), qa)


def sharded_tree_facts(mesh):
    """quantize_params under jit on a tree sharded over both mesh axes, and a jitted integer dot of
    sharded operands (no shard_map: XLA partitions the computation)."""
    w = jax.random.normal(jax.random.key(0), (1024, 512))
    sharded = jax.device_put(w, NamedSharding(mesh, P("data", "model")))
    facts = {"specs": []}
    for spec in (QuantSpec(8, channel_axes=(-1,)), QuantSpec(4, symmetric=False, channel_axes=(-1,), group_size=128)):
        policy = Policy([Rule(r".*kernel", spec)])
        qa = jax.jit(jquant.quantize_params, static_argnums=1)({"kernel": sharded}, policy)["kernel"]
        facts["specs"].append({
            "value_devices": len(qa.value.sharding.device_set),
            "scale_devices": len(qa.scale.sharding.device_set),
            "value_shard_shape": list(qa.value.addressable_shards[0].data.shape),
            "equal": _equal(qa, quantize(w, spec)),
        })
    x = jax.random.normal(jax.random.key(1), (64, 1024))
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    weight = QuantSpec(8, channel_axes=(-1,))
    y = unsharded_dot(xs, quantize(sharded, weight))  # the operands' shardings partition it
    facts["dot_devices"] = len(y.sharding.device_set)
    facts["dot_equal"] = _equal(y, unsharded_dot(x, quantize(w, weight)))
    return facts


def shard_map_facts(mesh, x, w):
    facts = {}
    # data parallel: activations split by rows, the quantized weight replicated
    wq = quantize(w, QuantSpec(8, channel_axes=(1,)))
    dp = jax.shard_map(lambda a, b: jquant.dot_general(a, b, DN, lhs_spec=ROWS), mesh=mesh,
                       in_specs=(P("data", None), P()), out_specs=P("data", None))
    facts["data_parallel_equal"] = _equal(jax.jit(dp)(x, wq), unsharded_dot(x, wq))

    # tensor parallel (column): the QArray itself sharded over output channels
    for name, spec in {"int8": QuantSpec(8, channel_axes=(1,)),
                       "int4_asym_g16": QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=16),
                       "int3": QuantSpec(3, channel_axes=(1,)), "sign": QuantSpec(1, method="sign", channel_axes=(1,))
                       }.items():
        wq = quantize(w, spec)
        tp = jax.shard_map(lambda a, b: jquant.dot_general(a, b, DN, lhs_spec=ROWS), mesh=mesh,
                           in_specs=(P("data", None), _last_axis(wq, "model")), out_specs=P("data", "model"))
        y = jax.jit(tp)(x, wq)
        unsharded = unsharded_dot(x, wq)
        facts[f"column_parallel_{name}_equal"] = _equal(y, unsharded)
        # per-group partial products are summed in float32, in an order that may follow the block shape
        facts[f"column_parallel_{name}_error"] = float(np.max(np.abs(np.asarray(y) - np.asarray(unsharded))))
        facts[f"column_parallel_{name}_devices"] = len(y.sharding.device_set)
        # weight-only inside shard_map: the local block dequantized (float dot: equal up to rounding)
        wo = jax.shard_map(lambda a, b: jquant.dot_general(a, b, DN), mesh=mesh,
                           in_specs=(P("data", None), _last_axis(wq, "model")), out_specs=P("data", "model"))
        ref = np.asarray(x, np.float64) @ np.asarray(dequantize(wq), np.float64)
        facts[f"weight_only_{name}_error"] = float(np.max(np.abs(np.asarray(jax.jit(wo)(x, wq)) - ref)))

    # tensor parallel (row): the contraction split over "model", one group per device; the int32
    # partial accumulators are exact and equal the unsharded ones group for group
    k = x.shape[1]
    g = k // mesh.shape["model"]
    lspec = QuantSpec(8, channel_axes=(0,), group_size=g)
    rspec = QuantSpec(4, channel_axes=(1,), group_size=g)
    wq = quantize(w, rspec)

    def row_parallel(a, b):
        acc = jquant.int_dot_general(jquant.quantize(a, lspec), b, DN)
        partial = acc.dequantize()
        return acc.value, jax.lax.psum(partial, "model")

    rp = jax.shard_map(row_parallel, mesh=mesh,
                       in_specs=(P("data", "model"), jax.tree_util.tree_map(lambda a: P("model"), wq)),
                       out_specs=(P("model", "data", None), P("data", None)))
    acc_value, y = jax.jit(rp)(x, wq)
    whole = jax.jit(lambda a, b: jquant.int_dot_general(quantize(a, lspec), b, DN))(x, wq)
    facts["row_parallel_accumulator_equal"] = _equal(acc_value, whole.value)
    facts["row_parallel_error"] = float(np.max(np.abs(np.asarray(y) - np.asarray(dequantize(whole)))))

    # a QArray made inside shard_map and returned through out_specs is the whole quantized tensor
    spec = QuantSpec(4, channel_axes=(1,))
    make = jax.shard_map(lambda b: jquant.quantize(b, spec), mesh=mesh, in_specs=P(None, "model"),
                         out_specs=P(None, "model"))
    qa = jax.jit(make)(w)
    facts["qarray_out_shape"] = list(qa.shape)
    facts["qarray_out_equal"] = _equal(qa, quantize(w, spec))
    return facts


def rotated_facts(mesh):
    """A weight large enough for the weight-only dot's chunked scan (512 × 256, int4 g128), plain
    and rotated: quantized and multiplied under jit from sharded operands, weight-only dots inside
    shard_map with the output channels split, and the contraction split (refused when rotated)."""
    facts = {}
    w = jax.random.normal(jax.random.key(2), (512, 256))
    x = jax.random.normal(jax.random.key(3), (16, 512))
    dot = jax.jit(lambda a, b: jquant.dot_general(a, b, DN))
    for name, rot in (("whole", jquant.Hadamard()), ("none", None)):
        spec = QuantSpec(4, symmetric=False, channel_axes=(1,), group_size=128, rotation=rot)
        wq = quantize(w, spec)
        reference = dot(x, wq)
        sharded = jax.device_put(w, NamedSharding(mesh, P("data", "model")))
        qa = jax.jit(jquant.quantize_params, static_argnums=1)({"kernel": sharded}, Policy([Rule("kernel", spec)]))
        facts[f"rotated_{name}_quantize_equal"] = _equal(qa["kernel"], wq)
        y = dot(jax.device_put(x, NamedSharding(mesh, P("data", None))), qa["kernel"])
        facts[f"rotated_{name}_dot_devices"] = len(y.sharding.device_set)
        facts[f"rotated_{name}_dot_error"] = float(np.max(np.abs(np.asarray(y) - np.asarray(reference))))
        column = jax.shard_map(lambda a, b: jquant.dot_general(a, b, DN), mesh=mesh,
                               in_specs=(P("data", None), _last_axis(wq, "model")), out_specs=P("data", "model"))
        facts[f"rotated_{name}_column_parallel_error"] = float(np.max(np.abs(np.asarray(jax.jit(column)(x, wq))
                                                                            - np.asarray(reference))))
        row = jax.shard_map(lambda a, b: jax.lax.psum(jquant.dot_general(a, b, DN), "model"), mesh=mesh,
                            in_specs=(P("data", "model"), jax.tree_util.tree_map(lambda a: P("model"), wq)),
                            out_specs=P("data", None))
        try:
            facts[f"rotated_{name}_row_parallel_error"] = float(np.max(np.abs(np.asarray(jax.jit(row)(x, wq))
                                                                              - np.asarray(reference))))
        except ValueError as err:
            facts[f"rotated_{name}_row_parallel_error"] = str(err)
    return facts


def checkpoint_facts(mesh, w, directory):
    """jquant.save of a tree sharded over the 8 devices (Orbax writes it shard by shard) and
    jquant.load with and without a target."""
    facts = {}
    sharded = jax.device_put(w, NamedSharding(mesh, P("data", "model")))
    policy = Policy([Rule(r"int8/kernel", QuantSpec(8, channel_axes=(-1,))),
                     Rule(r"int4/kernel", QuantSpec(4, symmetric=False, channel_axes=(-1,), group_size=32))])
    tree = {"int8": {"kernel": sharded}, "int4": {"kernel": sharded},
            "bias": jax.device_put(jnp.arange(32.0), NamedSharding(mesh, P("model"))), "step": 3}
    qtree = jax.jit(jquant.quantize_params, static_argnums=1)(tree, policy)
    path = os.path.join(directory, "sharded")
    jquant.save(path, qtree)

    def shardings(t):
        return [a.sharding for a in jax.tree_util.tree_leaves(t) if isinstance(a, jax.Array)]

    # what Orbax recorded: each array's NamedSharding, so it was written per shard, not gathered
    meta = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    facts["stored_shardings"] = sorted({type(m.sharding).__name__ for m in jax.tree_util.tree_leaves(meta)
                                        if isinstance(m, ocp.metadata.ArrayMetadata)})
    plain = jquant.load(path)
    facts["load_plain_equal"] = _equal(plain, qtree)
    facts["load_plain_devices"] = sorted({len(s.device_set) for s in shardings(plain)})
    restored = jquant.load(path, target=qtree)
    facts["load_target_equal"] = _equal(restored, qtree)
    facts["load_target_same_shardings"] = all(
        a == b for a, b in zip(shardings(restored), shardings(qtree), strict=True))
    facts["load_target_devices"] = sorted({len(s.device_set) for s in shardings(restored)})
    facts["load_target_shards"] = sorted({len(a.addressable_shards) for a in jax.tree_util.tree_leaves(restored)
                                          if isinstance(a, jax.Array)})
    # abstract target: ShapeDtypeStructs with the shardings, no arrays needed
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) if isinstance(a, jax.Array) else a,
        qtree)
    from_abstract = jquant.load(path, target=abstract)
    facts["load_abstract_same_shardings"] = all(
        a == b for a, b in zip(shardings(from_abstract), shardings(qtree), strict=True))
    facts["load_abstract_equal"] = _equal(from_abstract, qtree)
    # a target whose sharding cannot hold the stored array is an error naming the leaf
    bad = dict(qtree, bias=jax.ShapeDtypeStruct((32,), jnp.float32, sharding=NamedSharding(mesh, P(("data", "model")))))
    jquant.save(path, dict(qtree, bias=jnp.arange(30.0)), overwrite=True)
    try:
        jquant.load(path, target=bad)
        facts["misfit_error"] = ""
    except ValueError as err:
        facts["misfit_error"] = str(err)
    return facts


def main():
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    x = jax.random.normal(jax.random.key(1), (16, 128))
    w = jax.random.normal(jax.random.key(0), (128, 32))
    facts = {"devices": len(jax.devices())}
    facts.update(sharded_tree_facts(mesh))
    facts.update(shard_map_facts(mesh, x, w))
    facts.update(rotated_facts(mesh))
    with tempfile.TemporaryDirectory() as directory:
        facts.update(checkpoint_facts(mesh, w, directory))
    print(json.dumps(facts))


if __name__ == "__main__":
    sys.exit(main())
