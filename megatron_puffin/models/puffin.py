"""The composed Puffin model: vision -> LLM <- queries -> connectors -> MMDiT, over pipeline stages.

Placement (docs/puffin.md §1.0): pipeline parallelism splits the LLM decoder layers. The first stage also
holds the vision tower (RADIO + fold + projector) and the 64 meta queries, which it scatters into the LLM input;
the last stage holds the LLM's final norm and output layer, the two connectors with their projections, the MMDiT
and the frozen VAE. Tensor parallelism applies to every tower. A micro-batch carries one task, so every stage runs
the same task at the same time.

The collated batch is left-padded (the data's layout); ``forward`` moves every row's real tokens to the front
(:mod:`megatron_puffin.models.llm.padding`) so the LLM runs causal attention without a mask (fused kernels), and
reads the meta queries at each sample's own positions.

``forward(batch)`` returns, on the last stage (or without pipelining), a dict with the task's mean loss
(``loss``, the tensor to back-propagate), its numerator and denominator for exact averaging over micro-batches and
data-parallel ranks (``loss_sum`` and ``num_tokens`` for understanding, ``num_samples`` for generation), and
``loss_<task>``. Intermediate stages return their hidden states ``[s, b, h]`` for the pipeline schedule.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_pg_size

from megatron_puffin.data import templates
from megatron_puffin.data.task_encoders import GENERATION_TASKS
from megatron_puffin.diffusion import (
    FlowMatchingConfig,
    FlowMatchSchedule,
    add_noise,
    flow_matching_loss,
    sample_density,
    velocity_target,
)
from megatron_puffin.distributed.random import make_generator
from megatron_puffin.models.connector import ConnectorConfig, build_query_conditioner
from megatron_puffin.models.dit import DiTConfig, build_dit
from megatron_puffin.models.fp8 import FP8_TOWERS, fp8_token_multiple, tower_fp8
from megatron_puffin.models.llm import (
    LLMConfig,
    RightPadding,
    build_llm,
    gather_positions,
    pad_sequences_to_multiple,
    shift_labels,
    vocab_parallel_token_losses,
)
from megatron_puffin.models.puffin_config import PuffinModelConfig
from megatron_puffin.models.vae import FrozenVAE
from megatron_puffin.models.vision import VisionConfig, build_vision

logger = logging.getLogger(__name__)

UNDERSTANDING_TASKS = ("image2text", "image2text_cross_view", "text2text")
CACHED_MOMENTS = {"vae_target": "target_moments", "vae_camera": "camera_moments", "vae_init": "init_moments"}
"""Posterior-noise purpose -> the batch key of its cached VAE moments (``data.latents``)."""


@dataclass
class PuffinConfig:
    """Everything needed to build the composed model (one config object per tower)."""

    llm: LLMConfig
    vision: VisionConfig
    connector: ConnectorConfig
    dit: DiTConfig
    flow: FlowMatchingConfig
    model: PuffinModelConfig
    seed: int = 1234
    params_dtype: torch.dtype = torch.float32
    transformer_impl: str = "local"
    fp8: Optional[str] = None
    fp8_recipe: str = "delayed"
    fp8_towers: Tuple[str, ...] = FP8_TOWERS
    """Towers whose GEMMs run in FP8 when ``fp8`` is set (see :mod:`megatron_puffin.models.fp8`)."""

    def tower_fp8(self, tower: str) -> Optional[str]:
        return tower_fp8(self.fp8, self.fp8_towers, tower)

    @classmethod
    def from_args(cls, args) -> "PuffinConfig":
        """From parsed ``pretrain_puffin.py`` flags."""
        precision = args.precision
        dtype = torch.bfloat16 if precision.bf16 else torch.float16 if precision.fp16 else torch.float32
        return cls(
            llm=args.llm, vision=args.vision, connector=args.connector, dit=args.dit, flow=args.flow,
            model=args.model, seed=args.training.seed, params_dtype=dtype,
            transformer_impl=precision.transformer_impl, fp8=precision.fp8_format, fp8_recipe=precision.fp8_recipe,
            fp8_towers=tuple(precision.fp8_tower),
        )


def _requires_grad(module: torch.nn.Module, flag: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(flag)


def _build_vae(config: PuffinModelConfig, dtype: torch.dtype, device: torch.device, seed: int) -> Optional[FrozenVAE]:
    """The frozen VAE of ``--vae-path`` / ``--vae-config`` (a random one seeded by ``seed``), or None."""
    if config.vae_path:
        vae = FrozenVAE.from_pretrained(config.vae_path, dtype=dtype, sample_posterior=config.vae_sample_posterior)
    elif config.vae_config:
        import json

        with open(config.vae_config) as handle:
            vae_config = json.load(handle)
        # A random VAE (tiny runs) must be the same on every rank and layout: its own seeded stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = FrozenVAE.from_config(vae_config, dtype=dtype, sample_posterior=config.vae_sample_posterior)
    else:
        return None
    return vae.to(device)


class PuffinModel(MegatronModule):
    """One pipeline stage of Puffin (see the module docstring); every tower is built with ``pg_collection``."""

    def __init__(
        self, config: PuffinConfig, pre_process: bool = True, post_process: bool = True,
        *, pg_collection: ProcessGroupCollection,
    ) -> None:
        tp, pp = get_pg_size(pg_collection.tp), get_pg_size(pg_collection.pp)
        llm_tconfig = config.llm.to_transformer_config(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, params_dtype=config.params_dtype,
            fp8=config.tower_fp8("llm"), fp8_recipe=config.fp8_recipe,
        )
        super().__init__(config=llm_tconfig)
        from megatron.core.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder  # what megatron-core's schedules ask of a model
        self.puffin_config = config
        self.pg_collection = pg_collection
        self.pre_process, self.post_process = pre_process, post_process
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.llm = build_llm(config.llm, pre_process, post_process, llm_tconfig, config.transformer_impl,
                             pg_collection=pg_collection)
        if pre_process:
            self.vision = build_vision(
                config.vision, config.llm.hidden_size, self._fp8_transformer_config(config.vision, "vision"),
                transformer_impl=config.transformer_impl,
                params_dtype=config.params_dtype, device=self.device, pg_collection=pg_collection,
            )
        # The meta queries live on the first stage, the connectors and projections on the last.
        self.conditioner = build_query_conditioner(
            config.connector, config.llm.hidden_size, pre_process=pre_process, post_process=post_process,
            transformer_config=self._fp8_transformer_config(config.connector, "connector"),
            transformer_impl=config.transformer_impl, params_dtype=config.params_dtype, device=self.device,
            pg_collection=pg_collection,
        )
        if post_process:
            self.dit = build_dit(config.dit, self._fp8_transformer_config(config.dit, "dit"),
                                 transformer_impl=config.transformer_impl,
                                 params_dtype=config.params_dtype, device=self.device, pg_collection=pg_collection)
            # Not a submodule: the VAE is frozen, never checkpointed with the model, never seen by DDP.
            self._vae = [_build_vae(config.model, config.params_dtype, self.device, config.seed)]
            self.schedule = FlowMatchSchedule(config.flow.num_train_timesteps, config.flow.shift)
        self._cast_parameters(config.params_dtype)
        self.apply_freezing()

    def _fp8_transformer_config(self, tower_config, tower: str):
        """The ``TransformerConfig`` of an FP8 tower (its own ``fp8``); None (the builder's default, no FP8) else."""
        fp8 = self.puffin_config.tower_fp8(tower)
        if fp8 is None:
            return None
        return tower_config.to_transformer_config(
            tensor_model_parallel_size=get_pg_size(self.pg_collection.tp),
            params_dtype=self.puffin_config.params_dtype, fp8=fp8, fp8_recipe=self.puffin_config.fp8_recipe,
            use_cpu_initialization=self.device.type == "cpu",
        )

    def _cast_parameters(self, dtype: torch.dtype) -> None:
        """Every parameter in ``params_dtype`` (megatron-core's torch-norm fallback of the local spec creates fp32
        RMSNorm weights; its mixed-precision optimizer maps optimizer state to parameters assuming one dtype).
        Buffers keep their dtype (camera/CLIP constants, position tables), unlike a whole-module cast."""
        for param in self.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)

    # -- freezing -------------------------------------------------------------------------------------------
    def apply_freezing(self) -> None:
        """``requires_grad=False`` on frozen towers (so DDP makes no gradient buffers and the optimizer no state)."""
        model = self.puffin_config.model
        _requires_grad(self.llm, not model.freeze_llm)
        if self.pre_process:
            _requires_grad(self.vision.encoder, not model.freeze_vision)
        if self.post_process:
            _requires_grad(self.dit, not model.freeze_dit)

    @property
    def vae(self) -> Optional[FrozenVAE]:
        return self._vae[0] if self.post_process else None

    # megatron-core's finalize_model_grads all-reduces the tied embedding across the first and last stages.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.llm.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> torch.nn.Parameter:
        return self.llm.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        self.llm.set_input_tensor(input_tensor)

    # -- first stage: input embeddings -----------------------------------------------------------------------
    def _vision_tokens(self, images, batch: Dict[str, Any]) -> torch.Tensor:
        """Projected visual tokens of all images, flattened sample-major ``[sum of tokens, h]`` (images of different
        sizes give different token counts); the gradient scale applies to understanding losses only (docs/puffin.md §1.4).
        Train-mode CPE randomness comes from a generator keyed by the batch's samples, so every TP/PP layout sees
        the same augmentation."""
        positions = tuple(batch["positions"].tolist())
        if isinstance(images, list):  # mixed sizes: one call per image
            generators = [make_generator(self.puffin_config.seed, "vision", batch["task"], positions, i,
                                         device=self.device) for i in range(len(images))]
            return torch.cat([self._encode_images(image[None], batch, g) for image, g in zip(images, generators)])
        generator = make_generator(self.puffin_config.seed, "vision", batch["task"], positions, device=self.device)
        return self._encode_images(images, batch, generator)

    def _encode_images(self, images: torch.Tensor, batch: Dict[str, Any], generator) -> torch.Tensor:
        tokens = self.vision(
            images.to(self.device, self.puffin_config.params_dtype),
            apply_grad_scale=batch["task"] != "image2image",
            generator=generator,
        )
        return tokens.reshape(-1, tokens.shape[-1])

    def embed_inputs(self, batch: Dict[str, Any]) -> torch.Tensor:
        """Token embeddings with visual tokens and meta queries scattered in: ``[s, b, h]``.

        Visual tokens go to the positions holding -200 (understanding) or ``<|image_pad|>`` (image2image) in
        sample-major, token order; meta queries to the -400 slots (docs/puffin.md §2.1 step 4, §2.2 step 4).
        """
        input_ids = batch["input_ids"].to(self.device)
        image_slots = (input_ids == templates.INPUT_IMAGE_TOKEN_INDEX)
        if batch["task"] == "image2image":
            image_slots |= input_ids == self.puffin_config.model.image_pad_token_id
        query_slots = input_ids == templates.QUERY_TOKEN_INDEX
        embeds = self.llm.embed_tokens(input_ids.clamp(min=0)).transpose(0, 1)  # [b, s, h]
        if bool(image_slots.any()):
            tokens = self._vision_tokens(batch["vision_images"], batch)
            if tokens.shape[0] != int(image_slots.sum()):
                raise ValueError(
                    f"{batch['task']}: {int(image_slots.sum())} image placeholders but the vision tower made "
                    f"{tokens.shape[0]} tokens; the data's patch/fold sizes must match the model's"
                )
            embeds = embeds.masked_scatter(image_slots[..., None], tokens.to(embeds.dtype))
        if bool(query_slots.any()):
            queries = self.conditioner.queries(input_ids.shape[0]).to(embeds.dtype)
            embeds = embeds.masked_scatter(query_slots[..., None], queries)
        return embeds.transpose(0, 1).contiguous()

    # -- last stage: losses ---------------------------------------------------------------------------------
    def understanding_loss(self, logits: torch.Tensor, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Token-mean cross-entropy of the supervised answer tokens (docs/puffin.md §2.1 step 6)."""
        target = shift_labels(batch["labels"].to(self.device))
        losses = vocab_parallel_token_losses(logits, target)
        num_tokens = (target >= 0).sum()
        loss_sum = losses.sum()
        return {"loss": loss_sum / num_tokens.clamp(min=1), "loss_sum": loss_sum.detach(), "num_tokens": num_tokens}

    def _generators(self, batch: Dict[str, Any], purpose: str) -> List[torch.Generator]:
        """One generator per sample, a pure function of (seed, purpose, task, the sample's position in its stream,
        its dataset index): identical inside a TP/PP group, distinct across data-parallel ranks (other samples),
        repeated exactly after a resume, and independent of how the global batch is split over DP ranks."""
        keys = zip(batch["positions"].tolist(), batch["sample_indices"].tolist())
        return [
            make_generator(self.puffin_config.seed, purpose, batch["task"], position, index, device=self.device)
            for position, index in keys
        ]

    @staticmethod
    def _randn_each(like, generators: List[torch.Generator]):
        """Gaussian noise shaped like each sample of ``like`` (a [B, ...] tensor or a list), one generator each."""
        noise = [torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device) for x, g in zip(like, generators)]
        return torch.stack(noise) if isinstance(like, torch.Tensor) else noise

    def _latents(self, images, purpose: str, batch: Dict[str, Any]):
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

    def _cached_moments(self, batch: Dict[str, Any], purpose: str, dtype: torch.dtype):
        """(mean, std) from the batch's cached ``[B, 2, C, h, w]`` moments (or a list), or (None, None)."""
        moments = batch.get(CACHED_MOMENTS[purpose])
        if moments is None:
            return None, None
        if isinstance(moments, torch.Tensor):
            moments = moments.to(self.device, dtype)
            return moments[:, 0], moments[:, 1]
        moments = [m.to(self.device, dtype) for m in moments]
        return [m[0] for m in moments], [m[1] for m in moments]

    def condition_latents(self, batch: Dict[str, Any]) -> Optional[List[List[torch.Tensor]]]:
        """Clean condition latents per sample: cam2image -> [camera map]; image2image -> [camera map, init view]."""
        if batch["task"] == "text2image":
            return None
        encoded = [self._latents(batch["camera_maps"], "vae_camera", batch)]
        if batch["task"] == "image2image":
            encoded.append(self._latents(batch["init_images"], "vae_init", batch))
        return [[latents[i] for latents in encoded] for i in range(len(encoded[0]))]

    def flow_matching_inputs(self, latents, batch: Dict[str, Any]):
        """(x_t, v target, timesteps) with per-sample noise levels and noise (docs/puffin.md §2.3)."""
        flow = self.puffin_config.flow
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

    def generation_loss(
        self, hidden: torch.Tensor, batch: Dict[str, Any], layout: RightPadding
    ) -> Dict[str, torch.Tensor]:
        """Per-sample-mean flow matching of the target latents (docs/puffin.md §2.3); the meta queries are each prompt's last
        tokens, read at the sample's own positions of the right-padded ``hidden`` ``[s, b, h]``."""
        num_queries = self.puffin_config.connector.num_queries
        positions = layout.last_positions(num_queries, device=hidden.device)
        queries = gather_positions(hidden, positions).transpose(0, 1)  # [b, q, h]
        pooled, context = self.conditioner(queries)
        targets = self._latents(batch["target_images"], "vae_target", batch)
        cond = self.condition_latents(batch)
        noisy, target, timesteps = self.flow_matching_inputs(targets, batch)
        dtype = self.puffin_config.params_dtype
        noisy = noisy.to(dtype) if isinstance(noisy, torch.Tensor) else [x.to(dtype) for x in noisy]
        cond = None if cond is None else [[c.to(dtype) for c in sample] for sample in cond]
        velocity = self.dit(noisy, context.to(dtype), pooled.to(dtype), timesteps, cond)
        loss, per_sample = flow_matching_loss(velocity, target)
        return {"loss": loss, "loss_sum": per_sample.sum(), "num_samples": torch.tensor(per_sample.numel(), device=per_sample.device)}

    def forward(self, batch: Dict[str, Any]):
        """Run this stage on one task micro-batch (see the module docstring for what it returns)."""
        task = batch["task"]
        generation = task in GENERATION_TASKS
        # The collated rows are left-padded; right padding lets the LLM run causal attention without a mask.
        layout = RightPadding.from_left_padded(batch["attention_mask"])
        batch = layout.apply_to_batch(batch)
        if self.puffin_config.tower_fp8("llm"):  # FP8 GEMMs need row counts of a multiple: more pads at the end
            batch = pad_sequences_to_multiple(batch, fp8_token_multiple(self.puffin_config.fp8_recipe))
        decoder_input = self.embed_inputs(batch) if self.pre_process else None
        output = self.llm(
            decoder_input=decoder_input,
            position_ids=batch["position_ids"].to(self.device),
            padding_mask=None,  # right-padded: causality alone keeps real tokens from the pads
            output="hidden" if generation else "logits",
        )
        if not self.post_process:
            return output
        if generation:
            losses = self.generation_loss(output, batch, layout)
        else:
            losses = self.understanding_loss(output, batch)
        losses[f"loss_{task}"] = losses["loss"].detach()
        return losses


build_vae = _build_vae  # the training VAE outside a model (tools/cache_latents.py)


def build_puffin(
    config: PuffinConfig, pre_process: bool = True, post_process: bool = True,
    *, pg_collection: ProcessGroupCollection,
) -> PuffinModel:
    """Build this pipeline stage of Puffin for the TP/PP layout of ``pg_collection`` (see :class:`PuffinModel`;
    the caller builds the collection once, :func:`megatron_puffin.distributed.process_groups`)."""
    return PuffinModel(config, pre_process=pre_process, post_process=post_process, pg_collection=pg_collection)
