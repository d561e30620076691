"""The bidirectional pre-LN encoder layer shared by the ViT and the connectors, as a local (pure torch) and a
Transformer Engine variant of the same submodules (LayerNorm -> self-attention without mask -> residual,
LayerNorm -> MLP -> residual).

Both variants keep the norms as separate modules (``input_layernorm``, ``pre_mlp_layernorm``) instead of
Transformer Engine's fused LayerNorm+linear, so a checkpoint has the same tensor names under either spec and the
converters stay one table (only TE's ``_extra_state`` entries differ). megatron-core's own
``get_vit_layer_with_local_spec`` is not used: it builds a *causal* attention mask, wrong for an encoder. The
activation (exact GELU for the ViT, tanh-GELU for the connectors) comes from the ``TransformerConfig``.
"""
from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_puffin.models.common.attention import SDPADotProductAttention
from megatron_puffin.models.sequence_parallel import LocalNorm
from megatron_puffin.optional_deps import require_transformer_engine

TRANSFORMER_IMPLS = ("local", "transformer_engine")


def _encoder_layer_spec(norm, column_linear, row_linear, core_attention) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column_linear, core_attention=core_attention, linear_proj=row_linear
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column_linear, linear_fc2=row_linear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_encoder_layer_local_spec() -> ModuleSpec:
    """Pure-torch bidirectional encoder layer: torch LayerNorm (:class:`LocalNorm`, sequence-parallel capable),
    megatron-core TP linears, torch SDPA."""
    return _encoder_layer_spec(LocalNorm, ColumnParallelLinear, RowParallelLinear, SDPADotProductAttention)


def get_encoder_layer_with_transformer_engine_spec(what: str) -> ModuleSpec:
    """Transformer Engine bidirectional encoder layer (TE norms, FP8-capable linears, fused attention).

    Args:
        what: the flag that asked for it, for the error message.

    Raises:
        RuntimeError: Transformer Engine or CUDA is unusable (with the install line).
    """
    require_transformer_engine(what)
    return encoder_transformer_engine_layer_spec()


def encoder_transformer_engine_layer_spec() -> ModuleSpec:
    """The Transformer Engine encoder layer spec itself (no availability check; the spec only names classes)."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TEDotProductAttention,
        TENorm,
        TERowParallelLinear,
    )

    return _encoder_layer_spec(TENorm, TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention)


def get_encoder_layer_spec(transformer_impl: str, what: str) -> ModuleSpec:
    """The encoder layer spec for ``--transformer-impl`` (``what`` names the tower in errors)."""
    if transformer_impl == "local":
        return get_encoder_layer_local_spec()
    if transformer_impl == "transformer_engine":
        return get_encoder_layer_with_transformer_engine_spec(f"--transformer-impl transformer_engine ({what})")
    raise ValueError(f"--transformer-impl ({transformer_impl}) must be one of {', '.join(TRANSFORMER_IMPLS)}")
