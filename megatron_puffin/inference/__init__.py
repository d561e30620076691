"""Using a trained Puffin: loading a checkpoint, understanding (greedy decoding with a KV cache) and generation.

See docs/inference.md. Entry points: :func:`load_puffin`, :func:`understand`, :func:`load_image`.
"""
from megatron_puffin.inference.decoding import DecodeOutput, greedy_decode
from megatron_puffin.inference.images import load_image, prepare_image, to_uint8
from megatron_puffin.inference.loading import InferenceSetupError, LoadedPuffin, load_puffin
from megatron_puffin.inference.understanding import (
    UnderstandingOutput,
    decode_prompts,
    read_camera,
    reason,
    understand,
)

__all__ = [
    "DecodeOutput",
    "InferenceSetupError",
    "LoadedPuffin",
    "UnderstandingOutput",
    "decode_prompts",
    "greedy_decode",
    "load_image",
    "load_puffin",
    "prepare_image",
    "read_camera",
    "reason",
    "to_uint8",
    "understand",
]
