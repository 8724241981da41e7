"""Sharded trees stay sharded: quantize_params under jit and the integer dot on 8 simulated devices."""

import json
import subprocess
import sys
from pathlib import Path


def test_sharded_quantization_and_dot():
    program = Path(__file__).with_name("sharded_program.py")
    result = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["devices"] == 8
    for spec in facts["specs"]:
        # values and scales spread over all 8 devices (no gather to one), bit-identical to unsharded
        assert spec["value_devices"] == 8 and spec["scale_devices"] == 8
        assert spec["value_shard_shape"][0] == 512  # (1024 rows / 2) per shard: still sharded
        assert spec["equal"]
    assert facts["dot_devices"] == 8 and facts["dot_equal"]
