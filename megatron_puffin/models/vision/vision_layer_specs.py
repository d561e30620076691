"""Layer specs of the vision tower: the shared bidirectional pre-LN encoder layer
(:mod:`megatron_puffin.models.common.encoder_layer_specs`, local or Transformer Engine) for the ViT blocks, plus
the MLP projector's submodules. The connectors (:mod:`megatron_puffin.models.connector`) use the same layer; the
activation (exact GELU for the ViT, tanh-GELU for the connectors) comes from the ``TransformerConfig``.
"""
from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_puffin.models.common.encoder_layer_specs import TRANSFORMER_IMPLS, get_encoder_layer_spec
from megatron_puffin.optional_deps import require_transformer_engine
from megatron_puffin.models.vision.token_padding import with_key_padded_attention


def get_vision_layer_spec(transformer_impl: str = "local") -> ModuleSpec:
    """The ViT block spec for ``--transformer-impl``: the encoder layer, its attention taking a key-padding mask
    when the tokens are padded for FP8 GEMMs (:mod:`.token_padding`)."""
    return with_key_padded_attention(get_encoder_layer_spec(transformer_impl, "vision tower"))


def get_projector_submodules(transformer_impl: str = "local") -> MLPSubmodules:
    """Linears of the MLP projector: column-parallel ``linear_fc1``, row-parallel ``linear_fc2``."""
    if transformer_impl == "transformer_engine":
        require_transformer_engine("--transformer-impl transformer_engine (vision projector)")
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        return MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear)
    if transformer_impl == "local":
        return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    raise ValueError(f"--transformer-impl ({transformer_impl}) must be one of {', '.join(TRANSFORMER_IMPLS)}")
