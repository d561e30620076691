"""Layer specs of the connector encoders: the same bidirectional pre-LN encoder layer as the ViT (see
:mod:`megatron_puffin.models.common.encoder_layer_specs`), local or Transformer Engine; self-attention built with
``AttnMaskType.no_mask`` (all 64 query tokens see each other), tanh-GELU from the ``TransformerConfig``."""
from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_puffin.models.common.encoder_layer_specs import (
    get_encoder_layer_local_spec,
    get_encoder_layer_spec,
    get_encoder_layer_with_transformer_engine_spec,
)


def get_connector_layer_local_spec() -> ModuleSpec:
    """Pure-torch connector layer (torch LayerNorm, megatron-core TP linears, torch SDPA without mask)."""
    return get_encoder_layer_local_spec()


def get_connector_layer_with_transformer_engine_spec() -> ModuleSpec:
    """Transformer Engine connector layer (TE norms and linears, fused attention without mask)."""
    return get_encoder_layer_with_transformer_engine_spec("--transformer-impl transformer_engine (connectors)")


def get_connector_layer_spec(transformer_impl: str = "local") -> ModuleSpec:
    """The connector layer spec for ``--transformer-impl``."""
    return get_encoder_layer_spec(transformer_impl, "connectors")
