"""Data-parallel wrapping: megatron-core's ``DistributedDataParallelConfig`` from the parallel flags, and the
schedule hooks that overlapped communication needs.

With ``--overlap-grad-reduce`` megatron-core's DDP launches each bucket's all-reduce (reduce-scatter with the
distributed optimizer) from a backward hook as soon as the bucket's gradients are ready, on the last micro-batch of
the step only: the pipeline schedule must be told how to suppress it on the other micro-batches (``no_sync_func``)
and how to launch it (``grad_sync_func``). With ``--overlap-param-gather`` the distributed optimizer's step leaves
the parameter all-gather to forward pre-hooks of the next forward pass, so anything that reads the weights outside
a training forward (a checkpoint save, validation) must first complete the gather: :func:`gathered_parameters`.

With ``--use-torch-fsdp2`` the model is wrapped by megatron-core's ``TorchFullyShardedDataParallel`` instead
(:class:`PuffinTorchFSDP`): every parameter becomes a DTensor sharded along dim 0 over the data-parallel group,
gathered per unit just in time and reduce-scattered in backward by FSDP2's own hooks.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Union

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.torch_fully_sharded_data_parallel import TorchFullyShardedDataParallel


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


class PuffinTorchFSDP(TorchFullyShardedDataParallel):
    """megatron-core's FSDP2 wrapper with Puffin's sharding units: every megatron-core ``TransformerLayer`` (LLM
    decoder, RADIO blocks, connector layers) and every MMDiT joint block is its own FSDP unit; everything else
    (embeddings, the tied output layer, projections, the frozen VAE) belongs to the root unit, gathered for the whole
    forward. The embedding cannot be a unit of its own: the tied output layer reads its weight outside the
    embedding's forward, after FSDP2 has resharded it (megatron-core's default units assume that does not happen).
    """

    def __init__(self, model_config, ddp_config: DistributedDataParallelConfig, module: torch.nn.Module,
                 process_group) -> None:
        from megatron.core.transformer.transformer_layer import TransformerLayer

        from megatron_puffin.models.dit.joint_block import JointTransformerBlock

        super().__init__(model_config, ddp_config, module, sub_modules_to_wrap={TransformerLayer, JointTransformerBlock},
                         process_group=process_group)

    def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
        """Nothing to finish: FSDP2 reduce-scattered every gradient in backward. (megatron-core 0.16.1's
        ``finalize_model_grads`` passes ``force_all_reduce``, which the base class's no-op does not accept.)"""


def wrap_data_parallel(model: torch.nn.Module, parallel, process_group) -> Union[DistributedDataParallel,
                                                                                  PuffinTorchFSDP]:
    """The data-parallel wrapper the flags ask for: :class:`PuffinTorchFSDP` with ``--use-torch-fsdp2``, else
    megatron-core's ``DistributedDataParallel`` (ZeRO-1 with ``--use-distributed-optimizer``)."""
    if parallel.use_torch_fsdp2:
        match_dtensor_optimizer_states()
        return PuffinTorchFSDP(model.config, DistributedDataParallelConfig(), model, process_group)
    return DistributedDataParallel(model.config, data_parallel_config(parallel), model)


def _local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard object a DTensor holds (``_local_tensor``), a plain tensor itself."""
    return getattr(tensor, "_local_tensor", tensor)


def match_dtensor_optimizer_states() -> None:
    """Work around megatron-core 0.16.1 with torch 2.13 failing to save the optimizer of an FSDP2 model
    ("Param id 0 does not match any model sharded param"): the model's sharded tensors hold each DTensor's
    ``_local_tensor``, while ``dist_checkpointing.optimizer`` maps optimizer parameters through ``to_local()``,
    which in torch 2.13 returns a new alias object, so no parameter matches by identity. Both sides now use the
    ``_local_tensor`` object (the same storage)."""
    from megatron.core.dist_checkpointing import optimizer as dist_optimizer

    dist_optimizer.to_local_if_dtensor = _local_shard


def as_model_dtensors(module: torch.nn.Module, state_dict):
    """A loaded model state dict whose entries for FSDP2 (DTensor) parameters are DTensors laid out like them.

    megatron-core's dist-checkpoint load returns each DTensor parameter's *local shard* as a plain tensor (the
    checkpoint's sharded tensors are built from ``_local_tensor``); ``load_state_dict`` can only copy a DTensor into
    a DTensor parameter. Other entries (and every entry without --use-torch-fsdp2) are returned unchanged.
    """
    from torch.distributed.tensor import DTensor

    targets = module.state_dict(keep_vars=True)
    converted = dict(state_dict)
    for key, value in state_dict.items():
        target = targets.get(key)
        if isinstance(target, DTensor) and torch.is_tensor(value) and not isinstance(value, DTensor):
            converted[key] = DTensor.from_local(value, target.device_mesh, target.placements, run_check=False,
                                                shape=target.shape, stride=target.stride())
    return converted


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
