"""AdamW over trainable parameters only, through megatron-core's optimizer (spec §5.2)."""
from __future__ import annotations

from typing import List

import torch


def build_optimizer(model_chunks: List[torch.nn.Module], training, precision, use_distributed_optimizer: bool = False):
    """megatron-core's AdamW (decoupled decay) with Puffin's groups: weight decay on tensors of two or more
    dimensions (matrices, embeddings, conv kernels, meta queries), none on biases and norm gains; frozen parameters
    (``requires_grad=False``) get no state at all. ``--distributed-optimizer`` shards the state over DP (ZeRO-1).

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
    # megatron-core's default no-decay rule: biases and 1-D tensors (norm gains), i.e. ndim < 2.
    return get_megatron_optimizer(config, model_chunks)
