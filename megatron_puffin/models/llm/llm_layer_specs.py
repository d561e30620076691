"""Layer specs of the LLM tower: a Transformer Engine variant and a local (pure torch) variant of the same
Qwen2 decoder layer (RMSNorm, grouped-query self-attention with q/k/v bias, SwiGLU MLP)."""
from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from typing import Optional

import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_puffin.models.common.attention import SDPADotProductAttention
from megatron_puffin.models.llm.swiglu import SwiGLU
from megatron_puffin.models.sequence_parallel import LocalNorm

from megatron_puffin.optional_deps import require_transformer_engine

TRANSFORMER_IMPLS = ("local", "transformer_engine")


class SDPACausalAttention(SDPADotProductAttention):
    """The LLM's local core attention: torch's ``scaled_dot_product_attention`` (fused CPU/GPU kernels) instead of
    megatron-core's unfused ``DotProductAttention`` (explicit score matrix, softmax module, repeated K/V heads).

    Causal without a mask tensor when nothing is padded; otherwise the ``[b, 1, s, s]`` boolean mask of
    :func:`~.model.build_attention_mask` (True = masked). Grouped-query heads are read in place (``enable_gqa``).
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, **unused):
        seq, batch, heads, head_dim = query.shape
        out = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3),
            key.permute(1, 2, 0, 3),
            value.permute(1, 2, 0, 3),
            attn_mask=None if attention_mask is None else ~attention_mask,
            is_causal=attention_mask is None,
            dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale,
            enable_gqa=key.shape[2] != heads,
        )  # [b, np, s, hn]
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * head_dim)


def get_llm_layer_local_spec() -> ModuleSpec:
    """Pure-torch decoder layer: megatron-core's local layer with torch RMSNorm (:class:`LocalNorm`, which also
    runs under sequence parallelism), SDPA core attention and the copy-free :class:`~.swiglu.SwiGLU` (used when
    the config's ``use_te_activation_func`` is set, :func:`~.swiglu.use_local_swiglu`; else megatron-core's GLU)."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = LocalNorm
    spec.submodules.pre_mlp_layernorm = LocalNorm
    spec.submodules.self_attention.submodules.core_attention = SDPACausalAttention
    spec.submodules.mlp.submodules.activation_func = SwiGLU
    return spec


def llm_transformer_engine_layer_spec() -> ModuleSpec:
    """The Transformer Engine decoder layer spec itself (no availability check; the spec only names classes).

    megatron-core 0.16.1's ``get_gpt_layer_with_transformer_engine_spec`` takes no ``normalization``: its fused
    ``TELayerNormColumnParallelLinear`` reads ``TransformerConfig.normalization`` ("RMSNorm") at build time, and its
    attention is ``causal``, exact for right-padded rows (:mod:`.padding`).
    """
    return get_gpt_layer_with_transformer_engine_spec()


def get_llm_layer_with_transformer_engine_spec() -> ModuleSpec:
    """Transformer Engine decoder layer (fused norm + linear, TE attention, FP8-capable linears)."""
    require_transformer_engine("--transformer-impl transformer_engine")
    return llm_transformer_engine_layer_spec()


def get_llm_layer_spec(transformer_impl: str = "local") -> ModuleSpec:
    """The decoder layer spec for ``--transformer-impl``."""
    if transformer_impl == "local":
        return get_llm_layer_local_spec()
    if transformer_impl == "transformer_engine":
        return get_llm_layer_with_transformer_engine_spec()
    raise ValueError(f"--transformer-impl ({transformer_impl}) must be one of {', '.join(TRANSFORMER_IMPLS)}")


def llm_final_norm(transformer_impl: str) -> type:
    """The decoder's final RMSNorm class: megatron-core would pick ``TENorm`` whenever Transformer Engine is
    importable, even for the local spec (then a local run on a TE machine has other checkpoint entries than one
    without TE); here the implementation decides."""
    if transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return LocalNorm


def get_llm_decoder_block_spec(
    transformer_config: TransformerConfig,
    transformer_impl: str = "local",
    layer_spec: Optional[ModuleSpec] = None,
    pp_rank: int = 0,
) -> TransformerBlockSubmodules:
    """Pipeline stage ``pp_rank``'s decoder block: its layers (``layer_spec``, default :func:`get_llm_layer_spec`)
    and the final norm of ``transformer_impl``."""
    layer_spec = layer_spec or get_llm_layer_spec(transformer_impl)
    num_layers = get_num_layers_to_build(transformer_config, pp_rank=pp_rank)
    final_norm = llm_final_norm(transformer_impl)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=final_norm)
