"""The training objective beside the model: VAE latents, noise, flow matching and cross-entropy.

:class:`~megatron_puffin.models.puffin.PuffinModel` computes logits (understanding) or MMDiT velocities
(generation). Around it, per task micro-batch on the last pipeline stage:

1. :meth:`PuffinObjective.prepare` (generation only) encodes the target and condition images to normalised VAE
   latents (or reads cached posterior moments, ``--cached-latents``), samples the posterior, draws each sample's
   noise level and noise, and hands the model the noisy latents and timesteps (:class:`DiffusionInputs`);
2. the model runs;
3. :meth:`PuffinObjective.loss` turns its output into an :class:`ObjectiveResult`: the task's mean loss with its
   numerator and denominator, for exact averaging over micro-batches and data-parallel ranks.

Every random draw comes from a generator keyed by (seed, purpose, task, the sample's stream position, its dataset
index): identical inside a TP/PP group, distinct across data-parallel ranks, repeated exactly after a resume.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Tuple, Union

import torch

from megatron_puffin.diffusion import FlowMatchSchedule, add_noise, flow_matching_loss, sample_density, velocity_target
from megatron_puffin.distributed.random import make_generator
from megatron_puffin.models.batch import CACHED_MOMENTS, DiffusionInputs, Images, PuffinBatch
from megatron_puffin.models.llm import shift_labels, vocab_parallel_token_losses
from megatron_puffin.tasks import is_generation


@dataclass(frozen=True)
class ObjectiveResult:
    """One task micro-batch's loss.

    Attributes:
        task: the loss task (``megatron_puffin.tasks``).
        loss: the mean loss to back-propagate (token mean for understanding, sample mean for generation).
        loss_sum: its numerator, detached.
        count: its denominator: supervised tokens (understanding) or samples (generation).
    """

    task: str
    loss: torch.Tensor
    loss_sum: torch.Tensor
    count: torch.Tensor


class PuffinObjective:
    """The losses of the six tasks around one last-stage :class:`~megatron_puffin.models.puffin.PuffinModel`.

    Args:
        model: the (unwrapped) last pipeline stage; its config, device and frozen VAE are read.
    """

    def __init__(self, model) -> None:
        config = model.puffin_config
        self.seed, self.flow, self.device = config.seed, config.flow, model.device
        self.vae = model.vae
        self.tp_group = model.pg_collection.tp
        self.schedule = FlowMatchSchedule(config.flow.num_train_timesteps, config.flow.shift)

    @classmethod
    def for_model(cls, model) -> Optional["PuffinObjective"]:
        """The objective of ``model`` (a PuffinModel, possibly DDP-wrapped); None on a stage without the loss."""
        while not hasattr(model, "puffin_config") and hasattr(model, "module"):
            model = model.module
        return cls(model) if model.post_process else None

    # -- before the model -----------------------------------------------------------------------------------------
    def prepare(self, batch: PuffinBatch) -> Tuple[PuffinBatch, Optional[Images]]:
        """(the batch with its MMDiT inputs, the velocity target) for generation; (batch, None) for understanding."""
        if not is_generation(batch.task):
            return batch, None
        targets = self._latents(batch.target_images, "vae_target", batch)
        cond = self.condition_latents(batch)
        noisy, target, timesteps = self.flow_matching_inputs(targets, batch)
        return batch.replace(diffusion=DiffusionInputs(noisy, timesteps, cond)), target

    def _generators(self, batch: PuffinBatch, purpose: str) -> List[torch.Generator]:
        """One generator per sample, a pure function of (seed, purpose, task, the sample's position in its stream,
        its dataset index): identical inside a TP/PP group, distinct across data-parallel ranks (other samples),
        repeated exactly after a resume, and independent of how the global batch is split over DP ranks."""
        keys = zip(batch.positions.tolist(), batch.sample_indices.tolist())
        return [
            make_generator(self.seed, purpose, batch.task, position, index, device=self.device)
            for position, index in keys
        ]

    @staticmethod
    def _randn_each(like, generators: List[torch.Generator]):
        """Gaussian noise shaped like each sample of ``like`` (a [B, ...] tensor or a list), one generator each."""
        noise = [torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device) for x, g in zip(like, generators)]
        return torch.stack(noise) if isinstance(like, torch.Tensor) else noise

    def _latents(self, images, purpose: str, batch: PuffinBatch):
        """Normalised VAE latents; the posterior is sampled with per-sample noise (docs/puffin.md §1.9). With cached moments
        in the batch (--cached-latents) the VAE encoder does not run."""
        vae = self.vae
        if vae is None:
            raise RuntimeError("generation tasks need a VAE: give --vae-path (or --vae-config for tiny runs)")
        mean, std = self._cached_moments(batch, purpose, vae.dtype)
        if mean is None:
            if isinstance(images, list):
                images = [image.to(self.device, vae.dtype) for image in images]
            else:
                images = images.to(self.device, vae.dtype)
            mean, std = vae.encode_moments(images)
        if not vae.sample_posterior:
            return vae.normalize(mean) if isinstance(mean, torch.Tensor) else [vae.normalize(m) for m in mean]
        eps = self._randn_each(mean, self._generators(batch, purpose))
        if isinstance(mean, torch.Tensor):
            return vae.normalize(mean + std * eps)
        return [vae.normalize(m + s * e) for m, s, e in zip(mean, std, eps)]

    def _cached_moments(self, batch: PuffinBatch, purpose: str, dtype: torch.dtype):
        """(mean, std) from the batch's cached ``[B, 2, C, h, w]`` moments (or a list), or (None, None)."""
        moments = getattr(batch, CACHED_MOMENTS[purpose])
        if moments is None:
            return None, None
        if isinstance(moments, torch.Tensor):
            moments = moments.to(self.device, dtype)
            return moments[:, 0], moments[:, 1]
        moments = [m.to(self.device, dtype) for m in moments]
        return [m[0] for m in moments], [m[1] for m in moments]

    def condition_latents(self, batch: PuffinBatch) -> Optional[List[List[torch.Tensor]]]:
        """Clean condition latents per sample: cam2image -> [camera map]; image2image -> [camera map, init view]."""
        if batch.task == "text2image":
            return None
        encoded = [self._latents(batch.camera_maps, "vae_camera", batch)]
        if batch.task == "image2image":
            encoded.append(self._latents(batch.init_images, "vae_init", batch))
        return [[latents[i] for latents in encoded] for i in range(len(encoded[0]))]

    def flow_matching_inputs(self, latents, batch: PuffinBatch):
        """(x_t, v target, timesteps) with per-sample noise levels and noise (docs/puffin.md §2.3)."""
        flow = self.flow
        generators = self._generators(batch, "flow")
        density = torch.cat([
            sample_density(1, flow.weighting_scheme, g, flow.logit_mean, flow.logit_std, flow.mode_scale, self.device)
            for g in generators
        ])
        steps = self.schedule.num_train_timesteps
        indices = (density * steps).long().clamp_(0, steps - 1)
        sigmas = self.schedule.train_sigmas.to(self.device)[indices]
        timesteps = self.schedule.train_timesteps.to(self.device)[indices]
        noise = self._randn_each(latents, generators)
        return add_noise(latents, noise, sigmas), velocity_target(latents, noise), timesteps

    # -- after the model ------------------------------------------------------------------------------------------
    def loss(self, batch: PuffinBatch, velocity_target: Optional[Images], output) -> ObjectiveResult:
        """The task's loss from the model's last-stage output (:class:`~megatron_puffin.models.puffin.PuffinOutput`)."""
        if is_generation(batch.task):
            return self.generation_loss(batch.task, output.velocity, velocity_target)
        target = output.targets if output.targets is not None else shift_labels(output.batch.labels.to(self.device))
        return self.understanding_loss(batch.task, output.logits, target, self.tp_group)

    @staticmethod
    def understanding_loss(task: str, logits: torch.Tensor, target: torch.Tensor, tp_group=None) -> ObjectiveResult:
        """Token-mean cross-entropy of the supervised answer tokens (docs/puffin.md §2.1 step 6): ``logits``
        ``[s, b, V/TP]`` and their next-token ``target`` ``[b, s]`` (-100: not supervised); ``tp_group``: the
        vocabulary's tensor-parallel group (:func:`~megatron_puffin.models.llm.model.vocab_parallel_token_losses`)."""
        losses = vocab_parallel_token_losses(logits, target, tp_group)
        num_tokens = (target >= 0).sum()
        loss_sum = losses.sum()
        return ObjectiveResult(task, loss_sum / num_tokens.clamp(min=1), loss_sum.detach(), num_tokens)

    @staticmethod
    def generation_loss(task: str, velocity: Images, target: Images) -> ObjectiveResult:
        """Per-sample-mean flow matching of the target latents (docs/puffin.md §2.3)."""
        loss, per_sample = flow_matching_loss(velocity, target)
        count = torch.tensor(per_sample.numel(), device=per_sample.device)
        return ObjectiveResult(task, loss, per_sample.sum(), count)


def puffin_loss(model, batch: Union[Mapping[str, Any], PuffinBatch],
                objective: Optional[PuffinObjective] = None) -> ObjectiveResult:
    """One micro-batch through a whole model (no pipeline split) and its objective: the loss to back-propagate.

    Args:
        model: a PuffinModel holding the first and last stage (or a wrapper of one).
        batch: a collated batch dict or a :class:`PuffinBatch`.
        objective: the model's objective (default: :meth:`PuffinObjective.for_model`).
    """
    objective = objective or PuffinObjective.for_model(model)
    prepared, target = objective.prepare(PuffinBatch.from_collated(batch))
    return objective.loss(prepared, target, model(prepared))
