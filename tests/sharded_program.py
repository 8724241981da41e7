"""Run by tests/test_sharding.py in its own process: 8 simulated CPU devices (the flag must be set
before jax starts). Prints one JSON line of facts for the test to check."""

import json
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import jquant  # noqa: E402
from jquant import Policy, QuantSpec, Rule  # noqa: E402

DN = (((1,), (0,)), ((), ()))


def main():
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    w = jax.random.normal(jax.random.key(0), (1024, 512))
    sharded = jax.device_put(w, NamedSharding(mesh, PartitionSpec("data", "model")))
    facts = {"devices": len(jax.devices()), "specs": []}
    for spec in (QuantSpec(8, channel_axes=(-1,)), QuantSpec(4, symmetric=False, channel_axes=(-1,), group_size=128)):
        policy = Policy([Rule(r".*kernel", spec)])
        qa = jax.jit(jquant.quantize_params, static_argnums=1)({"kernel": sharded}, policy)["kernel"]
        ref = jquant.quantize(w, spec)
        facts["specs"].append({
            "value_devices": len(qa.value.sharding.device_set),
            "scale_devices": len(qa.scale.sharding.device_set),
            "value_shard_shape": list(qa.value.addressable_shards[0].data.shape),
            "equal": bool(np.array_equal(np.asarray(qa.value), np.asarray(ref.value))
                          and np.array_equal(np.asarray(qa.scale), np.asarray(ref.scale))
                          and (ref.zero_point is None
                               or np.array_equal(np.asarray(qa.zero_point), np.asarray(ref.zero_point)))),
        })
    x = jax.random.normal(jax.random.key(1), (64, 1024))
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", None)))
    act = QuantSpec(8, channel_axes=(0,))
    wq = jquant.quantize(sharded, QuantSpec(8, channel_axes=(-1,)))
    y = jax.jit(lambda a, b: jquant.dot_general(a, b, DN, lhs_spec=act))(xs, wq)
    y_ref = jquant.dot_general(x, jquant.quantize(w, QuantSpec(8, channel_axes=(-1,))), DN, lhs_spec=act)
    facts["dot_devices"] = len(y.sharding.device_set)
    facts["dot_equal"] = bool(np.array_equal(np.asarray(y), np.asarray(y_ref)))
    print(json.dumps(facts))


if __name__ == "__main__":
    main()
