"""Euler sampling of the flow ODE with classifier-free guidance (docs/puffin.md §6.2).

Per step ``i`` the model is evaluated on the batch ``[negative; positive]`` (diffusers' order), the guided
velocity is ``v = v_neg + g (v_pos - v_neg)``, and the Euler update is ``x <- x + (sigma_{i+1} - sigma_i) v``.
Numerics follow diffusers' ``FlowMatchEulerDiscreteScheduler.step`` exactly: the sample is upcast to float32,
the product ``dt * v`` is taken in the velocity's dtype (``dt`` is a 0-d float32 tensor, which does not
promote), and the result is cast back to the velocity's dtype.

Condition latents (camera map, initial view) are clean and identical in both branches, so guidance contrasts
the text conditioning only: :func:`guided_dit_velocity` gives both halves the same ``cond_hidden_states``.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from megatron_puffin.diffusion.schedule import FlowMatchSchedule, InferenceSchedule
from megatron_puffin.diffusion.tensor_lists import Latents, concat_batches, flatten, split_batch, split_like

logger = logging.getLogger(__name__)

# (latents of the model batch, timesteps [batch]) -> velocity with the latents' structure.
VelocityFn = Callable[[Latents, torch.Tensor], Latents]


def euler_step(sample: Latents, velocity: Latents, sigma: torch.Tensor, sigma_next: torch.Tensor) -> Latents:
    """One Euler step of the flow ODE, with diffusers' dtype handling (see module docstring).

    Args:
        sample: current latents ``[B, C, H, W]`` or list of ``[C, h_i, w_i]``.
        velocity: predicted velocity, same structure.
        sigma, sigma_next: 0-d float32 noise levels of this and the next step.
    """
    dt = sigma_next - sigma
    if isinstance(sample, torch.Tensor):
        return (sample.to(torch.float32) + dt * velocity).to(velocity.dtype)
    velocity_dtype = velocity[0].dtype
    stepped = flatten(sample).to(torch.float32) + dt * flatten(velocity)
    return split_like(stepped.to(velocity_dtype), list(sample))


def classifier_free_guidance(uncond: Latents, cond: Latents, guidance_scale: float) -> Latents:
    """``uncond + g * (cond - uncond)`` (same structure as the inputs)."""
    if isinstance(uncond, torch.Tensor):
        return uncond + guidance_scale * (cond - uncond)
    guided = flatten(uncond) + guidance_scale * (flatten(cond) - flatten(uncond))
    return split_like(guided, list(uncond))


def _batch_size(latents: Latents) -> int:
    return latents.shape[0] if isinstance(latents, torch.Tensor) else len(latents)


class FlowMatchEulerSampler:
    """Euler sampler over :class:`FlowMatchSchedule`'s inference grid, with optional CFG.

    Args:
        schedule: the flow-matching schedule (SD3: 1000 steps, shift 3).
        num_inference_steps: n (Puffin: 50).
        guidance_scale: g; CFG is used when g > 1 (Puffin: 4.5), as in diffusers.
    """

    def __init__(self, schedule: FlowMatchSchedule, num_inference_steps: int = 50, guidance_scale: float = 4.5):
        self.schedule = schedule
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1

    def guided_velocity(self, velocity_fn: VelocityFn, latents: Latents, timestep: torch.Tensor) -> Latents:
        """The model's velocity at ``timestep``, guided when CFG is on (``velocity_fn`` then sees ``2B`` samples,
        negatives first)."""
        batch = _batch_size(latents)
        if not self.do_classifier_free_guidance:
            return velocity_fn(latents, timestep.expand(batch))
        velocity = velocity_fn(concat_batches(latents, latents), timestep.expand(2 * batch))
        uncond, cond = split_batch(velocity, batch)
        return classifier_free_guidance(uncond, cond, self.guidance_scale)

    @torch.no_grad()
    def sample(
        self, velocity_fn: VelocityFn, latents: Latents, schedule: Optional[InferenceSchedule] = None
    ) -> Latents:
        """Integrate from pure noise (``latents``) to data.

        Args:
            velocity_fn: the model, see :data:`VelocityFn` (and :func:`guided_dit_velocity`).
            latents: initial noise ``[B, C, H, W]`` or list of ``[C, h_i, w_i]``.
            schedule: the grid; default ``self.schedule.inference_schedule(self.num_inference_steps)``.

        Returns:
            The final latents (same structure and dtype as ``latents``).
        """
        first = latents if isinstance(latents, torch.Tensor) else latents[0]
        grid = schedule or self.schedule.inference_schedule(self.num_inference_steps, device=first.device)
        dtype = first.dtype
        for index in range(grid.num_steps):
            velocity = self.guided_velocity(velocity_fn, latents, grid.timesteps[index])
            latents = euler_step(latents, velocity, grid.sigmas[index], grid.sigmas[index + 1])
            latents = _cast(latents, dtype)
        return latents


def _cast(latents: Latents, dtype: torch.dtype) -> Latents:
    if isinstance(latents, torch.Tensor):
        return latents.to(dtype)
    return [latent.to(dtype) for latent in latents]


def guided_dit_velocity(
    model: torch.nn.Module,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    negative_encoder_hidden_states: Optional[torch.Tensor] = None,
    negative_pooled_projections: Optional[torch.Tensor] = None,
    cond_hidden_states: Optional[Sequence[Sequence[torch.Tensor]]] = None,
) -> VelocityFn:
    """A :data:`VelocityFn` over the DiT for :class:`FlowMatchEulerSampler`.

    With negatives given, the function expects the ``[negative; positive]`` batch of ``2B`` latents (CFG): the
    text conditioning is ``[negative; positive]`` and both halves get the same condition latents.

    Args:
        model: the DiT (``forward(hidden_states, encoder_hidden_states, pooled_projections, timestep,
            cond_hidden_states)``).
        encoder_hidden_states: ``[B, T, J]`` positive text conditioning.
        pooled_projections: ``[B, P]`` positive pooled conditioning.
        negative_encoder_hidden_states, negative_pooled_projections: the negative prompt's, or None (no CFG).
        cond_hidden_states: per sample, the clean condition latents, or None.
    """
    text, pooled, conds = encoder_hidden_states, pooled_projections, cond_hidden_states
    if negative_encoder_hidden_states is not None:
        text = torch.cat([negative_encoder_hidden_states, encoder_hidden_states])
        pooled = torch.cat([negative_pooled_projections, pooled_projections])
        conds = None if cond_hidden_states is None else list(cond_hidden_states) * 2

    def velocity(latents: Latents, timestep: torch.Tensor) -> Latents:
        return model(latents, text, pooled, timestep, cond_hidden_states=conds)

    return velocity
