"""The SD3 joint transformer block (MMDiT) on megatron-core tensor-parallel layers.

Per block and per stream: AdaLN-Zero modulation from the conditioning vector ``temb``, joint attention
(:mod:`.attention`), a gated residual, a modulated non-affine LayerNorm, a GELU-tanh feed-forward and a second
gated residual. The last block is ``context_pre_only``: its text stream is normalised with a continuous AdaLN
(scale, shift only) and used as keys/values, and produces no output.

Modulation layers are **sharded, then gathered**. Each ``linear`` maps ``temb [b, h]`` to ``k * h`` values
(k = 6, or 2 for the continuous norms). Replicated, they would hold ~30% of SD3-medium's weights on every
tensor-parallel rank (24 blocks x 2 streams x 6h^2); sharded column-parallel they cost 1/TP of that, and since
their output has only ``b`` rows, the all-gather that gives every rank the full shift/scale/gate vectors (every
rank needs all of them: they act on the replicated residual stream) moves ``b * k * h`` values per block, which
is negligible. The all-gather's backward is a split, so gradients reaching ``temb`` are complete on every rank.
Under sequence parallelism the modulated tokens are this rank's sequence shard, so the gathered vectors' gradients
are first summed over TP (:func:`~megatron_puffin.models.sequence_parallel.sum_partial_gradients`).
Modulation layers have ``b`` rows, which FP8 GEMMs cannot take (they need multiples of 16) and which cost
nothing, so the Transformer Engine spec keeps them as megatron-core's local ``ColumnParallelLinear``.

Parameter names mirror diffusers' ``JointTransformerBlock`` (``norm1.linear``, ``norm1_context.linear``,
``attn.*``, ``ff.net.0.proj``, ``ff.net.2``, ``ff_context.*``); the parameter-free norms ``norm2`` /
``norm2_context`` are functional here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from megatron_puffin.models.dit.parallel_utils import ShardedModuleList
from megatron_puffin.models.sequence_parallel import sum_partial_gradients, with_sequence_parallel

NORM_EPS = 1e-6
TPGroup = Optional[torch.distributed.ProcessGroup]
"""A tensor-parallel group (from ``ProcessGroupCollection.tp``); None = no tensor parallelism."""


def layer_norm(hidden_states: torch.Tensor) -> torch.Tensor:
    """Non-affine LayerNorm over the last dim (eps 1e-6), as SD3's ``norm2`` and AdaLN inner norms."""
    return F.layer_norm(hidden_states, hidden_states.shape[-1:], eps=NORM_EPS)


