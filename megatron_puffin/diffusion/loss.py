"""Flow-matching training target and loss (docs/puffin.md §2.3).

``x_t = (1 - sigma) x_0 + sigma * eps``, target velocity ``v = eps - x_0``, loss per sample = mean over all its
elements of ``(v_hat - v)^2`` in float32, task loss = mean over samples (each sample counts equally whatever its
size). Latents may be a batched ``[B, C, H, W]`` tensor or a list of ``[C, h_i, w_i]`` tensors of different
sizes; lists are handled by flattening into one buffer (no per-sample kernels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from megatron_puffin.diffusion.schedule import FlowMatchSchedule
from megatron_puffin.diffusion.tensor_lists import Latents, flatten, numels, split_like
from megatron_puffin.diffusion.timesteps import sample_noise_levels


def _broadcast_sigmas(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.to(dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(latents: Latents, noise: Latents, sigmas: torch.Tensor) -> Latents:
    """``x_t = (1 - sigma) x_0 + sigma * eps``, computed in the latents' dtype (as the reference: bf16 latents
    get a bf16 sigma).

    Args:
        latents: clean ``[B, C, H, W]`` or list of ``[C, h_i, w_i]``.
        noise: same structure as ``latents``.
        sigmas: ``[B]`` noise levels.
    """
    if isinstance(latents, torch.Tensor):
        sigma = _broadcast_sigmas(sigmas, latents)
        return (1.0 - sigma) * latents + sigma * noise
    flat_latents, flat_noise = flatten(latents), flatten(noise)
    sizes = numels(latents, flat_latents.device)
    sigma = sigmas.to(dtype=flat_latents.dtype, device=flat_latents.device).repeat_interleave(sizes)
    return split_like((1.0 - sigma) * flat_latents + sigma * flat_noise, list(latents))


def velocity_target(latents: Latents, noise: Latents) -> Latents:
    """``v = eps - x_0`` (same structure as the inputs)."""
    if isinstance(latents, torch.Tensor):
        return noise - latents
    return split_like(flatten(noise) - flatten(latents), list(latents))


def per_sample_mse(prediction: Latents, target: Latents) -> torch.Tensor:
    """Mean squared error of each sample over all of its elements, in float32.

    Returns:
        ``[B]`` float32.
    """
    if isinstance(prediction, torch.Tensor) and isinstance(target, torch.Tensor):
        diff = prediction.float() - target.float()
        return diff.pow(2).flatten(1).mean(dim=1)
    flat_pred, flat_target = flatten(prediction).float(), flatten(target).float()
    sizes = numels(prediction, flat_pred.device)
    sample_of = torch.repeat_interleave(torch.arange(len(sizes), device=flat_pred.device), sizes)
    squared = (flat_pred - flat_target).pow(2)
    # index_put with accumulate has a deterministic CUDA kernel (index_add does not).
    sums = squared.new_zeros(len(sizes)).index_put((sample_of,), squared, accumulate=True)
    return sums / sizes


def flow_matching_loss(
    prediction: Latents, target: Latents, weights: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The task loss: mean over samples of the per-sample MSE (optionally weighted per sample).

    Args:
        prediction: model velocity, ``[B, C, H, W]`` or list of ``[C, h_i, w_i]``.
        target: velocity target, same structure.
        weights: optional ``[B]`` per-sample loss weights (default 1, Puffin's setting).

    Returns:
        ``(loss scalar float32, per-sample losses [B] float32)``.
    """
    per_sample = per_sample_mse(prediction, target)
    weighted = per_sample if weights is None else per_sample * weights.to(per_sample)
    return weighted.mean(), per_sample.detach()



@dataclass(frozen=True)
class FlowMatchingInputs:
    """One training batch of the flow-matching objective.

    Attributes:
        noisy: ``x_t`` with the latents' structure (model input).
        target: ``v = eps - x_0`` with the latents' structure.
        timesteps: ``[B]`` float32 model timesteps.
        sigmas: ``[B]`` float32 noise levels.
    """

    noisy: Latents
    target: Latents
    timesteps: torch.Tensor
    sigmas: torch.Tensor


def make_flow_matching_inputs(
    latents: Latents,
    schedule: FlowMatchSchedule,
    generator: Optional[torch.Generator] = None,
    weighting_scheme: str = "none",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> FlowMatchingInputs:
    """Draw noise levels and Gaussian noise for clean latents and build ``(x_t, v, t)``.

    All randomness comes from ``generator`` (noise drawn as one flat buffer, then split for lists).

    Args:
        latents: clean ``[B, C, H, W]`` or list of ``[C, h_i, w_i]`` (e.g. VAE posterior samples).
        schedule: the training table.
        generator: on the latents' device.
        weighting_scheme, logit_mean, logit_std, mode_scale: see :func:`sample_noise_levels`.
    """
    first = latents if isinstance(latents, torch.Tensor) else latents[0]
    batch = latents.shape[0] if isinstance(latents, torch.Tensor) else len(latents)
    levels = sample_noise_levels(
        schedule, batch, weighting_scheme, generator, logit_mean, logit_std, mode_scale, device=first.device
    )
    flat_noise = torch.randn(
        flatten(latents).numel(), generator=generator, dtype=first.dtype, device=first.device
    )
    noise = flat_noise.view_as(latents) if isinstance(latents, torch.Tensor) else split_like(flat_noise, latents)
    return FlowMatchingInputs(
        noisy=add_noise(latents, noise, levels.sigmas),
        target=velocity_target(latents, noise),
        timesteps=levels.timesteps,
        sigmas=levels.sigmas,
    )
