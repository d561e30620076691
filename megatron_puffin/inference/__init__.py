"""Using a trained Puffin: loading a checkpoint, understanding (greedy decoding with a KV cache), generation
(CFG Euler sampling of the MMDiT), thinking mode and the cross-view tasks. See docs/inference.md.

Entry points: :func:`load_puffin`, :func:`load_image`, :func:`understand`, :func:`generate`, and in
:mod:`.tasks` :func:`explore_world`, :func:`imagine_views`, :func:`photographic_guidance`.
"""
from megatron_puffin.inference.decoding import DecodeOutput, greedy_decode
from megatron_puffin.inference.generation import (
    GeneratedImage,
    GenerationRequest,
    GenerationSettings,
    PreparedGeneration,
    generate,
    generate_batches,
    prepare_generation,
)
from megatron_puffin.inference.images import load_image, prepare_image, to_uint8
from megatron_puffin.inference.loading import InferenceSetupError, LoadedPuffin, load_puffin
from megatron_puffin.inference.tasks import (
    explore_world,
    exploration_camera,
    imagine_views,
    photographic_guidance,
    sample_exploration_cameras,
)
from megatron_puffin.inference.understanding import (
    UnderstandingOutput,
    decode_prompts,
    read_camera,
    reason,
    understand,
)

__all__ = [
    "DecodeOutput",
    "GeneratedImage",
    "GenerationRequest",
    "GenerationSettings",
    "InferenceSetupError",
    "LoadedPuffin",
    "PreparedGeneration",
    "UnderstandingOutput",
    "decode_prompts",
    "exploration_camera",
    "explore_world",
    "generate",
    "generate_batches",
    "greedy_decode",
    "imagine_views",
    "load_image",
    "load_puffin",
    "photographic_guidance",
    "prepare_generation",
    "prepare_image",
    "read_camera",
    "reason",
    "sample_exploration_cameras",
    "to_uint8",
    "understand",
]
