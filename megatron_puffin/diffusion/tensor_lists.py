"""Elementwise work on latents given either as one batched tensor or as a list of differently sized tensors.

Lists are flattened into one buffer so that elementwise maths is a handful of kernels, not one per sample.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch

Latents = Union[torch.Tensor, Sequence[torch.Tensor]]


def flatten(tensors: Latents) -> torch.Tensor:
    """All elements in one 1-D tensor (sample order)."""
    if isinstance(tensors, torch.Tensor):
        return tensors.reshape(-1)
    return torch.cat([t.reshape(-1) for t in tensors])


def split_like(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Split a flat buffer back into views shaped like ``like``."""
    pieces = torch.split(flat, [t.numel() for t in like])
    return [piece.view_as(t) for piece, t in zip(pieces, like)]


def numels(tensors: Latents, device: torch.device) -> torch.Tensor:
    """``[B]`` long: elements per sample."""
    return torch.tensor([t.numel() for t in tensors], device=device)


def concat_batches(first: Latents, second: Latents) -> Latents:
    """``[first; second]`` along the batch (tensor cat, or list concatenation)."""
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return torch.cat([first, second])
    return list(first) + list(second)


def split_batch(latents: Latents, first_size: int):
    """Inverse of :func:`concat_batches`: ``(latents[:first_size], latents[first_size:])``."""
    if isinstance(latents, torch.Tensor):
        return latents[:first_size], latents[first_size:]
    return list(latents[:first_size]), list(latents[first_size:])
