"""Where this process sits, from its launcher's environment: torchrun, ``srun`` without torchrun, or alone.

* torchrun (or anything setting ``RANK`` and ``WORLD_SIZE``): its variables as they are.
* ``srun python pretrain_puffin.py ...`` (one task per GPU, no torchrun): ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``
  (or ``SLURM_NTASKS``), ``SLURM_LOCALID``; ``MASTER_ADDR`` defaults to the first host of the step's node list and
  ``MASTER_PORT`` to a port derived from the job id (so two jobs sharing a node do not collide).
* neither: one process.

A Slurm batch script itself (``sbatch``, outside any ``srun`` step) is one process even when the job has many
tasks; starting training there with more than one task is refused with the fix (use ``srun`` or torchrun), since
every process would otherwise believe it is rank 0 of 1, or wait forever for peers.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

SLURM_PORT_BASE = 20000
SLURM_PORT_RANGE = 20000


@dataclass(frozen=True)
class LaunchEnvironment:
    """The rank, world size, local rank and rendezvous address of this process, and which launcher said so."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str]
    master_port: Optional[int]
    launcher: str
    """``torchrun``, ``slurm`` or ``single``."""

    def torchrun_variables(self) -> dict:
        """The torchrun-style variables (``RANK`` ... ``MASTER_PORT``) that describe this process."""
        variables = {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank)}
        if self.master_addr is not None:
            variables["MASTER_ADDR"] = self.master_addr
        if self.master_port is not None:
            variables["MASTER_PORT"] = str(self.master_port)
        return variables


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: ``node[003-005,9],gpu1`` -> ``node003``."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if not match or not match.group(0):
        raise ValueError(f"cannot read a host from the Slurm node list {nodelist!r}")
    prefix, ranges, suffix = match.groups()
    if ranges is None:
        return prefix + suffix
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"{name}={environ[name]!r} is not an integer") from None


def _slurm(environ: Mapping[str, str]) -> LaunchEnvironment:
    world_size = _int(environ, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS")
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    master_addr = environ.get("MASTER_ADDR")
    if master_addr is None:
        if not nodelist:
            raise ValueError("srun without torchrun: no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST; set MASTER_ADDR")
        master_addr = first_host(nodelist)
    if "MASTER_PORT" in environ:
        master_port = _int(environ, "MASTER_PORT")
    else:
        master_port = SLURM_PORT_BASE + _int(environ, "SLURM_JOB_ID") % SLURM_PORT_RANGE if "SLURM_JOB_ID" in environ \
            else SLURM_PORT_BASE
    return LaunchEnvironment(
        rank=_int(environ, "SLURM_PROCID"), world_size=world_size, local_rank=_int(environ, "SLURM_LOCALID"),
        master_addr=master_addr, master_port=master_port, launcher="slurm",
    )


def launch_environment(environ: Optional[Mapping[str, str]] = None) -> LaunchEnvironment:
    """Read the launcher's environment (default ``os.environ``); see the module docstring.

    Raises:
        ValueError: a Slurm batch script of a multi-task job without ``srun``/torchrun, or malformed variables.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        port = environ.get("MASTER_PORT")
        return LaunchEnvironment(
            rank=_int(environ, "RANK"), world_size=_int(environ, "WORLD_SIZE"),
            local_rank=_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
            master_addr=environ.get("MASTER_ADDR"), master_port=None if port is None else int(port), launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return _slurm(environ)
    if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
        raise ValueError(
            f"this Slurm job has {environ['SLURM_NTASKS']} tasks but this process was not started by srun or "
            "torchrun (it is the batch script itself); start training with `srun python pretrain_puffin.py ...` "
            "(one task per GPU) or with torchrun (see examples/slurm/train.sbatch)"
        )
    return LaunchEnvironment(rank=0, world_size=1, local_rank=0, master_addr=environ.get("MASTER_ADDR"),
                             master_port=None, launcher="single")


def cuda_device_index(local_rank: int, visible_devices: int) -> int:
    """The CUDA device of a process: its local rank, or 0 when it sees exactly one GPU (Slurm's one GPU per task).

    Raises:
        ValueError: more than one GPU visible and fewer than ``local_rank + 1``.
    """
    if visible_devices == 1:
        return 0
    if local_rank >= visible_devices:
        raise ValueError(
            f"local rank {local_rank} but only {visible_devices} GPU(s) are visible; give each task one GPU "
            "(srun --gpus-per-task=1) or start at most one process per visible GPU"
        )
    return local_rank
