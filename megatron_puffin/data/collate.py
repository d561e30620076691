"""Collation of task-homogeneous micro-batches (docs/puffin.md §2.1 step 3, §2.2 step 3, §3.8, §8).

Sequences are padded on the **left** (so the 64 query slots of generation prompts are always the last positions):
understanding ``input_ids`` with 0, generation ``input_ids`` with the tokenizer pad id (``<|endoftext|>``), labels
with -100. ``position_ids = cumsum(attention_mask) - 1`` clamped at 0. Image tensors are stacked when all have
the same size and given as a list otherwise. Camera maps are computed here, batched, from the typed cameras at the
size of each target image and scaled by 1/(pi/2) (§3.6); they are never loaded from files.
"""
import logging
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from megatron_puffin.camera import camera_maps, normalize_camera_map
from megatron_puffin.data import templates
from megatron_puffin.data.task_encoders import EncodedSample
from megatron_puffin.tasks import GENERATION_TASKS

logger = logging.getLogger(__name__)

Images = Union[torch.Tensor, List[torch.Tensor]]


def left_pad(sequences: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    """Left-pads 1-D int64 tensors to [B, max length] with ``value``."""
    length = max(int(sequence.numel()) for sequence in sequences)
    batch = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence.numel():
            batch[row, length - sequence.numel():] = sequence
    return batch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` clamped at 0: pads get 0, real tokens 0, 1, 2, ... (int64 [B, L])."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp_(min=0)


def stack_or_list(images: Sequence[torch.Tensor]) -> Images:
    """[B, C, H, W] when all images share a size, else the list itself."""
    if all(image.shape == images[0].shape for image in images):
        return torch.stack(list(images))
    return list(images)


def batched_camera_maps(cameras: torch.Tensor, images: Sequence[torch.Tensor]) -> Images:
    """Normalised camera maps at each image's size, computed once per distinct size.

    Args:
        cameras: float32 [B, 3] (roll, pitch, vfov).
        images: B tensors [3, H_i, W_i].

    Returns:
        float32 [B, 3, H, W] (one size) or a list of [3, H_i, W_i], values map / (pi/2).
    """
    sizes = [tuple(image.shape[-2:]) for image in images]
    maps: List[Optional[torch.Tensor]] = [None] * len(images)
    for size in dict.fromkeys(sizes):
        rows = [index for index, other in enumerate(sizes) if other == size]
        computed = normalize_camera_map(camera_maps(cameras[rows], size[0], size[1]))
        for slot, index in enumerate(rows):
            maps[index] = computed[slot]
    return stack_or_list(maps)


class Collator:
    """Collates a list of :class:`EncodedSample` of ONE task into a micro-batch dict.

    Args:
        pad_id: Generation left-padding id (the tokenizer's ``<|endoftext|>``).
        compute_camera_maps: Add ``camera_maps`` for samples that carry a camera (cam2image, image2image); without it
            only the ``cameras`` values are given (e.g. to build maps on the GPU).

    The batch holds: ``task``; ``input_ids``, ``attention_mask`` (bool), ``position_ids`` [B, L]; ``labels`` [B, L]
    (understanding); ``vision_images`` (pad-to-square images for the vision tower); ``num_image_tokens`` [B];
    ``target_images``, ``init_images``, ``cameras`` [B, 3] and ``camera_maps`` where the task has them; ``texts``,
    ``sample_indices``, ``positions`` [B]; ``num_truncated`` and ``num_cfg_dropped`` (ints).
    """

    def __init__(self, pad_id: int, compute_camera_maps: bool = True):
        self.pad_id = pad_id
        self.compute_camera_maps = compute_camera_maps

    def __call__(self, samples: Sequence[EncodedSample]) -> Dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty micro-batch")
        tasks = sorted({sample.task for sample in samples})
        if len(tasks) != 1:
            raise ValueError(f"a micro-batch must hold one task (docs/puffin.md §3.9), got {tasks}")
        task = tasks[0]
        pad = self.pad_id if task in GENERATION_TASKS else templates.UNDERSTANDING_PAD_ID
        input_ids = left_pad([sample.input_ids for sample in samples], pad)
        lengths = torch.tensor([sample.input_ids.numel() for sample in samples])
        attention_mask = torch.arange(input_ids.shape[1]).unsqueeze(0) >= (input_ids.shape[1] - lengths).unsqueeze(1)
        batch: Dict[str, Any] = {
            "task": task,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask),
            "num_image_tokens": torch.tensor([sample.num_image_tokens for sample in samples], dtype=torch.long),
            "texts": [sample.text for sample in samples],
            "sample_indices": torch.tensor([sample.sample_index for sample in samples], dtype=torch.long),
            "positions": torch.tensor([sample.position for sample in samples], dtype=torch.long),
            "num_truncated": sum(sample.truncated for sample in samples),
            "num_cfg_dropped": sum(sample.cfg_dropped for sample in samples),
        }
        if samples[0].labels is not None:
            batch["labels"] = left_pad([sample.labels for sample in samples], templates.IGNORE_INDEX)
        self._add_images(batch, samples)
        return batch

    def _add_images(self, batch: Dict[str, Any], samples: Sequence[EncodedSample]) -> None:
        for key, attribute in (("vision_images", "vision_image"), ("target_images", "target_image"),
                               ("init_images", "init_image")):
            images = [getattr(sample, attribute) for sample in samples]
            if images[0] is not None:
                batch[key] = stack_or_list(images)
        for key in (samples[0].latents or {}):
            batch[key] = stack_or_list([sample.latents[key] for sample in samples])
        if samples[0].camera is not None:
            cameras = torch.stack([sample.camera for sample in samples])
            batch["cameras"] = cameras
            if self.compute_camera_maps:
                batch["camera_maps"] = batched_camera_maps(cameras, [sample.target_image for sample in samples])
