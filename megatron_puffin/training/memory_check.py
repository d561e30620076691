"""Does the model fit this machine? Checked by every rank before the process group starts.

A model too large for its device used to fail inside megatron-core's layer constructors, after the process group
had started, with the allocator's traceback (``DefaultCPUAllocator: can't allocate memory: you tried to allocate
40960000000 bytes`` for ``--hidden-size 10000000`` on the tiny recipe; a CUDA out-of-memory error on a GPU, or the
kernel's OOM killer on a host with overcommit). :func:`memory_problems` compares what the ``--dry-run`` table
counts for one process, its stage's weights, gradients and optimizer state (``training.layout``; under
``--use-torch-fsdp2`` the sharded total plus what is gathered at once), with what this process can have
(:func:`megatron_puffin.memory.available_bytes`: its GPU, or its share of the host's or container's memory).

Activations are not counted: their estimate assumes the longest sample the flags allow and would refuse runs
that fit. So the check refuses only what cannot run at all; a run it lets through can still run out of memory in
its first step (then ``--micro-batch-size``, recomputation or more model parallelism are the remedies the dry run's
activation lines point to).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from megatron_puffin.config.arguments import PuffinArguments
from megatron_puffin.memory import GIB, available_bytes, is_out_of_memory

__all__ = ["check_memory", "is_out_of_memory", "memory_problems", "micro_batch_sizes", "needed_bytes",
           "out_of_memory_message", "release_memory"]


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
