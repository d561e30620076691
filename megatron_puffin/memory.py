"""What memory this process can have, and whether an error is an allocation that did not fit: used by the
training's memory check (:mod:`megatron_puffin.training.memory_check`) and by the inference tools' model build.

* on a GPU, the whole memory of its device (``torch.cuda.mem_get_info``; the total, not the free memory, so that
  another process's use never refuses a run that would fit an idle GPU);
* on CPU, the host's available memory plus free swap (``/proc/meminfo``), or the container's limit when it has
  one (cgroup v2 ``memory.max`` less ``memory.current``, or v1's ``memory.limit_in_bytes``), shared by the ranks
  this node runs (``LOCAL_WORLD_SIZE``, or Slurm's ``SLURM_NTASKS_PER_NODE``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import torch

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
    share = have / processes
    return share, (f"this process's {share / GIB:.1f} GiB: {where} {have / GIB:.1f} GiB available (memory and swap) "
                   f"over the {processes} processes this node runs")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that did not fit: CUDA's out-of-memory error, the CPU allocator's
    ``can't allocate memory``, or Python's MemoryError (numpy)."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(error)
