"""Data-parallel wrapping: megatron-core's ``DistributedDataParallelConfig`` from the parallel flags, and the
schedule hooks that overlapped communication needs.

With ``--overlap-grad-reduce`` megatron-core's DDP launches each bucket's all-reduce (reduce-scatter with the
distributed optimizer) from a backward hook as soon as the bucket's gradients are ready, on the last micro-batch of
the step only: the pipeline schedule must be told how to suppress it on the other micro-batches (``no_sync_func``)
and how to launch it (``grad_sync_func``).

megatron-core counts a bucket as ready when every parameter in it has registered its gradient during that last
micro-batch's backward. A Puffin micro-batch carries one task, which leaves other towers' trainable parameters
unused (an image2text micro-batch never reaches the connectors, the MMDiT or the meta queries): their hooks never
fire, their buckets would never launch, and megatron-core fails the step. Their gradients are final before the last
micro-batch starts (what the earlier micro-batches accumulated), so :func:`register_unused_parameters_ready` marks
them ready once the last backward has run, before the schedule's ``finalize_model_grads`` waits for the reductions
(:func:`wire_overlap` installs it). The reduced gradients are exactly the non-overlapped path's; buckets that hold
such parameters launch at the end of the backward instead of during it.

With ``--overlap-param-gather`` the distributed optimizer's step leaves the parameter all-gather to forward
pre-hooks of the next forward pass: each module waits for its own parameters' bucket before it runs. A parameter
read outside its module's forward would be read before its all-gather completed (the meta queries, which
``PuffinModel.forward`` reads to build the LLM input: :data:`READ_OUTSIDE_THEIR_MODULE`), so :func:`wire_overlap`
adds a pre-hook on the whole model that waits for those. Anything that reads the weights outside a training forward
(a checkpoint save, validation) must first complete the gather: :func:`gathered_parameters`.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

READ_OUTSIDE_THEIR_MODULE = ("conditioner.meta_queries",)
"""Parameters the composed model reads outside their own module's forward (by name in ``PuffinModel``)."""


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
    """Give the pipeline schedule the DDP hooks of overlapped gradient reduction (a no-op without it): ``no_sync``,
    ``start_grad_sync``, and a ``finalize_model_grads_func`` (set before this call) that first marks the
    parameters the step's last micro-batch left unused as ready (:func:`register_unused_parameters_ready`)."""
    if not ddp.ddp_config.overlap_grad_reduce:
        return
    assert model_config.finalize_model_grads_func is not None, "set finalize_model_grads_func before wire_overlap"
    model_config.no_sync_func = ddp.no_sync
    model_config.grad_sync_func = ddp.start_grad_sync
    model_config.finalize_model_grads_func = _completing_unused(model_config.finalize_model_grads_func, ddp)
    if getattr(ddp, "use_forward_hook", False):
        _wait_for_outside_reads(ddp)


def _wait_for_outside_reads(ddp: DistributedDataParallel) -> None:
    """A forward pre-hook on the whole model that completes the all-gather of :data:`READ_OUTSIDE_THEIR_MODULE`
    (megatron-core's per-module hooks wait for a module's own parameters only when that module is called)."""
    params = [param for name, param in ddp.module.named_parameters()
              if name in READ_OUTSIDE_THEIR_MODULE and param in ddp.param_to_bucket_group]
    if not params:
        return

    def hook(module, *unused):
        if not ddp.remove_forward_pre_hook_handles:  # gathered_parameters: hooks off, every parameter gathered
            return
        skip_next = ddp.ddp_config.align_param_gather or ddp.overlap_param_gather_with_optimizer_step
        for param in params:
            ddp.param_to_bucket_group[param].finish_param_sync(skip_next_bucket_dispatch=skip_next)

    ddp.module.register_forward_pre_hook(hook)


def _completing_unused(finalize: Callable, ddp: DistributedDataParallel) -> Callable:
    """``finalize`` preceded by :func:`register_unused_parameters_ready` (the schedule calls it right after the
    step's last backward pass)."""

    @functools.wraps(finalize)
    def finalize_after_unused(*args, **kwargs):
        register_unused_parameters_ready(ddp)
        return finalize(*args, **kwargs)

    return finalize_after_unused


def register_unused_parameters_ready(ddp: DistributedDataParallel) -> int:
    """After the step's last micro-batch's backward: register every bucketed parameter whose gradient hook did not
    fire in it as ready, with megatron-core's ``register_grad_ready``, which launches each bucket group's reduction
    once all its parameters are in.

    Bucket groups whose reduction was launched already are left alone (every parameter of theirs registered, or the
    schedule's ``grad_sync_func`` launched them, as on pipeline stages after the first). A bucket group whose
    reduction is still not launched then (its parameters registered a different number of times than on the first
    step, as a parameter used once per recomputed segment may) is launched directly: its gradients are complete.

    Returns:
        The number of parameters registered here.

    Raises:
        RuntimeError: a parameter registered more often than on the first step: megatron-core may then have
            launched the bucket before that parameter's last gradient arrived.
    """
    force_all_reduce = bool(getattr(ddp, "force_all_reduce", False))
    registered = 0
    for group in ddp.bucket_groups + ddp.expert_parallel_bucket_groups:
        _check_not_early(group)
        if group.grad_reduce_handle is not None or not group.is_last_microbatch:
            continue
        for param in group.params:
            if param not in group.per_param_grad_ready_counts:
                group.register_grad_ready(param, force_all_reduce)
                registered += 1
        if not group.is_first_batch and group.grad_reduce_handle is None:
            group.start_grad_sync(force_all_reduce=force_all_reduce)
    return registered


def _check_not_early(group) -> None:
    if group.is_first_batch:
        return
    golden = group.golden_per_param_grad_ready_counts
    if any(count > golden.get(param, 0) for param, count in group.per_param_grad_ready_counts.items()):
        raise RuntimeError("--overlap-grad-reduce: a parameter received more gradients in this step's last micro-batch "
                           "than in the first step's, so megatron-core may have reduced its bucket early; train "
                           "without --overlap-grad-reduce")


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
