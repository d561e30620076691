"""AdamW over trainable parameters only, through megatron-core's optimizer (docs/puffin.md §5.2)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List

import torch

from megatron_puffin.patching import Replacement, require_setup

if TYPE_CHECKING:  # for annotations only
    from megatron_puffin.config import PrecisionConfig, TrainingConfig


def build_optimizer(model_chunks: List[torch.nn.Module], training: TrainingConfig, precision: PrecisionConfig,
                    use_distributed_optimizer: bool = False):
    """megatron-core's AdamW (decoupled decay) with Puffin's groups: weight decay on tensors of two or more
    dimensions (matrices, embeddings, conv kernels, meta queries), none on biases and norm gains; frozen parameters
    (``requires_grad=False``) get no state at all. ``--distributed-optimizer`` shards the state over DP (ZeRO-1);
    its checkpoints rely on two megatron-core fixes applied by :func:`megatron_puffin.platform.setup`.

    Args:
        model_chunks: the DDP-wrapped model chunks of this rank.
        training: :class:`~megatron_puffin.config.TrainingConfig` (lr, betas, eps, weight decay, clipping).
        precision: :class:`~megatron_puffin.config.PrecisionConfig` (bf16/fp16 master weights).
        use_distributed_optimizer: shard optimizer state over data-parallel ranks.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=training.lr,
        min_lr=training.min_lr,
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        adam_eps=training.adam_eps,
        clip_grad=training.clip_grad,
        bf16=precision.bf16,
        fp16=precision.fp16,
        params_dtype=torch.bfloat16 if precision.bf16 else torch.float16 if precision.fp16 else torch.float32,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    if use_distributed_optimizer:  # its checkpoints need the DISTOPT_* patches of megatron_puffin.platform
        require_setup("build_optimizer(use_distributed_optimizer=True)")
    # megatron-core's default no-decay rule: biases and 1-D tensors (norm gains), i.e. ndim < 2.
    return get_megatron_optimizer(config, model_chunks)


def _torch_adam_step() -> List[Replacement]:
    """Work around megatron-core 0.16.1's DistributedOptimizer loading with torch's Adam (no Apex / Transformer
    Engine, e.g. on CPU): ``load_state_dict`` gives every Adam state a ``step`` entry, then
    ``_set_main_param_and_optimizer_states`` copies *every* state entry from the checkpoint's per-parameter tensors,
    which hold only ``param``, ``exp_avg`` and ``exp_avg_sq`` (KeyError: 'step'). The step count itself is restored
    from the checkpoint's common part, but as ONE tensor shared by all parameters' states, which torch's Adam
    increments in place once per parameter (wrong bias correction after a resume). This gives every state its own
    copy of the step and hands the per-parameter copy that step.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        if "step" in state and "step" not in tensors:
            state["step"] = state["step"].clone()
            tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    return [(DistributedOptimizer, "_set_main_param_and_optimizer_states", set_states)]


def _fully_reshardable_buckets() -> List[Replacement]:
    """Work around megatron-core 0.16.1 saving wrong optimizer state for every parameter after the first bucket of
    a gradient buffer in the ``fully_reshardable`` format (with the distributed optimizer, the shared embedding
    of a pipeline-parallel model always has its own bucket, so its fp32 main weight and Adam moments were saved
    from the wrong place, and a resume changed the weights; a bucket split by size does the same).

    ``get_parameter_state_dp_zero`` concatenates the buckets without the padding between them, while
    ``sharded_param_state_fully_reshardable`` slices that result at each parameter's position *in the padded
    buffer* (``param_index_map``). During that call this hands it the same tensors laid out in padded buffer
    coordinates, so every slice is the parameter's own state (loading slices per parameter and was right).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.sharded_param_state_fully_reshardable

    def sharded(self, *args, **kwargs):
        # get_parameter_state_dp_zero is replaced only during the fully_reshardable call (other formats use its
        # compact layout on purpose).
        compact_state = self.get_parameter_state_dp_zero
        self.get_parameter_state_dp_zero = lambda *a, **k: _to_buffer_coordinates(self, compact_state(*a, **k))
        try:
            return original(self, *args, **kwargs)
        finally:
            del self.get_parameter_state_dp_zero  # the class's method again

    return [(DistributedOptimizer, "sharded_param_state_fully_reshardable", sharded)]


# The builders megatron_puffin.platform's table names; each returns (owner, attribute, replacement) triples.
REPLACEMENTS: Dict[str, Callable[[], List[Replacement]]] = {
    "DISTOPT_TORCH_ADAM_STEP": _torch_adam_step,
    "DISTOPT_FULLY_RESHARDABLE_BUCKETS": _fully_reshardable_buckets,
}


def _to_buffer_coordinates(optimizer, state):
    """``get_parameter_state_dp_zero``'s world tensors (buckets concatenated without padding) re-laid in the
    padded coordinates of each gradient buffer (bucket ``b`` starts at ``bucket_indices[b][0]``)."""
    if state is None:
        return None
    for gbuf_idx, buffer in enumerate(optimizer.buffers):
        for dtype, world_tensors in state[gbuf_idx].items():
            for key in ("param", "exp_avg", "exp_avg_sq"):
                compact = world_tensors.get(key)
                if compact is None:
                    continue
                padded = torch.zeros((buffer.numel,), dtype=compact.dtype, device=compact.device)
                offset = 0
                for bucket, (start, _) in zip(buffer.buckets, buffer.bucket_indices):
                    padded[start:start + bucket.numel_unpadded] = compact[offset:offset + bucket.numel_unpadded]
                    offset += bucket.numel_unpadded
                world_tensors[key] = padded
    return state
