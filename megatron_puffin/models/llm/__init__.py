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

__all__ = [
    "LLMConfig",
    "PuffinLLM",
    "build_attention_mask",
    "build_llm",
    "get_llm_layer_spec",
    "shift_labels",
    "vocab_parallel_token_losses",
]
