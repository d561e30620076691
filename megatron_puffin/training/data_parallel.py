"""Data-parallel wrapping: megatron-core's ``DistributedDataParallelConfig`` from the parallel flags, and the
schedule hooks that overlapped communication needs.

With ``--overlap-grad-reduce`` megatron-core's DDP launches each bucket's all-reduce (reduce-scatter with the
distributed optimizer) from a backward hook as soon as the bucket's gradients are ready, on the last micro-batch of
the step only: the pipeline schedule must be told how to suppress it on the other micro-batches (``no_sync_func``)
and how to launch it (``grad_sync_func``). With ``--overlap-param-gather`` the distributed optimizer's step leaves
the parameter all-gather to forward pre-hooks of the next forward pass, so anything that reads the weights outside
a training forward (a checkpoint save, validation) must first complete the gather: :func:`gathered_parameters`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig


def data_parallel_config(parallel) -> DistributedDataParallelConfig:
    """megatron-core's DDP config for a :class:`~megatron_puffin.config.schema.ParallelConfig` (gradients are
    reduced in fp32 in every mode)."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        bucket_size=parallel.ddp_bucket_size,
    )


def wire_overlap(model_config, ddp: DistributedDataParallel) -> None:
    """Give the pipeline schedule the DDP hooks of overlapped gradient reduction (a no-op without it)."""
    if ddp.ddp_config.overlap_grad_reduce:
        model_config.no_sync_func = ddp.no_sync
        model_config.grad_sync_func = ddp.start_grad_sync


@contextlib.contextmanager
def gathered_parameters(ddp: DistributedDataParallel) -> Iterator[None]:
    """Inside, every parameter holds its updated value on every rank: with ``--overlap-param-gather`` the pending
    all-gather is completed (synchronously) and the forward pre-hooks are off until the block ends."""
    if not getattr(ddp, "use_forward_hook", False):
        yield
        return
    ddp.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        ddp.enable_forward_pre_hook()
