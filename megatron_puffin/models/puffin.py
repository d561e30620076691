"""The composed Puffin model: vision -> LLM <- queries -> connectors -> MMDiT, over pipeline stages.

Placement (docs/puffin.md §1.0): pipeline parallelism splits the LLM decoder layers. The first stage also
holds the vision tower (RADIO + fold + projector) and the 64 meta queries, which it scatters into the LLM input;
the last stage holds the LLM's final norm and output layer, the two connectors with their projections, the MMDiT
and the frozen VAE. Tensor parallelism applies to every tower. A micro-batch carries one task, so every stage runs
the same task at the same time.

The collated batch is left-padded (the data's layout); ``forward`` moves every row's real tokens to the front
(:mod:`megatron_puffin.models.llm.padding`) so the LLM runs causal attention without a mask (fused kernels), and
reads the meta queries at each sample's own positions.

Sequence parallelism (``--sequence-parallel``): the first stage builds the whole input sequence (token embeddings
with visual tokens and meta queries scattered in), pads it to a multiple of TP and splits it over the TP group;
every tower enters and leaves its own sequence split (:mod:`megatron_puffin.models.sequence_parallel`).

``forward(batch)`` takes a typed :class:`~megatron_puffin.models.batch.PuffinBatch` and returns, on the last stage
(or without pipelining), a :class:`PuffinOutput`: the LLM's logits (understanding) or the MMDiT's velocities
(generation, from the noisy latents and timesteps in ``batch.diffusion``). The objective (VAE latents, noise,
losses) sits beside the model in :mod:`megatron_puffin.training.objectives`. Intermediate stages return their
hidden states ``[s, b, h]`` for the pipeline schedule.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_pg_size

from megatron_puffin import tasks
from megatron_puffin.diffusion import FlowMatchingConfig, FlowMatchSchedule
from megatron_puffin.distributed.random import make_generator
from megatron_puffin.models.batch import PuffinBatch
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
)
from megatron_puffin.models.puffin_config import PuffinModelConfig
from megatron_puffin.models.sequence_parallel import (
    sequence_parallel_size,
    split_sequence,
    token_multiple,
    with_sequence_parallel,
)
from megatron_puffin.models.vae import FrozenVAE
from megatron_puffin.models.vision import VisionConfig, build_vision

logger = logging.getLogger(__name__)

CHECKPOINT_MODULES: Dict[str, str] = {"llm": "llm", "vision": "vision", "queries": "conditioner", "dit": "dit"}
"""The units of a whole-model checkpoint (``puffin_meta.json`` ``towers``) -> the :class:`PuffinModel` submodule
holding each (its key prefix in the checkpoint). Checkpoints written so far use these names: they must not change."""


@dataclass(frozen=True)
class PuffinOutput:
    """The last stage's output for one task micro-batch.

    Attributes:
        batch: the batch as the LLM ran it (rows right-padded, maybe padded to an FP8 multiple): its ``labels``
            are aligned with ``logits``.
        logits: understanding, vocab-parallel logits: ``[n, 1, V/TP]`` at the supervised positions only (with
            ``targets``), or ``[s, b, V/TP]`` at every position (sequence parallelism; ``targets`` None).
        targets: ``[1, n]`` next-token targets of ``logits`` at the supervised positions; None: every position,
            targets from ``batch.labels``.
        velocity: generation, the MMDiT's velocities with the noisy latents' structure.
    """

    batch: PuffinBatch
    logits: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None
    velocity: Optional[Union[torch.Tensor, List[torch.Tensor]]] = None


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
    sequence_parallel: bool = False
    """Megatron sequence parallelism in every tower (needs TP > 1; :mod:`megatron_puffin.models.sequence_parallel`)."""
    llm_layers_in_first_stage: Optional[int] = None
    """LLM decoder layers on the first pipeline stage (None: megatron-core's even split)."""
    llm_layers_in_last_stage: Optional[int] = None
    """LLM decoder layers on the last pipeline stage (None: megatron-core's even split)."""

    def tower_fp8(self, tower: str) -> Optional[str]:
        return tower_fp8(self.fp8, self.fp8_towers, tower)



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
            sequence_parallel=config.sequence_parallel and tp > 1,
            num_layers_in_first_pipeline_stage=config.llm_layers_in_first_stage if pp > 1 else None,
            num_layers_in_last_pipeline_stage=config.llm_layers_in_last_stage if pp > 1 else None,
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
                config.vision, config.llm.hidden_size, self._tower_transformer_config(config.vision, "vision"),
                transformer_impl=config.transformer_impl,
                params_dtype=config.params_dtype, device=self.device, pg_collection=pg_collection,
            )
        # The meta queries live on the first stage, the connectors and projections on the last.
        self.conditioner = build_query_conditioner(
            config.connector, config.llm.hidden_size, pre_process=pre_process, post_process=post_process,
            transformer_config=self._tower_transformer_config(config.connector, "connector"),
            transformer_impl=config.transformer_impl, params_dtype=config.params_dtype, device=self.device,
            pg_collection=pg_collection,
        )
        if post_process:
            self.dit = build_dit(config.dit, self._tower_transformer_config(config.dit, "dit"),
                                 transformer_impl=config.transformer_impl,
                                 params_dtype=config.params_dtype, device=self.device, pg_collection=pg_collection)
            # Not a submodule: the VAE is frozen, never checkpointed with the model, never seen by DDP.
            self._vae = [_build_vae(config.model, config.params_dtype, self.device, config.seed)]
            self.schedule = FlowMatchSchedule(config.flow.num_train_timesteps, config.flow.shift)
        self._cast_parameters(config.params_dtype)

    def _tower_transformer_config(self, tower_config, tower: str):
        """The ``TransformerConfig`` of a tower in FP8 (its own ``fp8``) or under sequence parallelism; None (the
        builder's default: no FP8, no sequence parallelism) else."""
        fp8 = self.puffin_config.tower_fp8(tower)
        if fp8 is None and not self.puffin_config.sequence_parallel:
            return None
        config = tower_config.to_transformer_config(
            tensor_model_parallel_size=get_pg_size(self.pg_collection.tp),
            params_dtype=self.puffin_config.params_dtype, fp8=fp8, fp8_recipe=self.puffin_config.fp8_recipe,
            use_cpu_initialization=self.device.type == "cpu",
        )
        return with_sequence_parallel(config, self.puffin_config.sequence_parallel)

    def _cast_parameters(self, dtype: torch.dtype) -> None:
        """Every parameter in ``params_dtype`` (megatron-core's torch-norm fallback of the local spec creates fp32
        RMSNorm weights; its mixed-precision optimizer maps optimizer state to parameters assuming one dtype).
        Buffers keep their dtype (camera/CLIP constants, position tables), unlike a whole-module cast."""
        for param in self.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)

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
    def _vision_tokens(self, images, batch: PuffinBatch) -> torch.Tensor:
        """Projected visual tokens of all images, flattened sample-major ``[sum of tokens, h]`` (images of different
        sizes give different token counts); the gradient scale applies to understanding losses only (docs/puffin.md §1.4).
        Train-mode CPE randomness comes from a generator keyed by the batch's samples, so every TP/PP layout sees
        the same augmentation."""
        positions = tuple(batch.positions.tolist())
        if isinstance(images, list):  # mixed sizes: one call per image
            generators = [make_generator(self.puffin_config.seed, "vision", batch.task, positions, i,
                                         device=self.device) for i in range(len(images))]
            return torch.cat([self._encode_images(image[None], batch, g) for image, g in zip(images, generators)])
        generator = make_generator(self.puffin_config.seed, "vision", batch.task, positions, device=self.device)
        return self._encode_images(images, batch, generator)

    def _encode_images(self, images: torch.Tensor, batch: PuffinBatch, generator) -> torch.Tensor:
        tokens = self.vision(
            images.to(self.device, self.puffin_config.params_dtype),
            apply_grad_scale=batch.task != "image2image",
            generator=generator,
        )
        return tokens.reshape(-1, tokens.shape[-1])

    def embed_inputs(self, batch: PuffinBatch) -> torch.Tensor:
        """Token embeddings with visual tokens and meta queries scattered in: ``[s, b, h]``.

        Visual tokens go to the positions holding -200 (understanding) or ``<|image_pad|>`` (image2image) in
        sample-major, token order; meta queries to the -400 slots (docs/puffin.md §2.1 step 4, §2.2 step 4).
        """
        input_ids = batch.input_ids.to(self.device)
        image_slots = (input_ids == tasks.INPUT_IMAGE_TOKEN_INDEX)
        if batch.task == "image2image":
            image_slots |= input_ids == self.puffin_config.model.image_pad_token_id
        query_slots = input_ids == tasks.QUERY_TOKEN_INDEX
        embeds = self.llm.embed_tokens(input_ids.clamp(min=0)).transpose(0, 1)  # [b, s, h]
        if bool(image_slots.any()):
            tokens = self._vision_tokens(batch.vision_images, batch)
            if tokens.shape[0] != int(image_slots.sum()):
                raise ValueError(
                    f"{batch.task}: {int(image_slots.sum())} image placeholders but the vision tower made "
                    f"{tokens.shape[0]} tokens; the data's patch/fold sizes must match the model's"
                )
            embeds = embeds.masked_scatter(image_slots[..., None], tokens.to(embeds.dtype))
        if bool(query_slots.any()):
            queries = self.conditioner.queries(input_ids.shape[0]).to(embeds.dtype)
            embeds = embeds.masked_scatter(query_slots[..., None], queries)
        return embeds.transpose(0, 1).contiguous()

    # -- last stage: logits and MMDiT velocities -------------------------------------------------------------------
    def supervised_logits(self, hidden: torch.Tensor, batch: PuffinBatch) -> "PuffinOutput":
        """The output layer on the supervised positions only (the answer tokens, a small part of a sequence of image
        tokens and prompt), as the reference's head does: ``[n, 1, V/TP]`` logits and their ``[1, n]`` next-token
        targets, from the LLM's final-normed, gathered ``hidden`` ``[s, b, h]``."""
        target = shift_labels(batch.labels.to(self.device))
        supervised = target >= 0  # [b, s]
        rows = hidden.transpose(0, 1)[supervised]  # [n, h], sample-major
        return PuffinOutput(batch, logits=self.llm.compute_logits(rows[:, None]), targets=target[supervised][None])

    # -- last stage: MMDiT velocities ------------------------------------------------------------------------------
    def velocity(self, hidden: torch.Tensor, batch: PuffinBatch, layout: RightPadding):
        """MMDiT velocities of ``batch.diffusion`` conditioned on the meta queries, which are each prompt's last
        tokens, read at the sample's own positions of the right-padded ``hidden`` ``[s, b, h]`` (docs/puffin.md §2.3)."""
        if batch.diffusion is None:
            raise ValueError(f"{batch.task}: the batch carries no diffusion inputs; prepare it with the training "
                             "objective (megatron_puffin.training.objectives) or the sampler")
        num_queries = self.puffin_config.connector.num_queries
        positions = layout.last_positions(num_queries, device=hidden.device)
        queries = gather_positions(hidden, positions).transpose(0, 1)  # [b, q, h]
        pooled, context = self.conditioner(queries)
        noisy, timesteps, cond = batch.diffusion.noisy_latents, batch.diffusion.timesteps, batch.diffusion.condition_latents
        dtype = self.puffin_config.params_dtype
        noisy = noisy.to(dtype) if isinstance(noisy, torch.Tensor) else [x.to(dtype) for x in noisy]
        cond = None if cond is None else [[c.to(dtype) for c in sample] for sample in cond]
        return self.dit(noisy, context.to(dtype), pooled.to(dtype), timesteps, cond)

    def forward(self, batch: PuffinBatch):
        """Run this stage on one task micro-batch (see the module docstring for what it returns)."""
        generation = tasks.is_generation(batch.task)
        # The collated rows are left-padded; right padding lets the LLM run causal attention without a mask.
        layout = RightPadding.from_left_padded(batch.attention_mask)
        batch = layout.apply_to_batch(batch)
        # FP8 GEMMs need row counts of a multiple, sequence parallelism a multiple of TP: more pads at the end.
        fp8_rows = fp8_token_multiple(self.puffin_config.fp8_recipe) if self.puffin_config.tower_fp8("llm") else 1
        batch = pad_sequences_to_multiple(batch, token_multiple(fp8_rows, sequence_parallel_size(self.config)))
        decoder_input = None
        if self.pre_process:  # the whole sequence with visual tokens and queries in, then this rank's shard
            decoder_input = split_sequence(self.embed_inputs(batch), self.config, group=self.pg_collection.tp)[0]
        sequence_parallel = self.llm.config.sequence_parallel
        output = self.llm(
            decoder_input=decoder_input,
            position_ids=batch.position_ids.to(self.device),
            padding_mask=None,  # right-padded: causality alone keeps real tokens from the pads
            # Understanding: the output layer runs on the supervised rows only, except under sequence parallelism,
            # where the rows are split over TP ranks and the output layer gathers them (all positions).
            output="logits" if sequence_parallel and not generation else "hidden",
        )
        if not self.post_process:
            return output
        if generation:
            return PuffinOutput(batch, velocity=self.velocity(output, batch, layout))
        if sequence_parallel:
            return PuffinOutput(batch, logits=output)
        return self.supervised_logits(output, batch)


build_vae = _build_vae  # the training VAE outside a model (tools/cache_latents.py)


def build_puffin(
    config: PuffinConfig, pre_process: bool = True, post_process: bool = True,
    *, pg_collection: ProcessGroupCollection,
) -> PuffinModel:
    """Build this pipeline stage of Puffin for the TP/PP layout of ``pg_collection`` (see :class:`PuffinModel`;
    the caller builds the collection once, :func:`megatron_puffin.distributed.process_groups`)."""
    return PuffinModel(config, pre_process=pre_process, post_process=post_process, pg_collection=pg_collection)
