"""Rotary position embedding of the LLM's attention without megatron-core's per-layer recomputation and copy.

megatron-core 0.16.1's unfused RoPE (``rope_utils._apply_rotary_pos_emb_bshd``, called by ``SelfAttention`` for the
query and the key of every layer) computes ``cos(freqs) * mscale`` and ``sin(freqs) * mscale`` on every call and
ends with ``torch.cat((t, t_pass), dim=-1)``, a full copy of the query / key even when RoPE covers the whole head
(``t_pass`` empty), whose backward is a slice backward (a zero-filled tensor plus a copy). Its
``rotary_pos_cos`` / ``rotary_pos_sin`` arguments, which would pass precomputed tables, are rejected outside
inference (``assert rotary_pos_cos is None``).

:func:`apply_rotary_pos_emb` is the replacement of ``megatron.core.transformer.attention.apply_rotary_pos_emb``
(patch ``ROPE_COS_SIN_ONCE`` of :mod:`megatron_puffin.platform`): in the plain case (no packed sequences, no
fusion, not interleaved, no multi-latent attention, ``mscale`` 1, RoPE over the whole head) it returns
``t * cos + rotate_half(t) * sin`` with ``cos``/``sin`` computed once per ``freqs`` tensor, i.e. once per forward
(``PuffinLLM`` builds one ``freqs`` tensor for all layers, and megatron-core hands the same one to query and key),
and without the copy; every other case goes to megatron-core's function. The values are those of megatron-core's
function bit for bit (``x * 1.0`` is ``x``; the copy changes nothing): ``tests/unit/test_megatron_speed_patches.py``.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from megatron.core.models.common.embeddings import rope_utils

_CACHE_ATTRIBUTE = "_puffin_rope_cos_sin"


def _cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``cos(freqs)``, ``sin(freqs)`` in ``dtype``, kept on the ``freqs`` tensor itself (freed with it); computed
    afresh inside a compiled region, where inductor fuses them and attributes cannot be set."""
    if torch.compiler.is_compiling():
        return torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
    cache: Dict[torch.dtype, Tuple[torch.Tensor, torch.Tensor]] = getattr(freqs, _CACHE_ATTRIBUTE, None) or {}
    if dtype not in cache:
        cache[dtype] = (torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype))
        setattr(freqs, _CACHE_ATTRIBUTE, cache)
    return cache[dtype]


def is_plain_rope(t: torch.Tensor, freqs: torch.Tensor, config, cu_seqlens, mscale: float) -> bool:
    """Whether megatron-core would take its unfused ``bshd`` path with RoPE over the whole head and no scaling."""
    return (
        cu_seqlens is None
        and not config.apply_rope_fusion
        and not config.rotary_interleaved
        and not config.multi_latent_attention
        and mscale == 1.0
        and freqs.shape[-1] == t.shape[-1]
        and not freqs.requires_grad
    )


def make_apply_rotary_pos_emb(original: Callable) -> Callable:
    """The replacement of megatron-core's ``apply_rotary_pos_emb`` (same signature), falling back to ``original``."""

    def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale: float = 1.0, cp_group=None):
        if not is_plain_rope(t, freqs, config, cu_seqlens, mscale):
            return original(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)
        cos, sin = _cos_sin(freqs, t.dtype)
        return (t * cos) + (rope_utils._rotate_half(t, False) * sin)

    apply_rotary_pos_emb.original = original
    return apply_rotary_pos_emb
