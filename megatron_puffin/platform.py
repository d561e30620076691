"""Every change this project makes to megatron-core 0.16.1, in one table, applied once at start-up.

Each entry point calls :func:`setup` once before it builds anything: ``pretrain_puffin.py`` (so every torchrun
child), the tools that build models or read checkpoints, the benchmarks, ``tests/conftest.py`` and the test
suite's spawn helper (a spawned rank is a new interpreter). :func:`megatron_puffin.distributed.initialize` and the
distributed optimizer's builder only *check* that it ran (:func:`require_setup`), so no code path depends on which
module happened to start first.

A patch replaces named attributes (a function of a megatron-core module, a method of one of its classes, a torch
function megatron-core calls) and nothing else; :func:`unpatched` puts the originals back for the duration of a
``with`` block, which is how ``tests/unit/test_cpu_compat.py`` shows, through megatron-core's own call sites, that
each patch is still needed. The table (:data:`PATCHES`) gives each patch's reason; the replacements live in
:mod:`megatron_puffin.distributed.cpu_compat` (CPU-only machines), :mod:`megatron_puffin.training.optimizer`
(distributed-optimizer checkpoint bugs of megatron-core 0.16.1), :mod:`megatron_puffin.training.fsdp2_checkpoint`
(FSDP2 checkpoint records), :mod:`megatron_puffin.models.llm.rope` (RoPE without per-layer recomputation),
:mod:`megatron_puffin.training.wgrad_accumulation` (weight gradients into the gradient buffer on CPU),
:mod:`megatron_puffin.models.common.plain_linear` (linear layers at TP=1 as one ``F.linear``),
:mod:`megatron_puffin.training.save_queue` (the lifetime of the checkpoint write-results queue's process) and,
for the one-line row-parallel fix, here. See
docs/megatron_patches.md.
"""
from __future__ import annotations

import logging
from typing import Callable, List, Tuple

import torch

from megatron_puffin.patching import (
    MegatronPatch,
    Replacement,
    applied,
    apply,
    in_place,
    is_set_up,
    require_setup,
    unpatched,
)

# The mechanism (megatron_puffin.patching) is read through this module too: platform.unpatched("NAME") in the tests.
__all__ = ["PATCHES", "MegatronPatch", "Replacement", "applied", "in_place", "is_set_up", "require_setup", "setup",
           "unpatched"]

logger = logging.getLogger(__name__)

def _without_cuda() -> bool:
    return not torch.cuda.is_available()


def _without_apex_or_te() -> bool:
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    return not HAVE_APEX_OR_TE


def _always() -> bool:
    return True


def _cpu(name: str) -> Callable[[], List[Replacement]]:
    def build() -> List[Replacement]:
        from megatron_puffin.distributed import cpu_compat

        return cpu_compat.REPLACEMENTS[name]()

    return build


def _distributed_optimizer(name: str) -> Callable[[], List[Replacement]]:
    def build() -> List[Replacement]:
        from megatron_puffin.training import optimizer

        return optimizer.REPLACEMENTS[name]()

    return build


_ABSENT = object()


def _row_parallel_tp_group() -> List[Replacement]:
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    original = RowParallelLinear._forward_impl

    def _forward_impl(self, input, weight, *args, **kwargs):
        if kwargs.get("tp_group", _ABSENT) is None:
            kwargs["tp_group"] = self.tp_group  # the group the layer was built with, as ColumnParallelLinear passes
        return original(self, input, weight, *args, **kwargs)

    return [(RowParallelLinear, "_forward_impl", _forward_impl)]


def _without_cuda_or_apex_wgrad() -> bool:
    from megatron_puffin.training.wgrad_accumulation import cpu_wgrad_accumulation_needed

    return cpu_wgrad_accumulation_needed()


def _cpu_wgrad_accumulation() -> List[Replacement]:
    from megatron_puffin.training.wgrad_accumulation import cpu_wgrad_accumulation

    return cpu_wgrad_accumulation()


def _rope_cos_sin_once() -> List[Replacement]:
    from megatron.core.transformer import attention

    from megatron_puffin.models.llm.rope import make_apply_rotary_pos_emb

    return [(attention, "apply_rotary_pos_emb", make_apply_rotary_pos_emb(attention.apply_rotary_pos_emb))]


def _plain_linear_at_tp1() -> List[Replacement]:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_puffin.models.common.plain_linear import make_forwards

    column, row = make_forwards(ColumnParallelLinear.forward, RowParallelLinear.forward)
    return [(ColumnParallelLinear, "forward", column), (RowParallelLinear, "forward", row)]


