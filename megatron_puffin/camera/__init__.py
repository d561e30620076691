"""The camera as a first-class type: one value shared by data, model conditioning and evaluation.

* :class:`Camera`: validated (roll, pitch, vfov[, yaw]) in radians (docs/puffin.md §3.3, §3.10, §4).
* Camera maps: :func:`camera_map`, :func:`camera_maps` (batched, any device), :func:`normalize_camera_map`
  (the VAE input range of §3.6) and the least-squares inverse :func:`estimate_camera`.
* Camera as language: :func:`format_camera`, :func:`parse_camera` and friends (§3.3, §7.1).
* :mod:`~megatron_puffin.camera.terms`: photographic vocabulary and thinking-style reasoning.
* :mod:`~megatron_puffin.camera.transforms`: image transforms that return the camera of the transformed image.

See docs/camera.md.
"""
from megatron_puffin.camera import terms, transforms
from megatron_puffin.camera.estimate import estimate_camera
from megatron_puffin.camera.language import (
    CAMERA_SENTENCE_PREFIX,
    FALLBACK_CAMERA_VALUES,
    YAW_SENTENCE_PREFIX,
    camera_text,
    format_camera,
    format_caption,
    format_thinking_caption,
    parse_camera,
    parse_camera_answer,
    parse_camera_tolerant,
    split_caption,
    split_thinking_caption,
)
from megatron_puffin.camera.maps import camera_map, camera_maps, denormalize_camera_map, normalize_camera_map
from megatron_puffin.camera.terms import describe_camera, thinking_reasoning
from megatron_puffin.camera.types import Camera, CameraError, CameraValues

__all__ = [
    "CAMERA_SENTENCE_PREFIX",
    "FALLBACK_CAMERA_VALUES",
    "YAW_SENTENCE_PREFIX",
    "Camera",
    "CameraError",
    "CameraValues",
    "camera_map",
    "camera_maps",
    "camera_text",
    "denormalize_camera_map",
    "describe_camera",
    "estimate_camera",
    "format_camera",
    "format_caption",
    "format_thinking_caption",
    "normalize_camera_map",
    "parse_camera",
    "parse_camera_answer",
    "parse_camera_tolerant",
    "split_caption",
    "split_thinking_caption",
    "terms",
    "thinking_reasoning",
    "transforms",
]
