"""Local core attention shared by every tower: torch's ``scaled_dot_product_attention`` behind megatron-core's
core-attention interface. Tensors are sequence-first as in megatron-core: ``[s, b, np, hn]`` heads."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPADotProductAttention(MegatronModule):
    """Local core attention: torch's ``scaled_dot_product_attention`` behind megatron-core's core-attention
    interface (the same constructor and forward as ``TEDotProductAttention``), so specs can swap them.

    Never materialises a score mask: with ``AttnMaskType.no_mask`` SDPA runs unmasked (flash/efficient kernels);
    with ``AttnMaskType.padding`` it gets a broadcast ``[b, 1, 1, s]`` key mask.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.no_mask,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        **unused,
    ) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        **unused,
    ) -> torch.Tensor:
        """
        Args:
            query, key, value: ``[s, b, np, hn]``.
            attention_mask: ``[b, 1, 1, s]`` bool, True = masked-out key (megatron convention), or None.
            attn_mask_type: ``no_mask`` or ``padding``.

        Returns:
            ``[s, b, np * hn]``.
        """
        seq, batch, heads, head_dim = query.shape
        allowed = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3),
            key.permute(1, 2, 0, 3),
            value.permute(1, 2, 0, 3),
            attn_mask=allowed,
            dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale,
        )  # [b, np, s, hn]
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * head_dim)