def _save_queue_lifetime() -> List[Replacement]:
    from megatron_puffin.training.save_queue import replacements

    return replacements()


def _fsdp2_optimizer_local_tensor() -> List[Replacement]:
    from megatron_puffin.training.data_parallel import fsdp2_optimizer_local_tensor

    return fsdp2_optimizer_local_tensor()


def _fsdp2_checkpoint(name: str) -> Callable[[], List[Replacement]]:
    def build() -> List[Replacement]:
        from megatron_puffin.training import fsdp2_checkpoint

        return fsdp2_checkpoint.REPLACEMENTS[name]()

    return build


PATCHES: Tuple[MegatronPatch, ...] = (
    MegatronPatch(
        "CUDA_RNG",
        "the model-parallel RNG tracker keeps CUDA generator states (torch.cuda.get_rng_state); replaced by a "
        "tracker with the same fork semantics over CPU generator states",
        _without_cuda, _cpu("CUDA_RNG"),
    ),
    MegatronPatch(
        "CURRENT_DEVICE",
        "torch.cuda.current_device() is the device= of megatron-core's buffers (DDP's grad buffers, the "
        "dist-checkpoint saver's failure flag); it returns the CPU device",
        _without_cuda, _cpu("CURRENT_DEVICE"),
    ),
    MegatronPatch(
        "SYNCHRONIZE",
        "torch.cuda.synchronize() follows every batched pipeline send/receive; a no-op without CUDA",
        _without_cuda, _cpu("SYNCHRONIZE"),
    ),
    MegatronPatch(
        "CUDA_FACTORIES",
        "modules that build tensors with a literal device 'cuda' (default causal mask, pipeline schedules, "
        "dist-checkpoint saver and exchange, optimizers, grad clipping, grad buffers, utils) see a torch whose "
        "tensor factories map 'cuda' to 'cpu'",
        _without_cuda, _cpu("CUDA_FACTORIES"),
    ),
    MegatronPatch(
        "TENSOR_CUDA",
        "Tensor.cuda() moves tensors (dist-checkpoint exchange, the distributed optimizer's gathers); it returns "
        "the tensor itself",
        _without_cuda, _cpu("TENSOR_CUDA"),
    ),
    MegatronPatch(
        "PARAM_TYPE",
        "the (distributed) optimizer accepts parameters, and gradient clipping gradients, only by a "
        "'torch.cuda.*Tensor' type() string; while they build parameter groups or clip, CPU tensors report the "
        "CUDA name",
        _without_cuda, _cpu("PARAM_TYPE"),
    ),
    MegatronPatch(
        "FSDP2_MESH",
        "megatron-core's TorchFullyShardedDataParallel builds its device mesh with the literal device type 'cuda' "
        "(DeviceMesh.from_group(group, 'cuda')) and FSDP2 places the shards there; it gets a DeviceMesh whose "
        "from_group builds a CPU mesh (FSDP2 itself runs on CPU with gloo)",
        _without_cuda, _cpu("FSDP2_MESH"),
    ),
    MegatronPatch(
        "DISTOPT_TORCH_ADAM_STEP",
        "with torch's Adam (no Apex / Transformer Engine), DistributedOptimizer.load_state_dict gives every Adam "
        "state one shared 'step' tensor and then copies every state key from checkpoint tensors that hold no "
        "'step' (KeyError: 'step'); each state gets its own copy of the step instead",
        _without_apex_or_te, _distributed_optimizer("DISTOPT_TORCH_ADAM_STEP"),
    ),
    MegatronPatch(
        "DISTOPT_FULLY_RESHARDABLE_BUCKETS",
        "the fully_reshardable optimizer format slices the gathered state at padded-buffer positions but gathers "
        "it without the padding between buckets, so every parameter after a buffer's first bucket is saved from "
        "the wrong offset; the gathered state is laid out in padded-buffer coordinates during that call",
        _always, _distributed_optimizer("DISTOPT_FULLY_RESHARDABLE_BUCKETS"),
    ),
    MegatronPatch(
        "FSDP2_OPTIMIZER_LOCAL_TENSOR",
        "saving the optimizer of an FSDP2 model maps its parameters through DTensor.to_local(), which in torch 2.13 "
        "returns a new alias, while the model's sharded tensors hold _local_tensor: no parameter matched ('Param id "
        "0 does not match any model sharded param'); both sides use _local_tensor (plain tensors unchanged)",
        _always, _fsdp2_optimizer_local_tensor,
    ),
    MegatronPatch(
        "FSDP2_CHECKPOINT_SHARDS",
        "make_(tp_)sharded_tensor_for_checkpoint record an FSDP2 (DTensor) parameter's local slice as chunk dp_rank "
        "of dp equal chunks of dim 0, but FSDP2 splits dim 0 as torch.chunk does: a parameter with fewer rows than "
        "DP, or rows not a multiple of DP, is recorded with a wrong global shape (RADIO's [1, 36, 16] position "
        "embedding as [2, 36, 16] at DP 2) and the checkpoint loads at no other layout; the slice each rank holds "
        "is recorded at its real offset in the parameter's real shape (plain tensors unchanged)",
        _always, _fsdp2_checkpoint("FSDP2_CHECKPOINT_SHARDS"),
    ),
    MegatronPatch(
        "FSDP2_SWIGLU_SHARDS",
        "apply_swiglu_sharded_factory stores a gated linear unit's fc1 [W; V] as all W rows then all V rows by "
        "halving each rank's tensor, right for a tensor-parallel slice [W_i; V_i] but not for an FSDP2 slice (a "
        "run of rows of [W; V]): the rows are stored permuted and load wrong at any other layout; an FSDP2 slice "
        "is split where it crosses from W to V rows instead (other tensors unchanged)",
        _always, _fsdp2_checkpoint("FSDP2_SWIGLU_SHARDS"),
    ),
    MegatronPatch(
        "ROW_PARALLEL_TP_GROUP",
        "RowParallelLinear.forward hands its linear function tp_group=None although the layer holds its group, "
        "so every forward goes through get_tensor_model_parallel_group_if_none, which calls warnings.warn on "
        "rank 0: torch.compile cannot trace that call and breaks the graph inside every row-parallel linear of "
        "every compiled layer (--compile); the layer's own group is passed instead",
        _always, _row_parallel_tp_group,
    ),
    MegatronPatch(
        "ROPE_COS_SIN_ONCE",
        "SelfAttention's unfused RoPE recomputes cos/sin of the same angles for the query and the key of every "
        "layer, multiplies them by mscale 1.0 and copies the result (torch.cat with an empty pass-through part; "
        "its backward zero-fills and copies again), and megatron-core rejects precomputed rotary_pos_cos/sin "
        "outside inference; the replacement computes cos/sin once per angle tensor (once per forward) and skips "
        "the copy, bit-identical; other RoPE variants go to megatron-core's function",
        _always, _rope_cos_sin_once,
    ),
    MegatronPatch(
        "PLAIN_LINEAR_AT_TP1",
        "at tensor-parallel size 1 ColumnParallelLinear / RowParallelLinear still run two identity autograd "
        "functions (the region copy and reduce), their own Python autograd function for the product behind autocast "
        "wrappers and a separate bias add: about 245 us more host time per forward + backward than nn.Linear, "
        "which an eager GPU step at small micro-batches waits on; a call that is the product and the bias alone "
        "(TP 1, no sequence parallelism, no fused weight-gradient accumulation, no deferred weight gradients, no "
        "offloading) is F.linear, also in torch.compile's graphs; every other call megatron-core's forward",
        _always, _plain_linear_at_tp1,
    ),
    MegatronPatch(
        "CPU_WGRAD_ACCUMULATION",
        "gradient_accumulation_fusion (the weight-gradient GEMM accumulating into main_grad instead of a new "
        "tensor that the DDP hook then adds) needs apex's CUDA module fused_weight_gradient_mlp_cuda, and the "
        "linear layers refuse the flag without it; on CPU the module is replaced by main_grad.addmm_(grad_output.t(), "
        "input) (training.wgrad_accumulation switches the DDP-wrapped layers to it)",
        _without_cuda_or_apex_wgrad, _cpu_wgrad_accumulation,
    ),
    MegatronPatch(
        "SAVE_QUEUE_LIFETIME",
        "dist_checkpointing.save starts a multiprocessing.Manager process (the write-results queue) at a rank's "
        "first save and keeps it; it sits in the rank's process group with default signal handling, so the group-"
        "wide SIGTERM of torchrun or Slurm killed it and the rank's interrupt checkpoint then failed with "
        "BrokenPipeError, and a rank killed with SIGKILL left it running forever; the same queue's process "
        "ignores the stop signals and dies with its rank (PR_SET_PDEATHSIG)",
        _always, _save_queue_lifetime,
    ),
)


def setup() -> List[str]:
    """Apply every patch this process needs, once (later calls do nothing).

    Returns:
        The names of the applied patches.
    """
    if apply(PATCHES):
        logger.info("megatron-core patches applied: %s", ", ".join(applied()) or "none needed")
    return applied()
