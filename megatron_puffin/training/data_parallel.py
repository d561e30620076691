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

With ``--use-torch-fsdp2`` the model is wrapped by megatron-core's ``TorchFullyShardedDataParallel`` instead
(:class:`PuffinTorchFSDP`): every parameter becomes a DTensor sharded along dim 0 over the data-parallel group,
gathered per unit just in time and reduce-scattered in backward by FSDP2's own hooks.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Optional, Union

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.torch_fully_sharded_data_parallel import TorchFullyShardedDataParallel

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


@contextlib.contextmanager
def fsdp2_forward_records_kept(module: torch.nn.Module) -> Iterator[None]:
    """Puts FSDP2's record of which units ran forward back as it was before the block (a no-op without FSDP2 units).

    FSDP2 appends every unit's forward to a shared list (and the unit's index in it), which the next backward reads
    to choose what to all-gather ahead, and which only a backward clears. Forward-only passes, such as validation,
    leave their entries behind; where they differ between data-parallel ranks (each decodes its own camera images, one
    rank perhaps none), the next training backward prefetches different units on different ranks and their
    collectives no longer pair: with ``--eval-camera-samples 1`` at DP 2 the step after the first validation hung,
    one rank in an all-gather and the other in a reduce-scatter."""
    from torch.distributed.fsdp import FSDPModule

    groups = [group for unit in module.modules() if isinstance(unit, FSDPModule)
              for group in unit._get_fsdp_state()._fsdp_param_groups]
    contexts = {id(group.comm_ctx): group.comm_ctx for group in groups}
    orders = {key: list(context.post_forward_order) for key, context in contexts.items()}
    indices = [(group, list(group._post_forward_indices)) for group in groups]
    try:
        yield
    finally:
        for key, context in contexts.items():
            context.post_forward_order[:] = orders[key]
        for group, saved in indices:
            group._post_forward_indices[:] = saved


@contextlib.contextmanager
def unsharded_parameters(module: torch.nn.Module, skip: Optional[torch.nn.Module] = None) -> Iterator[None]:
    """Inside, every ``--use-torch-fsdp2`` unit of ``module`` (but those inside ``skip``, a part the caller will not
    run) holds its whole parameters on every rank and its forwards run no collective: decoding (validation's camera
    metrics) calls the model's parts directly, outside FSDP2's pre-forward hooks, and each data-parallel rank decodes
    its own images for its own number of steps.

    Every unit is all-gathered once on entry (the same units in the same order on every rank) and told not to
    reshard after its forward (what FSDP2's ``set_reshard_after_forward`` is for: evaluation); on exit each is
    resharded and gets its own setting back. A no-op for a module without FSDP2 units."""
    from torch.distributed.fsdp import FSDPModule

    skipped = set(skip.modules()) if skip is not None else set()
    units = [unit for unit in module.modules() if isinstance(unit, FSDPModule) and unit not in skipped]
    if not units:
        yield
        return
    # FSDP2 keeps each unit's setting as its parameter groups' post-forward mesh (None: no reshard after forward)
    # and a root flag; both are restored exactly (the root unit never reshards after its forward).
    saved = []
    for unit in units:
        state = unit._get_fsdp_state()
        saved.append((unit, state._auto_reshard_after_forward,
                      [(group, group.post_forward_mesh_info) for group in state._fsdp_param_groups]))
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        for unit in units:
            unit.unshard()
        yield
    finally:
        for unit, auto, groups in saved:
            unit.reshard()
            unit._get_fsdp_state()._auto_reshard_after_forward = auto
            for group, mesh_info in groups:
                group.post_forward_mesh_info = mesh_info


class PuffinTorchFSDP(TorchFullyShardedDataParallel):
    """megatron-core's FSDP2 wrapper with Puffin's sharding units: every megatron-core ``TransformerLayer`` (LLM
    decoder, RADIO blocks, connector layers) and every MMDiT joint block is its own FSDP unit; everything else
    (embeddings, the tied output layer, projections, meta queries) belongs to the root unit, gathered for the whole
    forward. The frozen VAE is not a submodule of the model (``PuffinModel.vae``): every rank holds all of it. The
    embedding cannot be a unit of its own: the tied output layer reads its weight outside the
    embedding's forward, after FSDP2 has resharded it (megatron-core's default units assume that does not happen).
    """

    def __init__(self, model_config, ddp_config: DistributedDataParallelConfig, module: torch.nn.Module,
                 process_group) -> None:
        from megatron.core.transformer.transformer_layer import TransformerLayer

        from megatron_puffin.models.dit.joint_block import JointTransformerBlock

        super().__init__(model_config, ddp_config, module, sub_modules_to_wrap={TransformerLayer, JointTransformerBlock},
                         process_group=process_group)

    def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
        """FSDP2 reduce-scattered every gradient in backward; what is left is the trainable parameters that got
        none this step (towers the step's tasks do not run, the MMDiT's last-block text queries, which are never
        computed): they get a zero gradient, as megatron-core's DDP buffer gives them, so that the optimizer
        steps them and keeps state for them like for every other parameter (torch's Adam skips a parameter
        without a gradient and creates no state for it, which a checkpoint then lacks). (megatron-core 0.16.1's
        ``finalize_model_grads`` passes ``force_all_reduce``, which the base class's no-op does not accept.)"""
        for param in self.module.parameters():
            if param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)


def wrap_data_parallel(model: torch.nn.Module, parallel, process_group) -> Union[DistributedDataParallel,
                                                                                  PuffinTorchFSDP]:
    """The data-parallel wrapper the flags ask for: :class:`PuffinTorchFSDP` with ``--use-torch-fsdp2``, else
    megatron-core's ``DistributedDataParallel`` (ZeRO-1 with ``--use-distributed-optimizer``)."""
    if parallel.use_torch_fsdp2:
        return PuffinTorchFSDP(model.config, DistributedDataParallelConfig(), model, process_group)
    return DistributedDataParallel(model.config, data_parallel_config(parallel), model)


def _local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard object a DTensor holds (``_local_tensor``), a plain tensor itself."""
    return getattr(tensor, "_local_tensor", tensor)


def fsdp2_optimizer_local_tensor() -> list:
    """The ``FSDP2_OPTIMIZER_LOCAL_TENSOR`` row of :data:`megatron_puffin.platform.PATCHES`: megatron-core 0.16.1
    with torch 2.13 fails to save the optimizer of an FSDP2 model ("Param id 0 does not match any model sharded
    param"): the model's sharded tensors hold each DTensor's ``_local_tensor``, while ``dist_checkpointing.optimizer``
    maps optimizer parameters through ``to_local()``, which in torch 2.13 returns a new alias object, so no parameter
    matches by identity. Both sides then use the ``_local_tensor`` object (the same storage; plain tensors are
    unchanged)."""
    from megatron.core.dist_checkpointing import optimizer as dist_optimizer

    return [(dist_optimizer, "to_local_if_dtensor", _local_shard)]


def restore_dtensor_optimizer_states(optimizer) -> None:
    """After loading an optimizer of an FSDP2 model: megatron-core's load leaves each DTensor parameter's Adam
    moments as plain local tensors, which torch's Adam cannot combine with the DTensor gradients; they become
    DTensors laid out like their parameter (a no-op for any other model)."""
    from torch.distributed.tensor import DTensor

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = sub.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if not isinstance(param, DTensor):
                    continue
                state = inner.state.get(param, {})
                for key, value in state.items():
                    if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.to_local().shape:
                        state[key] = DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                                        shape=param.shape, stride=param.stride())
