"""Joint (MMDiT) attention on megatron-core tensor-parallel layers.

Both streams (image tokens, text tokens) have their own q/k/v projections, column-parallel by heads, so each
tensor-parallel rank holds ``heads / TP`` heads of both streams. Per rank, the two streams' heads are
concatenated along the sequence as ``[text ; image]`` and attend jointly; the result is split back and each stream
goes through its own row-parallel output projection (one all-reduce per stream). Joint attention has no positional
term, so the order of the concatenation changes nothing but where padding sits: the image stream is the only
padded one (mixed latent sizes), and text-first puts every sample's pads at the end of its joint sequence, the
layout fused kernels' padding masks mean (Transformer Engine turns a ``padding`` mask into per-sample lengths; an
``[image + pad ; text]`` order would make it drop the last text tokens and attend to padded image slots).
Parameter names mirror diffusers' ``Attention`` in SD3 (``to_q``, ``add_q_proj``, ``to_out.0``, ``to_add_out``...).

The last block (``context_pre_only``) keeps only image-stream outputs, and the model reads only each sample's
target tokens from it. Attention is independent per query, so with the local core attention that block makes
queries for the image stream's target prefix only (``query_tokens``) and none for the text stream, while every
token still makes keys and values: the outputs it keeps are the ones computed from all queries, and the discarded
ones are never computed (at real proportions, image2image's last block attends with 1,024 of 3,136 queries).
``add_q_proj`` of that block stays (diffusers' checkpoints carry it) and gets no gradient, as its outputs never
reached the loss. The Transformer Engine spec computes every query (its padding masks for unequal query and key
lengths are untested here) and returns the full stream.

Tensors are sequence-first as in megatron-core: ``[s, b, h]`` hidden states, ``[s, b, np, hn]`` heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_puffin.models.common.attention import SDPADotProductAttention
from megatron_puffin.models.dit.parallel_utils import ShardedModuleList


@dataclass
class JointAttentionSubmodules:
    """Layers of :class:`JointAttention`: one spec for every q/k/v projection, the core attention, and one for
    both output projections."""

    linear_qkv: Union[ModuleSpec, type]
    core_attention: Union[ModuleSpec, type]
    linear_proj: Union[ModuleSpec, type]


class JointAttention(MegatronModule):
    """SD3 joint attention of one block (see module docstring).

    Args:
        config: megatron-core config (hidden size, heads, TP size, init methods).
        submodules: the layer classes / specs.
        layer_number: 1-based block index (for the core attention).
        context_pre_only: last block: the text stream feeds keys/values but produces no output.
        pg_collection: the process groups (the projections split by heads over ``pg_collection.tp``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: JointAttentionSubmodules,
        layer_number: int,
        context_pre_only: bool = False,
        *,
        pg_collection: ProcessGroupCollection,
    ) -> None:
        super().__init__(config=config)
        self.context_pre_only = context_pre_only
        self.tp_group = pg_collection.tp
        hidden = config.hidden_size
        self.head_dim = config.kv_channels
        tp = config.tensor_model_parallel_size
        self.heads_per_partition = config.num_attention_heads // tp
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            setattr(self, name, self._column(submodules.linear_qkv, hidden, hidden, name))
        self.core_attention = build_module(
            submodules.core_attention,
            config=config,
            layer_number=layer_number,
            attn_mask_type=AttnMaskType.no_mask,
            attention_type="self",
            pg_collection=pg_collection,
        )
        self.to_out = ShardedModuleList([self._row(submodules.linear_proj, hidden, hidden, "proj")])
        self.to_add_out = None if context_pre_only else self._row(submodules.linear_proj, hidden, hidden, "proj")
        # Local attention takes queries and keys of unequal lengths with a key-padding mask (see module docstring).
        self.image_queries_only = context_pre_only and isinstance(self.core_attention, SDPADotProductAttention)

    def _column(self, spec, in_size: int, out_size: int, name: str):
        return build_module(
            spec, in_size, out_size, config=self.config, init_method=self.config.init_method,
            gather_output=False, bias=True, skip_bias_add=False, is_expert=False, tp_comm_buffer_name=name,
            tp_group=self.tp_group,
        )

    def _row(self, spec, in_size: int, out_size: int, name: str):
        return build_module(
            spec, in_size, out_size, config=self.config, init_method=self.config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False, is_expert=False, tp_comm_buffer_name=name,
            tp_group=self.tp_group,
        )

    def _heads(self, layer, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[s, b, h] -> [s, b, np, hn]`` through a column-parallel projection."""
        projected, _ = layer(hidden_states)
        return projected.view(*projected.shape[:2], self.heads_per_partition, self.head_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        query_tokens: Optional[int] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """
        Args:
            hidden_states: ``[L, b, h]`` normalised image-stream tokens.
            encoder_hidden_states: ``[T, b, h]`` normalised text-stream tokens.
            attention_mask: ``[b, 1, 1, T + L]`` bool over the joint ``[text ; image]`` keys, True = padded key
                (only at the end of a row); None when nothing is padded.
            query_tokens: last block only: the image-stream outputs needed are its first ``query_tokens``
                positions (None: all ``L``).

        Returns:
            ``([L, b, h] image output, [T, b, h] text output or None when context_pre_only)``; with local attention
            the last block's image output has only the ``query_tokens`` rows.
        """
        if self.image_queries_only:  # queries from the image stream's first query_tokens positions only
            queries = hidden_states if query_tokens is None else hidden_states[:query_tokens]
            context = self._attend(self._heads(self.to_q, queries), hidden_states, encoder_hidden_states,
                                   attention_mask)
            image_out, _ = self.to_out[0](context)
            return image_out, None
        text_query = self._heads(self.add_q_proj, encoder_hidden_states)
        text_len = text_query.shape[0]  # whole: under sequence parallelism the inputs are shards, the heads are not
        query = torch.cat([text_query, self._heads(self.to_q, hidden_states)])
        context = self._attend(query, hidden_states, encoder_hidden_states, attention_mask)  # [T+L, b, hp]
        image_out, _ = self.to_out[0](context[text_len:])
        if self.context_pre_only:
            return image_out, None
        text_out, _ = self.to_add_out(context[:text_len])
        return image_out, text_out

    def _attend(
        self,
        query: torch.Tensor,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """``query`` heads attending to keys and values of every ``[text ; image]`` token: ``[len(query), b, hp]``."""
        key = torch.cat([self._heads(self.add_k_proj, encoder_hidden_states), self._heads(self.to_k, hidden_states)])
        value = torch.cat([self._heads(self.add_v_proj, encoder_hidden_states), self._heads(self.to_v, hidden_states)])
        mask_type = AttnMaskType.no_mask if attention_mask is None else AttnMaskType.padding
        return self.core_attention(query, key, value, attention_mask, attn_mask_type=mask_type)
