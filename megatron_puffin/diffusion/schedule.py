"""The SD3 flow-matching schedule (diffusers' ``FlowMatchEulerDiscreteScheduler`` without dynamic shifting).

Noise level ``sigma`` in [0, 1], ``x_t = (1 - sigma) x_0 + sigma * eps``, model timestep ``t = 1000 * sigma``.
A shift ``s`` maps a uniform level ``u`` to ``sigma = s u / (1 + (s - 1) u)`` (SD3: s = 3), spending more
steps at high noise.

* Training table: ``u_k = k / N`` for ``k = N..1`` (descending), shifted once. For SD3 sigma goes from 1.0 down to
  0.0029940 (timestep 2.994).
* Inference with ``n`` steps (``set_timesteps``): ``n`` points evenly spaced between the training table's first
  and last *timesteps*, divided by N and **shifted again**, plus a final sigma 0. The double shift is diffusers'
  behaviour, which SD3 pipelines (and Puffin's released models) were tuned with; it is reproduced, not fixed.

Numbers are computed with the same dtypes and operation order as diffusers (float32 training table, float64
inference spacing rounded to float32), so they are bit-identical.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class InferenceSchedule:
    """The sampling grid of one generation.

    Attributes:
        timesteps: ``[n]`` float32 model timesteps (1000 * sigma), descending.
        sigmas: ``[n + 1]`` float32 noise levels, descending, ending with 0.
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())


class FlowMatchSchedule:
    """SD3's shifted flow-matching schedule (see module docstring).

    Args:
        num_train_timesteps: N (SD3: 1000).
        shift: s (SD3-medium: 3.0).
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 3.0) -> None:
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps ({num_train_timesteps}) must be at least 1")
        if shift <= 0:
            raise ValueError(f"shift ({shift}) must be positive")
        self.num_train_timesteps = num_train_timesteps
        self.shift = float(shift)
        levels = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        unshifted = torch.from_numpy(levels) / num_train_timesteps
        self.train_sigmas = self.shift_sigmas(unshifted)
        self.train_timesteps = self.train_sigmas * num_train_timesteps

    def shift_sigmas(self, sigmas):
        """``s u / (1 + (s - 1) u)`` elementwise (tensor or numpy array, dtype kept)."""
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    @property
    def sigma_max(self) -> float:
        """First (largest) training sigma."""
        return self.train_sigmas[0].item()

    @property
    def sigma_min(self) -> float:
        """Last (smallest) training sigma (SD3: 0.0029940)."""
        return self.train_sigmas[-1].item()

    def inference_schedule(
        self, num_inference_steps: int, device: torch.device | str | None = None
    ) -> InferenceSchedule:
        """The ``n``-step sampling grid (diffusers' ``set_timesteps(n)``, double shift included).

        Args:
            num_inference_steps: n >= 1.
            device: where the tensors go.
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps ({num_inference_steps}) must be at least 1")
        n_train = self.num_train_timesteps
        spaced = np.linspace(self.sigma_max * n_train, self.sigma_min * n_train, num_inference_steps)
        sigmas = torch.from_numpy(self.shift_sigmas(spaced / n_train)).to(dtype=torch.float32, device=device)
        timesteps = sigmas * n_train
        sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)])
        return InferenceSchedule(timesteps=timesteps, sigmas=sigmas)
