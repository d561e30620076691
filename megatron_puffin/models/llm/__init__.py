"""The Qwen2.5 LLM tower on megatron-core."""
from megatron_puffin.models.llm.config import LLMConfig
from megatron_puffin.models.llm.llm_layer_specs import get_llm_layer_spec
from megatron_puffin.models.llm.model import (
    PuffinLLM,
    build_attention_mask,
    build_llm,
    shift_labels,
    vocab_parallel_token_losses,
)
from megatron_puffin.models.llm.padding import (
    RightPadding,
    gather_positions,
    is_right_padded,
    pad_sequences_to_multiple,
)

__all__ = [
    "LLMConfig",
    "PuffinLLM",
    "RightPadding",
    "build_attention_mask",
    "build_llm",
    "gather_positions",
    "is_right_padded",
    "pad_sequences_to_multiple",
    "get_llm_layer_spec",
    "shift_labels",
    "vocab_parallel_token_losses",
]
