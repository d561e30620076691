"""The typed micro-batch at the model's seam, and the diffusion inputs the objective prepares for the MMDiT.

The data pipeline collates a dict (it carries bookkeeping such as texts and truncation counts, see
``megatron_puffin.data.collate``); :meth:`PuffinBatch.from_collated` keeps the fields the model and its training
objective read, typed, so a misspelt or missing key fails at the seam rather than deep inside a tower.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Union

import torch

Images = Union[torch.Tensor, List[torch.Tensor]]
"""``[B, C, H, W]`` when every image of the micro-batch has one size, else a list of ``[C, H_i, W_i]``."""

CACHED_MOMENTS = {"vae_target": "target_moments", "vae_camera": "camera_moments", "vae_init": "init_moments"}
"""Posterior-noise purpose -> the :class:`PuffinBatch` field of its cached VAE moments (``--cached-latents``)."""


@dataclass(frozen=True)
class DiffusionInputs:
    """What the MMDiT reads on the last stage of a generation micro-batch (made by the training objective, or by
    the sampler at inference).

    Attributes:
        noisy_latents: ``x_t``, ``[B, C, h, w]`` or a list of ``[C, h_i, w_i]``.
        timesteps: ``[B]`` float, the DiT's timestep of each sample.
        condition_latents: clean condition latents per sample (cam2image: [camera map]; image2image: [camera map,
            initial view]), or None (text2image).
    """

    noisy_latents: Images
    timesteps: torch.Tensor
    condition_latents: Optional[List[List[torch.Tensor]]] = None


@dataclass(frozen=True)
class PuffinBatch:
    """One task micro-batch as the model and the objective read it (left-padded rows, as collated).

    Attributes:
        task: the loss task (``megatron_puffin.tasks``).
        input_ids: ``[b, s]`` long, placeholders (-200 image, -400 query) where embeddings go.
        attention_mask: ``[b, s]`` bool, True on real tokens.
        position_ids: ``[b, s]`` long.
        positions: ``[b]`` long, each sample's position in its stream (keys of the per-sample generators).
        sample_indices: ``[b]`` long, each sample's dataset index (keys of the per-sample generators).
        labels: ``[b, s]`` long, -100 where not supervised (understanding).
        vision_images: images for the vision tower (understanding, image2image).
        target_images, init_images, camera_maps: generation images (camera maps normalised, docs/puffin.md §3.6).
        target_moments, camera_moments, init_moments: cached VAE posterior moments ``[B, 2, C, h, w]`` (or lists).
        diffusion: the MMDiT inputs, set by the objective on the last stage of a generation micro-batch.
    """

    task: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    positions: torch.Tensor
    sample_indices: torch.Tensor
    labels: Optional[torch.Tensor] = None
    vision_images: Optional[Images] = None
    target_images: Optional[Images] = None
    init_images: Optional[Images] = None
    camera_maps: Optional[Images] = None
    target_moments: Optional[Images] = None
    camera_moments: Optional[Images] = None
    init_moments: Optional[Images] = None
    diffusion: Optional[DiffusionInputs] = None

    @classmethod
    def from_collated(cls, batch: Mapping[str, Any]) -> "PuffinBatch":
        """The typed view of a collated (or prompt) batch dict; keys the model does not read are left behind."""
        if isinstance(batch, PuffinBatch):
            return batch
        names = {field.name for field in dataclasses.fields(cls)} - {"diffusion"}
        return cls(**{name: batch[name] for name in names if name in batch})

    def replace(self, **changes: Any) -> "PuffinBatch":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])
