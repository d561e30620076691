"""The instruction-tuning (stage-4) tasks at inference (docs/puffin.md §6.2, §3.4, §3.10).

* World exploration: initial view + camera motion (roll, pitch of the target, yaw deviation) -> the new view,
  generated with the initial view's visual tokens in the prompt and its latents as a condition (image2image).
  Prompt text: ``The camera parameters (roll, pitch, and field-of-view) are: R, P, 1.4800. The deviation of the
  camera yaw angle is Y.`` (yaw wrapped to [0, 2 pi), positive turns left; vFoV fixed at 1.48 as in training).
* Multi-view sweep: several target cameras rendered from one initial view (world exploration per camera);
  :func:`sample_exploration_cameras` draws Puffin's demo cameras.
* Spatial imagination: initial view + yaw -> a description of the unseen view (the cross-view understanding prompt).
* Photographic guidance: image -> its camera and a suggested yaw / pitch change (the photography prompt).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from megatron_puffin.camera import Camera, camera_text
from megatron_puffin.data import templates
from megatron_puffin.inference.generation import GeneratedImage, GenerationRequest, GenerationSettings, generate
from megatron_puffin.inference.understanding import UnderstandingOutput, understand

CROSS_VIEW_VFOV = 1.48
"""Vertical field of view of every cross-view target (docs/puffin.md §3.10)."""
DEMO_ANGLE_RANGE = 0.3927
"""Half-range (pi/8) of the world-exploration demo's random roll / pitch; its yaw is twice a draw from it."""
IMAGINATION_YAWS = {"left": 1.5710, "behind": 3.1416, "right": 4.7120}
"""The spatial-imagination demo's yaw deviations (positive turns left)."""


def exploration_camera(roll: float, pitch: float, yaw: float, vfov: float = CROSS_VIEW_VFOV) -> Camera:
    """A world-exploration target camera (yaw any real; rendered wrapped to [0, 2 pi))."""
    return Camera(roll, pitch, vfov, yaw)


def sample_exploration_cameras(count: int, seed: int) -> List[Camera]:
    """The world-exploration demo's target cameras: roll, pitch ~ U(-pi/8, pi/8), yaw = 2 U(-pi/8, pi/8) wrapped
    to [0, 2 pi), vFoV 1.48 (docs/puffin.md §6.2), from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    draws = (torch.rand(count, 3, generator=generator, dtype=torch.float64) * 2 - 1) * DEMO_ANGLE_RANGE
    return [exploration_camera(float(r), float(p), (2 * float(y)) % (2 * math.pi)) for r, p, y in draws.tolist()]


def explore_world(model, tokenizer, init_image: torch.Tensor, cameras: Sequence[Camera], caption: str = "",
                  settings: Optional[GenerationSettings] = None, **kwargs) -> List[GeneratedImage]:
    """World exploration / multi-view sweep: one new view per target camera from ``init_image``.

    Args:
        init_image: the initial view, float32 ``[3, S, S]`` in [-1, 1] (straight resize, see ``load_image``).
        cameras: target cameras (:func:`exploration_camera`; without a yaw no yaw sentence is written).
        caption: optional scene text put before the camera text (training's mixed motion had both forms).
        settings, kwargs: as for :func:`~.generation.generate`; every view uses ``settings.seed`` + its index.
    """
    requests = [GenerationRequest(camera=camera, caption=caption, init_image=init_image) for camera in cameras]
    return generate(model, tokenizer, requests, settings, **kwargs)


def imagination_prompt(yaw: float, tail_index: int = 0) -> str:
    """The cross-view understanding prompt for a yaw deviation at roll = pitch = 0, vFoV 1.48."""
    return templates.cross_view_prompt(tail_index, camera_text(exploration_camera(0.0, 0.0, yaw)))


def imagine_views(model, tokenizer, init_images: Sequence[torch.Tensor], yaws: Sequence[float],
                  tail_index: int = 0, **kwargs) -> List[UnderstandingOutput]:
    """Spatial imagination: a description of the view at each yaw deviation from each initial view."""
    if len(init_images) != len(yaws):
        raise ValueError(f"{len(init_images)} initial views for {len(yaws)} yaws; give one yaw per view")
    prompts = [imagination_prompt(yaw, tail_index) for yaw in yaws]
    return understand(model, tokenizer, init_images, prompt=prompts, **kwargs)


def photographic_guidance(model, tokenizer, images: Sequence[torch.Tensor], **kwargs) -> List[UnderstandingOutput]:
    """Photographic guidance: each image's camera and the suggested yaw / pitch change (free text; ``camera`` is
    the first triple the answer states)."""
    return understand(model, tokenizer, images, prompt=templates.PHOTOGRAPHY_PROMPT, **kwargs)
