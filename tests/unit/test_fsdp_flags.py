"""``--use-torch-fsdp2`` in the one validation pass (every conflicting flag named with its fix, all at once) and in
the dry run's memory table (a real ZeRO-3 row that shards weights, gradients and optimizer state)."""
from pathlib import Path

import pytest

from megatron_puffin.config import ConfigError, parse_args

ROOT = Path(__file__).resolve().parents[2]
BASE = [f"@{ROOT / 'examples' / 'tiny' / 'model.args'}", "--task-stream", "image2text:x:1", "--dry-run"]


def test_conflicting_flags_are_reported_together_with_the_fix():
    with pytest.raises(ConfigError) as error:
        parse_args([*BASE, "--use-torch-fsdp2", "--use-distributed-optimizer", "--overlap-grad-reduce",
                    "--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2", "--fp16",
                    "--world-size", "8"])
    message = str(error.value)
    for expected in ("--use-torch-fsdp2 needs --pipeline-model-parallel-size 1 (got 2)",
                     "--use-torch-fsdp2 is verified at --tensor-model-parallel-size 1 only (got 2)",
                     "drop --use-distributed-optimizer", "--overlap-grad-reduce configures megatron-core's DDP",
                     "--use-torch-fsdp2 does not support --fp16"):
        assert expected in message, message


def test_dry_run_row_shards_everything_over_data_parallel_ranks():
    from megatron_puffin.training.layout import describe, fsdp2_bytes, memory_estimate, towers

    args = {dp: parse_args([*BASE, "--use-torch-fsdp2", "--world-size", str(dp)]) for dp in (1, 4)}
    (whole,) = memory_estimate(args[1], towers(args[1]))
    assert fsdp2_bytes(args[1]) == pytest.approx(whole.total)  # DP 1: nothing to shard, nothing gathered
    # DP 4: a quarter of everything plus the gathered root unit (the tiny model's embedding dominates) and layers.
    assert whole.total / 4 < fsdp2_bytes(args[4]) < whole.total
    assert "ZeRO-3 (--use-torch-fsdp2)" in describe(args[4]) and "not available" not in describe(args[4])
