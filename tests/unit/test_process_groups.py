"""Process groups are passed to the towers, never looked up: model code reads no global parallel state and starts
no process group, and ``process_groups()`` refuses to run before the parallel state exists. (That a tower really
runs over the groups it is given, not megatron's global ones, is checked with two processes in
``tests/distributed/test_dit_tensor_parallel.py``.)"""
import re
from pathlib import Path

import pytest

import megatron_puffin.distributed as mpd

MODELS = Path(__file__).resolve().parents[2] / "megatron_puffin" / "models"
GLOBAL_LOOKUPS = re.compile(
    r"\bparallel_state\b|\bmpu\b|get_tensor_model_parallel_(?:rank|world_size|group)\(|"
    r"get_pipeline_model_parallel_(?:rank|world_size|group)\(|get_data_parallel_(?:rank|world_size|group)\(|"
    r"init_process_group|megatron_puffin\.distributed import initialize|use_mpu_process_groups"
)


def test_model_code_reads_no_global_parallel_state_and_starts_no_process_group():
    found = [
        f"{path.relative_to(MODELS)}:{number}: {line.strip()}"
        for path in sorted(MODELS.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if GLOBAL_LOOKUPS.search(line)
    ]
    assert not found, "models/ must take its process groups at construction:\n" + "\n".join(found)


def test_process_groups_before_initialize_is_a_clear_error():
    mpd.destroy()
    with pytest.raises(RuntimeError, match=r"call megatron_puffin\.distributed\.initialize\("):
        mpd.process_groups()


def test_process_groups_hold_what_the_towers_read():
    mpd.initialize(seed=0)
    try:
        groups = mpd.process_groups()
        for name in ("tp", "pp", "cp", "embd", "dp"):
            assert getattr(groups, name).size() == 1, name
    finally:
        mpd.destroy()
