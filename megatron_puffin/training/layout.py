"""The parallel layout, parameter counts and a memory estimate of a configuration, computed from the flags
alone (no process group, no model), for ``pretrain_puffin.py --dry-run``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from megatron_puffin.models.llm.config import LLMConfig

# Bytes per parameter: bf16 weight + fp32 main grad + fp32 master weight + Adam moments (2 x fp32).
BYTES_WEIGHT_BF16, BYTES_GRAD_FP32, BYTES_MASTER_FP32, BYTES_ADAM_FP32 = 2, 4, 4, 8


def llm_parameter_count(config: LLMConfig) -> int:
    """Exact parameter count of the LLM tower (unpadded vocabulary)."""
    h, d, f = config.hidden_size, config.head_dim, config.ffn_hidden_size
    qkv_rows = (config.num_attention_heads + 2 * config.num_query_groups) * d
    per_layer = qkv_rows * h + (qkv_rows if config.add_qkv_bias else 0)
    per_layer += config.num_attention_heads * d * h + 3 * f * h + 2 * h
    total = config.vocab_size * h + config.num_layers * per_layer + h
    return total + (0 if config.tie_word_embeddings else config.vocab_size * h)


@dataclass
class TowerCount:
    name: str
    parameters: int
    trainable: bool


def towers(args) -> List[TowerCount]:
    """Parameter counts per tower that this configuration builds."""
    return [TowerCount("llm", llm_parameter_count(args.llm), True)]


def memory_estimate_gib(args, counts: List[TowerCount]) -> Dict[str, float]:
    """Per-GPU memory of weights, gradients and optimizer state (activations excluded), in GiB."""
    model_parallel = args.parallel.tensor_model_parallel_size * args.parallel.pipeline_model_parallel_size
    dp = args.data_parallel_size
    weight_bytes = 2 if (args.precision.bf16 or args.precision.fp16) else 4
    trainable = sum(t.parameters for t in counts if t.trainable) / model_parallel
    frozen = sum(t.parameters for t in counts if not t.trainable) / model_parallel
    state = BYTES_MASTER_FP32 + BYTES_ADAM_FP32 if weight_bytes == 2 else BYTES_ADAM_FP32
    if args.parallel.use_distributed_optimizer:
        state = state / dp
    gib = 1024**3
    return {
        "weights": (trainable + frozen) * weight_bytes / gib,
        "gradients": trainable * BYTES_GRAD_FP32 / gib,
        "optimizer": trainable * state / gib,
    }


def describe(args) -> str:
    """A human-readable summary of layout, parameter counts and memory."""
    p = args.parallel
    counts = towers(args)
    memory = memory_estimate_gib(args, counts)
    lines = [
        f"world size {args.world_size} = TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} "
        f"x DP {args.data_parallel_size}",
        f"LLM layers per pipeline stage: {args.llm.num_layers // p.pipeline_model_parallel_size}",
    ]
    for tower in counts:
        state = "trainable" if tower.trainable else "frozen"
        lines.append(f"  {tower.name:<12} {tower.parameters / 1e6:>10.2f} M parameters ({state})")
    lines.append(
        "memory per GPU (weights + gradients + optimizer, activations excluded): "
        + ", ".join(f"{k} {v:.2f} GiB" for k, v in memory.items())
        + f", total {sum(memory.values()):.2f} GiB"
    )
    return "\n".join(lines)
