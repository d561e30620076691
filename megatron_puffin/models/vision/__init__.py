"""The vision tower: RADIO ViT on megatron-core, the 2x2 fold and the MLP projector into the LLM."""
from megatron_puffin.models.vision.config import CLIP_MEAN, CLIP_STD, VisionConfig
from megatron_puffin.models.vision.encoder import RADIOEncoder
from megatron_puffin.models.vision.model import VisionTower, build_vision, vision_output_grid
from megatron_puffin.models.vision.ops import (
    FeatureNormalizer,
    InputConditioner,
    ScaleGradient,
    fold_patches,
    scale_gradient,
)
from megatron_puffin.models.vision.vision_layer_specs import get_projector_submodules, get_vision_layer_spec

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FeatureNormalizer",
    "InputConditioner",
    "RADIOEncoder",
    "ScaleGradient",
    "VisionConfig",
    "VisionTower",
    "build_vision",
    "fold_patches",
    "get_projector_submodules",
    "get_vision_layer_spec",
    "scale_gradient",
    "vision_output_grid",
]
