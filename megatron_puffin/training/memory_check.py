"""Does the model fit this machine? Checked by every rank before the process group starts.

A model too large for its device used to fail inside megatron-core's layer constructors, after the process group
had started, with the allocator's traceback (``DefaultCPUAllocator: can't allocate memory: you tried to allocate
40960000000 bytes`` for ``--hidden-size 10000000`` on the tiny recipe; a CUDA out-of-memory error on a GPU, or the
kernel's OOM killer on a host with overcommit). :func:`memory_problems` compares what the ``--dry-run`` table
counts for one process, its stage's weights, gradients and optimizer state (``training.layout``; under
``--use-torch-fsdp2`` the sharded total plus what is gathered at once), with what this process can have:

* on a GPU, the whole memory of its device (``torch.cuda.mem_get_info``; the total, not the free memory, so that
  another process's use never refuses a run that would fit an idle GPU);
* on CPU, the host's available memory plus free swap (``/proc/meminfo``), or the container's limit when it has
  one (cgroup v2 ``memory.max`` less ``memory.current``, or v1's ``memory.limit_in_bytes``), shared by the ranks
  this node runs (``LOCAL_WORLD_SIZE``, or Slurm's ``SLURM_NTASKS_PER_NODE``).

Activations are not counted: their estimate assumes the longest sample the flags allow and would refuse runs
that fit. So the check refuses only what cannot run at all; a run it lets through can still run out of memory in
its first step (then ``--micro-batch-size``, recomputation or more model parallelism are the remedies the dry run's
activation lines point to).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from megatron_puffin.config.arguments import PuffinArguments

GIB = 1024 ** 3


def _meminfo(path: Path = Path("/proc/meminfo")) -> dict:
    """``/proc/meminfo`` in bytes by field (empty where it cannot be read)."""
    fields = {}
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                fields[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return fields


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def container_limit_bytes(root: Path = Path("/sys/fs/cgroup")) -> Optional[int]:
    """What this process's container may still allocate (cgroup v2, else v1), or None without a limit."""
    limit, used = _read_int(root / "memory.max"), _read_int(root / "memory.current")
    if limit is None:
        limit, used = _read_int(root / "memory" / "memory.limit_in_bytes"), _read_int(
            root / "memory" / "memory.usage_in_bytes")
        if limit is not None and limit >= 1 << 60:  # v1 spells "no limit" as a huge number
            limit = None
    return None if limit is None else max(limit - (used or 0), 0)


def local_processes() -> int:
    """Training processes on this node: torchrun's ``LOCAL_WORLD_SIZE``, Slurm's tasks per node, else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0]  # Slurm may write "4(x2)"
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def available_bytes() -> Tuple[float, str]:
    """The bytes this process can have and a description of where they come from (see the module docstring)."""
    if torch.cuda.is_available():
        from megatron_puffin.distributed.launch import cuda_device_index

        index = cuda_device_index(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count())
        total = torch.cuda.mem_get_info(index)[1]
        return float(total), f"GPU {index} holds {total / GIB:.1f} GiB"
    info = _meminfo()
    if "MemAvailable" not in info:
        return float("inf"), "unknown host memory"
    host = info["MemAvailable"] + info.get("SwapFree", 0)
    limit = container_limit_bytes()
    have, where = (host, "the host's") if limit is None or limit >= host else (limit, "the container limit's")
    processes = local_processes()
    if processes == 1:
        return have, f"{where} {have / GIB:.1f} GiB available (memory and swap)"
    return have / processes, (f"this process's {have / processes / GIB:.1f} GiB: {where} {have / GIB:.1f} GiB available "
                              f"(memory and swap) over the {processes} processes this node runs")


def needed_bytes(args: PuffinArguments) -> float:
    """Weights, gradients and optimizer state of the largest pipeline stage on one process (the dry run's table)."""
    from megatron_puffin.training.layout import fsdp2_bytes, memory_estimate, towers

    if args.parallel.use_torch_fsdp2:
        return fsdp2_bytes(args)
    return max(stage.total for stage in memory_estimate(args, towers(args)))


def memory_problems(args: PuffinArguments, available: Optional[Tuple[float, str]] = None) -> List[str]:
    """One line when the model's state cannot fit this process's memory (``available``: default
    :func:`available_bytes`), else nothing."""
    need = needed_bytes(args)
    have, where = available or available_bytes()
    if need <= have:
        return []
    return [f"the model needs {need / GIB:,.1f} GiB per process for its weights, gradients and optimizer state alone "
            f"(pretrain_puffin.py --dry-run prints the table), more than {where}; split it over more processes "
            "(--tensor-model-parallel-size, --pipeline-model-parallel-size, --use-distributed-optimizer or "
            "--use-torch-fsdp2), freeze towers, or check the model's size flags"]


def check_memory(args: PuffinArguments) -> None:
    """Raise one :class:`~megatron_puffin.config.ConfigError` when :func:`memory_problems` finds one."""
    from megatron_puffin.config import ConfigError

    problems = memory_problems(args)
    if problems:
        raise ConfigError(problems)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that did not fit: CUDA's out-of-memory error, the CPU allocator's
    ``can't allocate memory``, or Python's MemoryError (numpy)."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(error)


def out_of_memory_message(error: BaseException, where: str) -> str:
    """One line for an allocation that did not fit ``where`` (a step and its micro-batches, or the loader's
    assembling of them): what failed and the remedies."""
    detail = " ".join(str(error).split())[:200]
    return (f"{where} ran out of memory ({type(error).__name__}: {detail}). Lower the streams' micro-batch sizes "
            "(--task-stream TASK:PATH:SIZE or --micro-batch-size), turn on recomputation (--recompute, "
            "--vision-recompute, --connector-recompute, --dit-recompute), or split the model over more processes "
            "(pretrain_puffin.py --dry-run estimates the activations)")


def micro_batch_sizes(batches: Sequence[dict]) -> str:
    """``image2text x2, cam2image x2``: each micro-batch's stream task and sample count."""
    from megatron_puffin.training.step import stream_task

    return ", ".join(f"{stream_task(batch) or batch['task']} x{int(batch['input_ids'].shape[0])}" for batch in batches)


def release_memory() -> None:
    """Frees what a failed allocation's exception kept alive (its frames sit in reference cycles until the cyclic
    collector runs), hands the C library's free heap back to the kernel (glibc's ``malloc_trim``: a micro-batch's
    many small tensors leave the heap grown) and, on a GPU, the caching allocator's free blocks: the save that
    follows needs memory, and threads."""
    import gc

    from megatron_puffin.training.host_memory import trim_heap

    gc.collect()
    trim_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
