"""Padding the vision tower's token rows to the multiple FP8 GEMMs need, with a key-padding mask.

A ViT micro-batch is ``b`` images of one size, each ``class_token_len + (H/p)(W/p)`` tokens (e.g. 4 + 1024), so the
GEMMs see ``b * s`` rows, rarely a multiple of 16. Every row (image) gets the same number of zero tokens appended
until ``b * s`` is a multiple; a ``[b, 1, 1, s']`` key mask (True = pad, at the end of each row) keeps every real
token from attending to them. Norms and MLPs act per token, so the real tokens' outputs and gradients are those of
the unpadded computation; the pads' own outputs are dropped. The mask has the layout Transformer Engine's
``padding`` mask type means (megatron-core passes it on; TE turns it into per-row lengths), and the local spec's
SDPA takes it as a broadcast key mask.

megatron-core's ``SelfAttention`` hands its core attention the mask type it was built with, so
:class:`KeyPaddedSelfAttention` picks it per call from the mask it is given: ``no_mask`` (fused kernels, nothing
padded) or ``padding``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec


class KeyPaddedSelfAttention(SelfAttention):
    """megatron-core's ``SelfAttention`` whose core attention runs ``no_mask`` without a mask and ``padding`` with a
    ``[b, 1, 1, s]`` key-padding mask (True = padded key, only at the end of a row). Same parameters and
    checkpoint names as ``SelfAttention``."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *args, **kwargs):
        """``SelfAttention.forward`` with the mask type following ``attention_mask``."""
        # Attention.forward reads self.attn_mask_type when it calls the core attention (it is not an argument);
        # a recomputed forward sees the same mask, hence the same type.
        self.attn_mask_type = AttnMaskType.no_mask if attention_mask is None else AttnMaskType.padding
        return super().forward(hidden_states, attention_mask, *args, **kwargs)


def with_key_padded_attention(layer_spec: ModuleSpec) -> ModuleSpec:
    """A copy of a ``TransformerLayer`` spec whose self-attention is :class:`KeyPaddedSelfAttention` (the core
    attention, linears and norms stay the spec's own)."""
    attention = dataclasses.replace(layer_spec.submodules.self_attention, module=KeyPaddedSelfAttention)
    submodules = dataclasses.replace(layer_spec.submodules, self_attention=attention)
    return dataclasses.replace(layer_spec, submodules=submodules)


def padded_sequence_length(seq_length: int, batch_size: int, row_multiple: int) -> int:
    """The smallest ``s' >= seq_length`` with ``batch_size * s'`` a multiple of ``row_multiple`` (<= 1: unchanged).

    Padding each row to ``row_multiple / gcd(batch_size, row_multiple)`` suffices, e.g. 16 images need no padding.
    """
    if row_multiple <= 1:
        return seq_length
    step = row_multiple // math.gcd(batch_size, row_multiple)
    return -(-seq_length // step) * step


def pad_token_rows(
    tokens: torch.Tensor, row_multiple: int, shards: int = 1
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Append zero tokens to every row so the row count is a multiple of ``row_multiple``.

    Args:
        tokens: ``[b, s, h]``.
        row_multiple: what ``b * s'`` (``b * s' / shards`` when sharded) must be a multiple of (1: nothing to do).
        shards: ``s'`` is also a multiple of this (the sequence-parallel split over TP; 1: unsharded).

    Returns:
        ``([b, s', h] tokens, [b, 1, 1, s'] bool key mask, True = pad)``; the mask is None when ``s' == s``.
    """
    batch, seq, hidden = tokens.shape
    padded_len = shards * padded_sequence_length(-(-seq // shards), batch, row_multiple)
    if padded_len == seq:
        return tokens, None
    padded = torch.cat([tokens, tokens.new_zeros(batch, padded_len - seq, hidden)], dim=1)
    mask = torch.arange(padded_len, device=tokens.device) >= seq
    return padded, mask.view(1, 1, 1, padded_len).expand(batch, 1, 1, padded_len).contiguous()


def pad_rows_to_multiple(rows: torch.Tensor, row_multiple: int) -> torch.Tensor:
    """``[n, ...] -> [n', ...]``: zero rows appended until ``n'`` is a multiple of ``row_multiple``, for token-wise
    layers such as the projector where no mask is needed (slice ``[:n]`` after)."""
    extra = padded_sequence_length(rows.shape[0], 1, row_multiple) - rows.shape[0]
    return rows if extra == 0 else torch.cat([rows, rows.new_zeros(extra, *rows.shape[1:])])
