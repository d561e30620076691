"""Tiny Qwen2 configurations and batches shared by the LLM tests."""
from __future__ import annotations

import torch

from megatron_puffin.models.llm import LLMConfig


def tiny_llm_config(tied: bool = True, **overrides) -> LLMConfig:
    """A 6:1 query-to-KV-head ratio as in Qwen2.5 (12 heads, 2 KV heads), at toy size."""
    values = dict(
        num_layers=4,
        hidden_size=96,
        ffn_hidden_size=160,
        num_attention_heads=6,
        num_query_groups=1,
        kv_channels=16,
        vocab_size=250,
        max_position_embeddings=128,
        rotary_base=1000000.0,
        norm_epsilon=1e-6,
        tie_word_embeddings=tied,
    )
    values.update(overrides)
    return LLMConfig(**values)


def hf_qwen2(config: LLMConfig, seed: int = 0):
    """A randomly initialised transformers ``Qwen2ForCausalLM`` (fp32, eager attention) of this config."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    hf_config = Qwen2Config(**config.to_hf(), attn_implementation="eager")
    model = Qwen2ForCausalLM(hf_config).eval()
    with torch.no_grad():  # make norms non-trivial so a mix-up of norm weights is visible
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
    return model


def left_padded_batch(vocab_size: int, lengths, seq_length: int, seed: int = 1):
    """Token ids, padding mask (True = real) and HF-style position ids for a left-padded batch."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    input_ids = torch.randint(0, vocab_size, (batch, seq_length), generator=generator)
    mask = torch.zeros(batch, seq_length, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, seq_length - length:] = True
    input_ids = input_ids.masked_fill(~mask, 0)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    labels = input_ids.masked_fill(~mask, -100)
    return input_ids, mask, position_ids, labels
