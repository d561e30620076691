"""Input embeddings of the MMDiT: latent patches with centre-cropped 2-D sin-cos positions, the timestep +
pooled-text conditioning vector, and their sinusoidal helpers.

These layers are small and replicated on every tensor-parallel rank (they see identical inputs, so their
gradients agree without communication). Parameter names mirror diffusers' ``PatchEmbed`` and
``CombinedTimestepTextProjEmbeddings``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_puffin.models.dit.config import DiTConfig

TIMESTEP_CHANNELS = 256


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding computed in float64 (as diffusers does on CPU/CUDA).

    Args:
        embed_dim: D (even).
        positions: ``[M]`` positions (any float dtype).

    Returns:
        ``[M, D]`` float64: ``[sin(p * w_k), cos(p * w_k)]`` with ``w_k = 10000^(-k / (D/2))``.
    """
    half = embed_dim // 2
    omega = torch.arange(half, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = torch.outer(positions.reshape(-1).to(torch.float64), omega)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d_grid(embed_dim: int, grid_size: int, base_size: int, interpolation_scale: float = 1.0) -> torch.Tensor:
    """The square 2-D sin-cos position table of SD3.

    Token ``(i, j)`` (row i, column j, row-major order) gets ``[sincos_1d(D/2, x_j), sincos_1d(D/2, y_i)]`` with
    coordinates ``k / (grid_size / base_size) / interpolation_scale`` computed in float32.

    Returns:
        ``[grid_size * grid_size, D]`` float32.
    """
    coords = torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size) / interpolation_scale
    cols = coords[None, :].expand(grid_size, grid_size)  # x of token (i, j) is coords[j]
    rows = coords[:, None].expand(grid_size, grid_size)  # y of token (i, j) is coords[i]
    table = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    return table.float()


def timestep_sinusoids(timesteps: torch.Tensor, num_channels: int = TIMESTEP_CHANNELS, max_period: float = 10000.0):
    """SD3's sinusoidal timestep features (cos first, frequency shift 0).

    Args:
        timesteps: ``[B]`` timesteps on the 0..1000 scale (fractional allowed).
        num_channels: feature width (256 in SD3).

    Returns:
        ``[B, num_channels]`` float32 ``[cos(t * f_k), sin(t * f_k)]`` with ``f_k = max_period^(-k / (C/2))``.
    """
    half = num_channels // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if num_channels % 2:
        features = F.pad(features, (0, 1))
    return features


class PatchEmbed(nn.Module):
    """Conv patchifier plus the SD3 position table, centre-cropped to each latent's token grid.

    The table is a persistent buffer (``pos_embed``, ``[1, M*M, D]`` with ``M = pos_embed_max_size``) so that a
    diffusers checkpoint carries it, exactly as diffusers' ``PatchEmbed`` does.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.pos_embed_max_size = config.pos_embed_max_size
        self.proj = nn.Conv2d(
            config.in_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        table = sincos_2d_grid(config.hidden_size, config.pos_embed_max_size, config.base_grid_size)
        self.register_buffer("pos_embed", table.unsqueeze(0), persistent=True)

    def cropped_pos_embed(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """Positions of a ``grid_height x grid_width`` token grid: the centre crop of the max grid.

        Returns:
            ``[grid_height * grid_width, D]`` in the buffer's dtype.
        """
        size = self.pos_embed_max_size
        if grid_height > size or grid_width > size:
            raise ValueError(
                f"latent token grid {grid_height}x{grid_width} exceeds --dit-pos-embed-max-size ({size}); "
                f"use latents of at most {size * self.patch_size} pixels per side"
            )
        top, left = (size - grid_height) // 2, (size - grid_width) // 2
        table = self.pos_embed.reshape(size, size, -1)[top : top + grid_height, left : left + grid_width]
        return table.reshape(grid_height * grid_width, -1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Embed same-shaped latents.

        Args:
            latents: ``[n, C, h, w]`` with h, w multiples of the patch size.

        Returns:
            ``[h/p * w/p, n, D]`` tokens (sequence-first, row-major over the token grid), latents' dtype.
        """
        grid_height, grid_width = latents.shape[-2] // self.patch_size, latents.shape[-1] // self.patch_size
        tokens = self.proj(latents).flatten(2).permute(2, 0, 1)  # [N, n, D]
        positions = self.cropped_pos_embed(grid_height, grid_width)[:, None, :]
        return (tokens + positions).to(latents.dtype)


class TimestepEmbedding(nn.Module):
    """``linear_2(silu(linear_1(x)))`` on the sinusoidal timestep features (diffusers' ``TimestepEmbedding``)."""

    def __init__(self, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, in] -> [B, D]``."""
        return self.linear_2(F.silu(self.linear_1(features)))


class PooledTextProjection(nn.Module):
    """``linear_2(silu(linear_1(pooled)))`` (diffusers' ``PixArtAlphaTextProjection`` with SiLU)."""

    def __init__(self, in_features: int, hidden_size: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """``[B, P] -> [B, D]``."""
        return self.linear_2(F.silu(self.linear_1(pooled)))


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """The conditioning vector ``temb = TimestepEmbedding(sinusoids(t)) + TextProjection(pooled)``."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIMESTEP_CHANNELS, config.hidden_size)
        self.text_embedder = PooledTextProjection(config.pooled_projection_dim, config.hidden_size)

    def forward(self, timestep: torch.Tensor, pooled_projections: torch.Tensor) -> torch.Tensor:
        """
        Args:
            timestep: ``[B]`` timesteps on the 0..1000 scale.
            pooled_projections: ``[B, P]`` pooled text conditioning.

        Returns:
            ``[B, D]`` in the dtype of ``pooled_projections``.
        """
        features = timestep_sinusoids(timestep).to(dtype=pooled_projections.dtype)
        return self.timestep_embedder(features) + self.text_embedder(pooled_projections)
