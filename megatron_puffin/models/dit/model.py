"""The SD3 MMDiT ("dynamic" Puffin variant) on megatron-core.

Computes what diffusers' ``SD3Transformer2DModel`` computes with the same weights, extended as in docs/puffin.md §1.8:
per-sample latent sizes, clean condition latents appended after the target tokens of each sample (same
patchifier, same centre-cropped positions, same AdaLN modulation by the noisy sample's timestep), and output
for the target tokens only. ``norm_out``/``proj_out`` run on target tokens only (per-token operations, so the
result equals running them on every token and slicing, as the reference does). For the same reason the last block
computes its image-stream output for the targets' prefix of the stream only (:mod:`.attention`), as every
query of attention and every token of the MLP is computed independently of the others.

Tensor parallelism: see :mod:`.attention` (q/k/v column-parallel by heads, row-parallel outputs) and
:mod:`.joint_block` (MLPs column/row-parallel, modulation sharded + gathered). The embeddings, context embedder
and ``proj_out`` are small and replicated. Sequence-first ``[s, b, h]`` inside the blocks.

Sequence parallelism: both streams enter the blocks split over TP (the image stream padded to a multiple of TP
with masked keys) and the image stream is gathered after the last block, before ``norm_out``.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import List, Optional, Union

import torch
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_size
from torch import nn

from megatron_puffin.models.common.build import resolve_device
from megatron_puffin.models.dit.config import DiTConfig
from megatron_puffin.models.dit.dit_layer_specs import get_dit_layer_spec
from megatron_puffin.models.dit.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from megatron_puffin.models.dit.image_stream import (
    CondLatents,
    ImageStreamLayout,
    Latents,
    build_layout,
    place_tokens,
    stack_group_latents,
    unpatchify,
)
from megatron_puffin.models.dit.joint_block import AdaLayerNormContinuous
from megatron_puffin.models.dit.parallel_utils import ShardedModuleList
from megatron_puffin.models.fp8 import fp8_token_multiple
from megatron_puffin.models.sequence_parallel import (
    gather_sequence,
    sequence_parallel_size,
    split_sequence,
    token_multiple,
    with_sequence_parallel,
)

logger = logging.getLogger(__name__)

Velocity = Union[torch.Tensor, List[torch.Tensor]]


class MMDiTModel(MegatronModule):
    """SD3 MMDiT with Puffin's dynamic image stream.

    Args:
        dit_config: the tower's shape.
        config: megatron-core config from :meth:`DiTConfig.to_transformer_config`.
        block_spec: joint-block spec (:func:`get_dit_layer_spec`).
        pg_collection: the process groups (the blocks split over ``pg_collection.tp``).
    """

    def __init__(
        self, dit_config: DiTConfig, config: TransformerConfig, block_spec: ModuleSpec,
        pg_collection: ProcessGroupCollection,
    ) -> None:
        super().__init__(config=config)
        self.dit_config = dit_config
        self.tp_group = pg_collection.tp
        hidden = dit_config.hidden_size
        self.pos_embed = PatchEmbed(dit_config)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dit_config)
        self.context_embedder = nn.Linear(dit_config.joint_attention_dim, dit_config.caption_projection_dim)
        num_layers = dit_config.num_layers
        self.transformer_blocks = ShardedModuleList(
            [
                build_module(block_spec, config=config, layer_number=i + 1, context_pre_only=i == num_layers - 1,
                             pg_collection=pg_collection)
                for i in range(num_layers)
            ]
        )
        # After the blocks the image stream is whole again (gathered): norm_out is replicated compute.
        self.norm_out = AdaLayerNormContinuous(with_sequence_parallel(config, False), block_spec.submodules.modulation,
                                               self.tp_group)
        patch = dit_config.patch_size
        self.proj_out = nn.Linear(hidden, patch * patch * dit_config.out_channels)
        self.recompute = config.recompute_granularity == "full"

    # -- inputs ---------------------------------------------------------------------------------------------
    def embed_image_stream(
        self, hidden_states: Latents, cond_hidden_states: CondLatents, layout: ImageStreamLayout
    ) -> torch.Tensor:
        """Patch-embed every latent (one call per distinct shape) into the padded ``[L, b, h]`` stream."""
        grouped = stack_group_latents(hidden_states, cond_hidden_states, layout)
        return place_tokens([self.pos_embed(latents) for latents in grouped], layout)

    # -- blocks ---------------------------------------------------------------------------------------------
    def _checkpointed(self, block, *args):
        """Run ``block`` recomputing its activations in backward.

        torch's non-reentrant checkpoint keeps one autograd graph (it only swaps saved activations for a
        recomputation), so gradients are bit-identical to a run without recomputation. megatron-core's reentrant
        ``tensor_parallel.checkpoint`` runs a nested backward per block, which re-associates the sums of
        gradients reaching inputs shared by all blocks (``temb``) and changes their last bits. The blocks have no
        dropout, so megatron's model-parallel RNG tracker needs no restoring; torch restores its default RNG
        states itself. Under FP8, Transformer Engine's checkpoint keeps the FP8 scaling state consistent.
        """
        if self.config.fp8:
            from megatron.core.extensions.transformer_engine import te_checkpoint

            return te_checkpoint(
                block, False, tensor_parallel.get_cuda_rng_tracker, self.tp_group, *args,
            )
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

    def run_blocks(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        query_tokens: Optional[int] = None,
    ) -> torch.Tensor:
        """All joint blocks; returns the image stream ``[L, b, h]`` (the last block drops the text stream). With
        ``query_tokens``, only the stream's first ``query_tokens`` outputs are needed: the last block may return
        only those rows."""
        recompute = self.recompute and self.training and torch.is_grad_enabled()
        fp8_context = nullcontext()
        if self.config.fp8:
            from megatron.core.fp8_utils import get_fp8_context

            fp8_context = get_fp8_context(self.config)
        with fp8_context:
            for block in self.transformer_blocks:
                last = query_tokens if block.context_pre_only else None
                if recompute:
                    hidden_states, encoder_hidden_states = self._checkpointed(
                        block, hidden_states, encoder_hidden_states, temb, attention_mask, last
                    )
                else:
                    hidden_states, encoder_hidden_states = block(
                        hidden_states, encoder_hidden_states, temb, attention_mask, last
                    )
        return hidden_states

    # -- outputs --------------------------------------------------------------------------------------------
    def predict_targets(self, image_stream: torch.Tensor, temb: torch.Tensor, layout: ImageStreamLayout) -> Velocity:
        """``norm_out`` + ``proj_out`` + unpatchify on each sample's target tokens (one call per target shape).

        Returns:
            ``[b, C, H, W]`` when all targets share a shape, else a list of ``[C, h_i, w_i]`` in sample order.
        """
        config = self.dit_config
        groups = layout.target_groups()
        outputs: List[Optional[torch.Tensor]] = [None] * layout.batch_size
        for shape, samples in groups:
            tokens = image_stream[: layout.num_tokens(shape)]
            group_temb = temb
            if len(groups) > 1:
                index = torch.tensor(samples, device=image_stream.device)
                tokens, group_temb = tokens.index_select(1, index), temb.index_select(0, index)
            patches = self.proj_out(self.norm_out(tokens, group_temb))
            latents = unpatchify(patches, shape, config.patch_size, config.out_channels)
            if len(groups) == 1:
                return latents
            for position, sample in enumerate(samples):
                outputs[sample] = latents[position]
        return outputs

    def forward(
        self,
        hidden_states: Latents,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        cond_hidden_states: CondLatents = None,
    ) -> Velocity:
        """Predict the flow-matching velocity of the target latents.

        Args:
            hidden_states: noisy target latents, ``[b, C, H, W]`` or a list of ``[C, h_i, w_i]``.
            encoder_hidden_states: ``[b, T, joint_attention_dim]`` text-sequence conditioning.
            pooled_projections: ``[b, pooled_projection_dim]`` pooled text conditioning.
            timestep: ``[b]`` (or scalar) timesteps on the 0..1000 scale.
            cond_hidden_states: per sample, a list of clean ``[C, h, w]`` condition latents (camera map, initial
                view), appended after the target tokens; None for none.

        Returns:
            Velocity for the targets: ``[b, C, H, W]`` when all target shapes agree, else a list of
            ``[C, h_i, w_i]``.
        """
        # FP8 GEMMs need the image stream's row count of a multiple: key-padded positions at the end.
        # Sequence parallelism splits it over TP: a multiple of TP too (both paddings are masked keys).
        multiple = fp8_token_multiple(self.config.fp8_recipe) if self.config.fp8 else 1
        multiple = token_multiple(multiple, sequence_parallel_size(self.config))
        layout = build_layout(hidden_states, cond_hidden_states, self.dit_config.patch_size, multiple)
        image_stream = self.embed_image_stream(hidden_states, cond_hidden_states, layout)
        timestep = torch.as_tensor(timestep, device=image_stream.device).reshape(-1).expand(layout.batch_size)
        temb = self.time_text_embed(timestep, pooled_projections)
        context = self.context_embedder(encoder_hidden_states).transpose(0, 1)  # [T, b, h]
        attention_mask = layout.key_padding_mask(context.shape[0], image_stream.device)
        image_stream, context = self._split_streams(image_stream, context)
        # Under sequence parallelism the stream is split over TP: its targets' prefix is not this rank's rows.
        query_tokens = layout.target_len if sequence_parallel_size(self.config) == 1 else None
        image_stream = self.run_blocks(image_stream, context, temb, attention_mask, query_tokens)
        image_stream = gather_sequence(image_stream, self.config, group=self.tp_group)
        return self.predict_targets(image_stream, temb, layout)

    def _split_streams(self, image_stream: torch.Tensor, context: torch.Tensor):
        """Both streams -> this rank's sequence shards under sequence parallelism (the image stream is already
        padded to a multiple of TP by its layout; the text stream must divide, or its pads would sit inside the
        joint ``[text ; image]`` keys); unchanged otherwise."""
        shards = sequence_parallel_size(self.config)
        if context.shape[0] % shards:
            raise ValueError(
                f"DiT with --sequence-parallel: {context.shape[0]} text tokens (--connector-num-queries) are not a "
                f"multiple of --tensor-model-parallel-size ({shards})"
            )
        return (split_sequence(image_stream, self.config, group=self.tp_group)[0],
                split_sequence(context, self.config, group=self.tp_group)[0])


def build_dit(
    config: DiTConfig,
    transformer_config: Optional[TransformerConfig] = None,
    transformer_impl: str = "local",
    params_dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    *,
    pg_collection: ProcessGroupCollection,
) -> MMDiTModel:
    """Build the DiT tower for the tensor-parallel layout of ``pg_collection``.

    Args:
        config: the tower's shape.
        transformer_config: megatron-core config; default ``config.to_transformer_config`` at the TP size of
            ``pg_collection.tp`` in ``params_dtype`` (initialised on the CPU exactly when the model goes there).
        transformer_impl: ``local`` or ``transformer_engine``.
        params_dtype: parameter dtype when ``transformer_config`` is not given (default fp32).
        device: where the model lives; default the current CUDA device when CUDA is available, else the CPU.
        pg_collection: the process groups (from :func:`megatron_puffin.distributed.process_groups`).

    Returns:
        The model on ``device`` in the config's parameter dtype.
    """
    device = resolve_device(device)
    if transformer_config is None:
        transformer_config = config.to_transformer_config(
            tensor_model_parallel_size=get_pg_size(pg_collection.tp),
            params_dtype=params_dtype or torch.float32,
            use_cpu_initialization=device.type == "cpu",
        )
    model = MMDiTModel(config, transformer_config, get_dit_layer_spec(transformer_impl), pg_collection)
    return model.to(device=device, dtype=transformer_config.params_dtype)