def modulate(hidden_states: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` with per-sample ``[b, h]`` shift/scale on ``[s, b, h]`` tokens."""
    return layer_norm(hidden_states) * (1 + scale[None]) + shift[None]


class AdaLNModulation(MegatronModule):
    """``linear(silu(temb))`` producing ``num_chunks`` modulation vectors: column-parallel, then gathered (see
    module docstring). ``linear`` keeps diffusers' name (``norm1.linear``)."""

    def __init__(
        self, config: TransformerConfig, linear_spec: Union[ModuleSpec, type], num_chunks: int, tp_group: TPGroup
    ) -> None:
        super().__init__(config=config)
        self.num_chunks = num_chunks
        # temb is [b, h], never a sequence shard: the linear itself runs without sequence parallelism.
        self.tp_group = tp_group
        self.linear = build_module(
            linear_spec, config.hidden_size, num_chunks * config.hidden_size,
            config=with_sequence_parallel(config, False),
            init_method=config.init_method, gather_output=False, bias=True, skip_bias_add=False, is_expert=False,
            tp_comm_buffer_name="modulation", tp_group=tp_group,
        )

    def forward(self, temb: torch.Tensor, dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, ...]:
        """``temb [b, h]`` -> ``num_chunks`` tensors ``[b, h]`` (full width on every rank); ``silu(temb)`` is cast
        to ``dtype`` first when given."""
        activated = F.silu(temb)
        partial, _ = self.linear(activated if dtype is None else activated.to(dtype))
        # At TP=1 the gather is the identity; skipping it saves an autograd-function call per use.
        full = partial
        if self.config.tensor_model_parallel_size > 1:
            full = gather_from_tensor_model_parallel_region(partial, group=self.tp_group)
        # Under sequence parallelism the vectors act on this rank's tokens only: sum their gradients over TP.
        return sum_partial_gradients(full, self.config, group=self.tp_group).chunk(self.num_chunks, dim=-1)


class AdaLayerNormZero(AdaLNModulation):
    """AdaLN-Zero: returns the attention input and the remaining gates/shifts/scales."""

    def __init__(self, config: TransformerConfig, linear_spec: Union[ModuleSpec, type], tp_group: TPGroup) -> None:
        super().__init__(config, linear_spec, num_chunks=6, tp_group=tp_group)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor):
        """
        Args:
            hidden_states: ``[s, b, h]``.
            temb: ``[b, h]``.

        Returns:
            ``(normed [s, b, h], gate_msa, shift_mlp, scale_mlp, gate_mlp)``, the latter ``[b, h]``.
        """
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = super().forward(temb)
        return modulate(hidden_states, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormContinuous(AdaLNModulation):
    """Continuous AdaLN (``scale, shift`` in that order, as diffusers): the final norm and the text-stream norm
    of the ``context_pre_only`` block."""

    def __init__(self, config: TransformerConfig, linear_spec: Union[ModuleSpec, type], tp_group: TPGroup) -> None:
        super().__init__(config, linear_spec, num_chunks=2, tp_group=tp_group)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``[s, b, h], [b, h] -> [s, b, h]``."""
        scale, shift = super().forward(temb, dtype=hidden_states.dtype)
        return modulate(hidden_states, shift, scale)


class GELUProjection(MegatronModule):
    """Column-parallel projection followed by tanh-GELU (diffusers' ``GELU`` activation module: ``.proj``)."""

    def __init__(self, config: TransformerConfig, linear_spec: Union[ModuleSpec, type], tp_group: TPGroup) -> None:
        super().__init__(config=config)
        self.proj = build_module(
            linear_spec, config.hidden_size, config.ffn_hidden_size, config=config, init_method=config.init_method,
            gather_output=False, bias=True, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="fc1",
            tp_group=tp_group,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[s, b, h] -> [s, b, ffn / TP]``."""
        projected, _ = self.proj(hidden_states)
        return F.gelu(projected, approximate="tanh")


@dataclass
class FeedForwardSubmodules:
    """Layers of :class:`FeedForward`."""

    linear_fc1: Union[ModuleSpec, type]
    linear_fc2: Union[ModuleSpec, type]


class FeedForward(MegatronModule):
    """GELU-tanh MLP ``h -> 4h -> h``: fc1 column-parallel, fc2 row-parallel (one all-reduce).

    ``net`` mirrors diffusers' ``FeedForward.net`` = ``[GELU(proj), Dropout(0), Linear]``.
    """

    def __init__(self, config: TransformerConfig, submodules: FeedForwardSubmodules, tp_group: TPGroup) -> None:
        super().__init__(config=config)
        fc2 = build_module(
            submodules.linear_fc2, config.ffn_hidden_size, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=True, input_is_parallel=True, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="fc2", tp_group=tp_group,
        )
        self.net = ShardedModuleList([GELUProjection(config, submodules.linear_fc1, tp_group), nn.Identity(), fc2])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[s, b, h] -> [s, b, h]``."""
        intermediate = self.net[0](hidden_states)
        output, _ = self.net[2](intermediate)
        return output


@dataclass
class JointTransformerBlockSubmodules:
    """Layers of :class:`JointTransformerBlock`."""

    modulation: Union[ModuleSpec, type]
    attention: Union[ModuleSpec, type]
    feed_forward: Union[ModuleSpec, type]


class JointTransformerBlock(MegatronModule):
    """One MMDiT block (see module docstring).

    Args:
        config: megatron-core config.
        submodules: layer classes / specs.
        layer_number: 1-based block index.
        context_pre_only: True for the last block.
        pg_collection: the process groups (its linears split over ``pg_collection.tp``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: JointTransformerBlockSubmodules,
        layer_number: int,
        context_pre_only: bool = False,
        *,
        pg_collection: ProcessGroupCollection,
    ) -> None:
        super().__init__(config=config)
        tp_group = pg_collection.tp
        self.layer_number = layer_number
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNormZero(config, submodules.modulation, tp_group)
        if context_pre_only:
            self.norm1_context = AdaLayerNormContinuous(config, submodules.modulation, tp_group)
        else:
            self.norm1_context = AdaLayerNormZero(config, submodules.modulation, tp_group)
        self.attn = build_module(
            submodules.attention, config=config, layer_number=layer_number, context_pre_only=context_pre_only,
            pg_collection=pg_collection,
        )
        self.ff = build_module(submodules.feed_forward, config=config, tp_group=tp_group)
        self.ff_context = (
            None if context_pre_only else build_module(submodules.feed_forward, config=config, tp_group=tp_group)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        query_tokens: Optional[int] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """
        Args:
            hidden_states: ``[L, b, h]`` image stream (target + condition tokens, right-padded).
            encoder_hidden_states: ``[T, b, h]`` text stream.
            temb: ``[b, h]`` conditioning vector (timestep + pooled text).
            attention_mask: ``[b, 1, 1, T + L]`` bool over the joint ``[text ; image]`` keys, True = padded key; None
                when nothing is padded.
            query_tokens: ``context_pre_only`` only: the image-stream outputs needed are the first
                ``query_tokens`` positions (see :mod:`.attention`); None: all.

        Returns:
            ``(hidden_states [L, b, h], encoder_hidden_states [T, b, h] or None for context_pre_only)``; the last
            block's image stream keeps only the rows its attention computed (``query_tokens`` with local attention).
        """
        norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        if self.context_pre_only:
            norm_context = self.norm1_context(encoder_hidden_states, temb)
            attn_output, _ = self.attn(norm_hidden, norm_context, attention_mask, query_tokens)
            # Tokens are independent after attention: the rows attention did not compute are not needed.
            return self._residual_mlp(hidden_states[: attn_output.shape[0]], attn_output, gate_msa, shift_mlp,
                                      scale_mlp, gate_mlp, self.ff), None
        norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, temb
        )
        attn_output, context_attn_output = self.attn(norm_hidden, norm_context, attention_mask)
        hidden_states = self._residual_mlp(hidden_states, attn_output, gate_msa, shift_mlp, scale_mlp, gate_mlp,
                                           self.ff)
        encoder_hidden_states = self._residual_mlp(encoder_hidden_states, context_attn_output, c_gate_msa,
                                                   c_shift_mlp, c_scale_mlp, c_gate_mlp, self.ff_context)
        return hidden_states, encoder_hidden_states

    @staticmethod
    def _residual_mlp(stream, attn_output, gate_msa, shift_mlp, scale_mlp, gate_mlp, feed_forward):
        """One stream after attention: gated residual, modulated norm, feed-forward, gated residual."""
        stream = stream + gate_msa[None] * attn_output
        return stream + gate_mlp[None] * feed_forward(modulate(stream, shift_mlp, scale_mlp))
