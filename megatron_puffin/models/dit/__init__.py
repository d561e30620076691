"""The SD3 MMDiT tower ("dynamic" Puffin variant) on megatron-core tensor-parallel layers."""
from megatron_puffin.models.dit.config import DiTConfig
from megatron_puffin.models.dit.dit_layer_specs import (
    get_dit_layer_local_spec,
    get_dit_layer_spec,
    get_dit_layer_with_transformer_engine_spec,
)
from megatron_puffin.models.dit.image_stream import ImageStreamLayout, build_layout, unpatchify
from megatron_puffin.models.dit.model import MMDiTModel, build_dit

__all__ = [
    "DiTConfig",
    "ImageStreamLayout",
    "MMDiTModel",
    "build_dit",
    "build_layout",
    "get_dit_layer_local_spec",
    "get_dit_layer_spec",
    "get_dit_layer_with_transformer_engine_spec",
    "unpatchify",
]
