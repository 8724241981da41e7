"""8 simulated devices (tests/distributed_program.py, one process for all): sharded trees stay
sharded when quantized under jit and in the integer dot, `jquant.dot_general` inside
`jax.shard_map` equals the unsharded result, QArrays pass through shard_map's in/out specs, and
checkpoints of sharded trees (Orbax, written per shard) load back with the same NamedShardings,
shard by shard; rotated weights shard under jit and by output channels in shard_map, and a block
that splits the rotated axis is refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def facts():
    program = Path(__file__).with_name("distributed_program.py")
    result = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_sharded_quantization_and_dot(facts):
    assert facts["devices"] == 8
    for spec in facts["specs"]:
        # values and scales spread over all 8 devices (no gather to one), bit-identical to unsharded
        assert spec["value_devices"] == 8 and spec["scale_devices"] == 8
        assert spec["value_shard_shape"][0] == 512  # (1024 rows / 2) per shard: still sharded
        assert spec["equal"]
    assert facts["dot_devices"] == 8 and facts["dot_equal"]


def test_dot_general_inside_shard_map_equals_unsharded(facts):
    assert facts["data_parallel_equal"]  # replicated QArray weight, batch split: bit-identical
    for name in ("int8", "int3", "sign"):  # the QArray split over output channels: bit-identical
        assert facts[f"column_parallel_{name}_equal"], name
        assert facts[f"column_parallel_{name}_devices"] == 8, name
    # groups along the contraction: exact int32 per group, float32 sum of the groups' products
    assert facts["column_parallel_int4_asym_g16_error"] < 1e-5
    for name in ("int8", "int4_asym_g16", "int3", "sign"):  # weight-only: float dots of local blocks
        assert facts[f"weight_only_{name}_error"] < 1e-4, name
    # contraction split over devices: the int32 partial accumulators equal the unsharded ones
    assert facts["row_parallel_accumulator_equal"]
    assert facts["row_parallel_error"] < 1e-4


def test_qarray_through_shard_map_out_specs(facts):
    assert facts["qarray_out_shape"] == [128, 32]
    assert facts["qarray_out_equal"]


def test_sharded_checkpoint_round_trip(facts):
    assert facts["stored_shardings"] == ["NamedShardingMetadata"]  # written shard by shard
    assert facts["load_plain_equal"] and facts["load_plain_devices"] == [1]  # no target: default device
    assert facts["load_target_equal"] and facts["load_target_same_shardings"]
    assert facts["load_target_devices"] == [8] and facts["load_target_shards"] == [8]
    assert facts["load_abstract_equal"] and facts["load_abstract_same_shardings"]
    assert "'bias' of shape (30,)" in facts["misfit_error"] and "sharding" in facts["misfit_error"]


def test_rotated_and_chunked_weight_only_dots(facts):
    # 512 × 256 int4 g128: the weight-only dot's chunked scan (whose carry must vary like its
    # operands inside shard_map), with a whole-axis rotation and without
    for name in ("whole", "none"):
        assert facts[f"rotated_{name}_quantize_equal"], name  # jit of a sharded tree: bit-identical
        assert facts[f"rotated_{name}_dot_devices"] == 8, name
        assert facts[f"rotated_{name}_dot_error"] < 1e-4, name
        assert facts[f"rotated_{name}_column_parallel_error"] < 1e-4, name  # output channels split
    assert facts["rotated_none_row_parallel_error"] < 1e-3  # psum of the K blocks' float partial products
    message = facts["rotated_whole_row_parallel_error"]  # a block of the rotated axis: refused, not rotated alone
    assert isinstance(message, str) and "rotation spans the whole axis" in message and "axis 0" in message
