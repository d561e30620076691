"""training.memory_check: a model that cannot fit this process's memory is refused before the process group, with
the numbers and the remedies; the host's, the container's and the node's share of memory are read as documented."""
import pytest
import torch

from megatron_puffin.config import ConfigError, parse_args
from megatron_puffin import memory
from megatron_puffin.training import memory_check
from megatron_puffin.training.layout import memory_estimate, towers

GIB = 1024 ** 3


def _args(*flags):
    return parse_args(["--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "96",
                       "--num-layers", "2", "--vocab-size", "512", *flags], validate=False)


def test_the_need_is_the_dry_runs_largest_stage_and_a_model_above_the_memory_is_refused_with_its_numbers():
    args = _args()
    need = memory_check.needed_bytes(args)
    assert need == max(stage.total for stage in memory_estimate(args, towers(args))) > 0
    assert memory_check.memory_problems(args, available=(need, "enough")) == []
    problems = memory_check.memory_problems(args, available=(need - 1, "the host's 0.1 GiB available"))
    assert len(problems) == 1
    assert problems[0].startswith(f"the model needs {need / GIB:,.1f} GiB per process for its weights, gradients and "
                                  "optimizer state alone (pretrain_puffin.py --dry-run prints the table), more than "
                                  "the host's 0.1 GiB available; split it over more processes")
    # sharded optimizer state needs less per process: the check follows the flags as the dry run does
    sharded = _args("--use-distributed-optimizer", "--world-size", "4")
    assert memory_check.needed_bytes(sharded) < need


def test_check_memory_raises_the_config_error_the_cli_prints(monkeypatch):
    monkeypatch.setattr(memory_check, "available_bytes", lambda: (1.0, "the host's 0.0 GiB available"))
    with pytest.raises(ConfigError) as info:
        memory_check.check_memory(_args())
    assert "more than the host's 0.0 GiB available" in info.value.problems[0]


def test_host_memory_is_available_memory_plus_free_swap_or_the_containers_limit(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\nSwapFree:        1000000 kB\n")
    assert memory._meminfo(meminfo)["MemAvailable"] == 20000000 * 1024
    assert memory._meminfo(tmp_path / "missing") == {}
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert memory.container_limit_bytes(cgroup) is None
    (cgroup / "memory.max").write_text("max\n")  # cgroup v2 without a limit
    assert memory.container_limit_bytes(cgroup) is None
    (cgroup / "memory.max").write_text(f"{8 * GIB}\n")
    (cgroup / "memory.current").write_text(f"{3 * GIB}\n")
    assert memory.container_limit_bytes(cgroup) == 5 * GIB
    (cgroup / "memory.max").unlink()
    (cgroup / "memory").mkdir()
    (cgroup / "memory" / "memory.limit_in_bytes").write_text(str(2 ** 63 - 4096))  # cgroup v1: no limit
    assert memory.container_limit_bytes(cgroup) is None

    monkeypatch.setattr(memory.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(memory, "_meminfo", lambda: {"MemAvailable": 20 * GIB, "SwapFree": 1 * GIB})
    monkeypatch.setattr(memory, "container_limit_bytes", lambda: None)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert memory.available_bytes() == (21 * GIB, "the host's 21.0 GiB available (memory and swap)")
    monkeypatch.setattr(memory, "container_limit_bytes", lambda: 6 * GIB)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # the ranks of one node share it
    assert memory.available_bytes() == (3 * GIB, "this process's 3.0 GiB: the container limit's 6.0 GiB available "
                                                 "(memory and swap) over the 2 processes this node runs")


def test_the_processes_of_a_node_come_from_torchrun_or_slurm(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    assert memory.local_processes() == 1
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    assert memory.local_processes() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert memory.local_processes() == 8


def test_allocation_failures_are_told_from_other_errors_and_named_with_the_remedies():
    with pytest.raises(RuntimeError) as info:
        torch.empty(1 << 60, dtype=torch.uint8)  # the CPU allocator's own failure
    assert memory_check.is_out_of_memory(info.value) and memory_check.is_out_of_memory(MemoryError())
    assert not memory_check.is_out_of_memory(RuntimeError("shape mismatch"))
    message = memory_check.out_of_memory_message(info.value, "iteration 7 (micro-batches image2text x64)")
    assert message.startswith("iteration 7 (micro-batches image2text x64) ran out of memory (RuntimeError: ")
    assert "Lower the streams' micro-batch sizes" in message and "--recompute" in message
    memory_check.release_memory()  # runs anywhere (glibc trims its heap; elsewhere nothing)
