"""Prompt micro-batches for inference: encoded prompts (from the training task encoders) left-padded into the
model's batch dict (docs/puffin.md §2.1 step 3, §2.2 step 3, §8)."""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch

from megatron_puffin.data.collate import left_pad, position_ids_from_mask, stack_or_list
from megatron_puffin.data.task_encoders import EncodedSample


def prompt_batch(samples: Sequence[EncodedSample], pad_id: int) -> Dict[str, Any]:
    """Left-pads prompts of one task into a batch for :meth:`PuffinModel.embed_inputs` / the LLM.

    Args:
        samples: encoded prompts (``TaskEncoder.understanding_prompt`` / ``generation_prompt``), one task.
        pad_id: left-padding id (masked out; understanding: 0, generation: ``<|endoftext|>``).

    Returns:
        ``task``, ``input_ids`` / ``attention_mask`` (bool) / ``position_ids`` ``[b, L]``, ``vision_images`` (when the
        prompts hold images), ``positions`` / ``sample_indices`` ``[b]`` (the keys of the vision tower's CPE
        generator; unused in eval mode).
    """
    tasks = {sample.task for sample in samples}
    if len(tasks) != 1:
        raise ValueError(f"a prompt batch holds one task, got {sorted(tasks)}")
    input_ids = left_pad([sample.input_ids for sample in samples], pad_id)
    lengths = torch.tensor([sample.input_ids.numel() for sample in samples])
    mask = torch.arange(input_ids.shape[1])[None] >= (input_ids.shape[1] - lengths)[:, None]
    batch: Dict[str, Any] = {
        "task": tasks.pop(),
        "input_ids": input_ids,
        "attention_mask": mask,
        "position_ids": position_ids_from_mask(mask),
        "positions": torch.arange(len(samples)),
        "sample_indices": torch.arange(len(samples)),
    }
    if samples[0].vision_image is not None:
        batch["vision_images"] = stack_or_list([sample.vision_image for sample in samples])
    return batch
