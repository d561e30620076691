"""Training noise levels: a density ``u`` in [0, 1) per sample, looked up in the discrete training table.

As the SD3 training scripts (and Puffin, docs/puffin.md §2.3) do: ``k = floor(N * u)``, ``t = train_timesteps[k]``,
``sigma = train_sigmas[k]``; the table is descending, so ``u`` near 0 means pure noise. Densities:

* ``none`` (Puffin's setting): ``u ~ U[0, 1)``, i.e. sigma = shifted uniform (mean ~0.677 at shift 3).
* ``logit_normal``: ``u = sigmoid(N(logit_mean, logit_std))`` (SD3 paper's recommended density).
* ``mode``: ``u = 1 - v - mode_scale (cos^2(pi v / 2) - 1 + v)`` with ``v ~ U[0, 1)``.

All draws come from an explicit ``torch.Generator`` (see ``megatron_puffin.distributed.random.make_generator``:
identical inside a tensor/pipeline group, distinct across data-parallel ranks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_puffin.diffusion.schedule import FlowMatchSchedule

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode")
# mode_scale values for which the mode density maps [0, 1) into [0, 1]: at -1 it is cos^2(pi v / 2); above about
# 7.235 it goes below 0 near v = 0.258 (the smallest (1 - v) / (v - sin^2(pi v / 2)) on (0, 1/2)).
MODE_SCALE_RANGE = (-1.0, 7.23)


@dataclass(frozen=True)
class NoiseLevels:
    """Per-sample training noise levels.

    Attributes:
        indices: ``[B]`` long indices into the training table.
        timesteps: ``[B]`` float32 model timesteps (0..1000 scale).
        sigmas: ``[B]`` float32 noise levels.
    """

    indices: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor


def sample_density(
    batch_size: int,
    weighting_scheme: str = "none",
    generator: Optional[torch.Generator] = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw ``u`` in [0, 1) per sample from the chosen density (see module docstring).

    Returns:
        ``[batch_size]`` float32.
    """
    if weighting_scheme == "logit_normal":
        normal = torch.normal(mean=logit_mean, std=logit_std, size=(batch_size,), device=device, generator=generator)
        return torch.sigmoid(normal)
    uniform = torch.rand(size=(batch_size,), device=device, generator=generator)
    if weighting_scheme == "mode":
        return 1 - uniform - mode_scale * (torch.cos(math.pi * uniform / 2) ** 2 - 1 + uniform)
    if weighting_scheme == "none":
        return uniform
    raise ValueError(f"weighting_scheme ({weighting_scheme}) must be one of {', '.join(WEIGHTING_SCHEMES)}")


def sample_noise_levels(
    schedule: FlowMatchSchedule,
    batch_size: int,
    weighting_scheme: str = "none",
    generator: Optional[torch.Generator] = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    device: torch.device | str = "cpu",
) -> NoiseLevels:
    """Training timesteps and sigmas for a batch (no host synchronisation: pure tensor indexing).

    Args:
        schedule: the training table.
        batch_size: B.
        weighting_scheme: ``none`` / ``logit_normal`` / ``mode``.
        generator: source of randomness (on ``device``).
    """
    density = sample_density(batch_size, weighting_scheme, generator, logit_mean, logit_std, mode_scale, device)
    n_train = schedule.num_train_timesteps
    # u in [0, 1) except for rounding of the logit-normal tail at 1.0: keep the index inside the table.
    indices = (density * n_train).long().clamp_(0, n_train - 1)
    table_device = indices.device
    return NoiseLevels(
        indices=indices,
        timesteps=schedule.train_timesteps.to(table_device)[indices],
        sigmas=schedule.train_sigmas.to(table_device)[indices],
    )
