"""Process-group start-up and teardown.

``initialize`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), or Slurm's when ``srun`` started the tasks without torchrun (:mod:`.launch`), or runs as a single
process with world size 1 when there is none. Each process takes GPU ``LOCAL_RANK`` (GPU 0 when it sees only one).
It picks NCCL with CUDA and gloo without, initialises megatron-core's ``parallel_state`` for TP/PP (DP is derived), and
seeds the RNG streams (see :mod:`.random`). It does not patch megatron-core: the program's entry point calls
:func:`megatron_puffin.platform.setup` once at start-up, and ``initialize`` refuses to run without it.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_puffin.distributed.cpu_compat import cuda_available
from megatron_puffin.distributed.launch import cuda_device_index, launch_environment
from megatron_puffin.distributed.random import seed_everything
from megatron_puffin.patching import require_setup

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the parallel layout."""

    rank: int
    world_size: int
    local_rank: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    backend: str
    device: torch.device
    seed: int

    @property
    def is_first_pipeline_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pipeline_stage(self) -> bool:
        return self.pp_rank == self.pipeline_model_parallel_size - 1


def find_free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def _init_process_group(backend: str, timeout_minutes: int) -> None:
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
        return
    if world_size != 1:
        raise RuntimeError(f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set; launch with torchrun")
    # A single process without torchrun: a store in this process's memory. No port can be taken by another
    # process, and nothing is left behind by a process killed with SIGKILL (a file store stayed in /tmp).
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    backend: Optional[str] = None,
    timeout_minutes: int = 10,
) -> DistributedContext:
    """Start (or join) the process group and set up megatron-core's parallel state.

    Safe to call again in the same process with other sizes: existing model-parallel groups are destroyed and
    re-created (the default process group is kept).

    Args:
        tensor_model_parallel_size: TP size; must divide the world size together with PP.
        pipeline_model_parallel_size: PP size.
        seed: the run's seed; see :func:`megatron_puffin.distributed.random.seed_everything`.
        backend: ``nccl`` or ``gloo``; default NCCL with CUDA, gloo without.
        timeout_minutes: collective timeout.

    Raises:
        RuntimeError: :func:`megatron_puffin.platform.setup` has not run in this process.
    """
    from megatron.core import parallel_state

    require_setup("megatron_puffin.distributed.initialize")
    has_cuda = cuda_available()
    backend = backend or ("nccl" if has_cuda else "gloo")
    if not dist.is_initialized():
        launch = launch_environment()
        if launch.launcher == "slurm":  # srun without torchrun: describe this task the way torchrun would
            os.environ.update(launch.torchrun_variables())
    if has_cuda:
        torch.cuda.set_device(cuda_device_index(_env_int("LOCAL_RANK", 0), torch.cuda.device_count()))
    if not dist.is_initialized():
        _init_process_group(backend, timeout_minutes)
    world_size = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world_size % model_parallel != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor x pipeline parallel size "
            f"({tensor_model_parallel_size} x {pipeline_model_parallel_size})"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    context = _current_context(backend, seed)
    seed_everything(seed, context.tp_rank)
    logger.debug("initialised %s", context)
    return context


def _current_context(backend: str, seed: int) -> DistributedContext:
    from megatron.core import parallel_state as ps

    device = torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=_env_int("LOCAL_RANK", 0),
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        data_parallel_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        backend=backend,
        device=device,
        seed=seed,
    )


def destroy() -> None:
    """Tear down megatron-core's parallel state and the default process group (idempotent)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
