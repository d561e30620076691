"""Small pieces of the vision path: input conditioning, RADIO's feature normaliser, the space-to-depth fold and
the gradient scale (docs/puffin.md §1.3-1.4)."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from megatron_puffin.models.vision.config import CLIP_MEAN, CLIP_STD


class InputConditioner(nn.Module):
    """Puffin images in [-1, 1] -> RADIO's input: ``((x + 1) / 2 - mean) / std`` per channel.

    ``norm_mean`` / ``norm_std`` are persistent ``[3, 1, 1]`` fp32 buffers (RADIO's ``input_conditioner``
    names), CLIP's values by default and overwritten by a checkpoint.
    """

    def __init__(self, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> None:
        super().__init__()
        self.register_buffer("norm_mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("norm_std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """
        Args:
            images: ``[b, 3, H, W]`` in [-1, 1], any float dtype.
            dtype: dtype of the result (the encoder's parameter dtype).

        Returns:
            ``[b, 3, H, W]`` normalised, computed in fp32 and cast to ``dtype``.
        """
        unit = (images.float() + 1.0) * 0.5
        return ((unit - self.norm_mean) / self.norm_std).to(dtype)


class FeatureNormalizer(nn.Module):
    """RADIO's optional feature normaliser: ``(x - mean) @ tx^T`` with persistent buffers ``mean [h]`` and
    ``tx [h, h]`` from the checkpoint (identity by default)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("tx", torch.eye(hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[b, n, h] -> [b, n, h]`` in the input's dtype."""
        return ((features - self.mean.to(features.dtype)) @ self.tx.to(features.dtype).T).to(features.dtype)


def fold_patches(features: torch.Tensor, grid: Tuple[int, int], fold_size: int) -> torch.Tensor:
    """Space-to-depth: every ``fold x fold`` block of patch features becomes one token (docs/puffin.md §1.4).

    ``out[b, i * w + j, (p * fold + q) * c + k] = features[b, (fold * i + p) * W + (fold * j + q), k]`` with
    ``W = fold * w``: tokens in raster order over the block grid, channels row-offset-major. For a 4x4 grid
    and fold 2 the tokens gather patches [0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15].

    Args:
        features: ``[b, H * W, c]`` patch features in raster order.
        grid: ``(H, W)`` patch grid, both multiples of ``fold_size``.
        fold_size: block side.

    Returns:
        ``[b, (H / fold) * (W / fold), fold * fold * c]``.
    """
    batch, num_patches, channels = features.shape
    rows, cols = grid
    if rows * cols != num_patches or rows % fold_size or cols % fold_size:
        raise ValueError(f"cannot fold {num_patches} patches as a {rows}x{cols} grid by {fold_size}")
    blocks = features.reshape(batch, rows // fold_size, fold_size, cols // fold_size, fold_size, channels)
    blocks = blocks.permute(0, 1, 3, 2, 4, 5)  # [b, i, j, p, q, c]
    return blocks.reshape(batch, (rows // fold_size) * (cols // fold_size), fold_size * fold_size * channels)


class ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``scale`` in the backward pass."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: D401 - autograd API
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output * ctx.scale, None


def scale_gradient(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """``tensor`` unchanged, with its gradient multiplied by ``scale`` on the way back (no-op for 1)."""
    if scale == 1.0:
        return tensor
    return ScaleGradient.apply(tensor, scale)
