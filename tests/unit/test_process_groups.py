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


def test_a_single_process_group_leaves_nothing_behind_when_its_process_is_killed(tmp_path):
    """Without torchrun the group's store lives in the process's memory: a tool or run killed with SIGKILL (the
    out-of-memory killer, a test's kill) used to leave its file store in the temporary folder, one per kill. The
    group still does what megatron-core asks of it (new subgroups, a collective)."""
    import os
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    script = (
        "import sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from megatron_puffin.platform import setup\n"
        "import megatron_puffin.distributed as mpd\n"
        "setup(); context = mpd.initialize()\n"
        "x = torch.ones(2); dist.all_reduce(x, group=dist.new_group([0]))\n"
        "print(context.world_size, x.tolist(), flush=True)\n"
        "sys.stdin.read()\n"  # killed here
    )
    env = dict(os.environ, TMPDIR=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "1 [1.0, 1.0]", proc.stderr.read() if proc.poll() else ""
        assert list(tmp_path.iterdir()) == []
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert list(tmp_path.iterdir()) == []
