"""The Qwen2.5 LLM tower on megatron-core's ``GPTModel``.

``GPTModel`` provides the embedding, the decoder ``TransformerBlock`` (split over pipeline stages), the output
layer and the tied-embedding bookkeeping across pipeline stages. Puffin needs a different forward:

* input embeddings instead of token ids (image and query embeddings are scattered in before the LLM);
* explicit per-sample position ids, applied to RoPE exactly as HF does;
* right-padded rows (:mod:`.padding`): causal attention alone is exact, so no mask tensor reaches the fused
  kernels; any other padding (e.g. left) takes an explicit ``[b, 1, s, s]`` mask, local spec only (slow path);
* final hidden states (for the meta-query positions) or logits, optionally only at selected positions;
* logits of padded vocabulary rows never visible.

Tensors are sequence-first inside the decoder (``[s, b, h]``), as in megatron-core.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_puffin.models.llm.config import LLMConfig
from megatron_puffin.models.llm.llm_layer_specs import SDPACausalAttention, get_llm_decoder_block_spec
from megatron_puffin.models.llm.padding import is_right_padded
from megatron_puffin.models.llm.swiglu import use_local_swiglu
from megatron_puffin.models.sequence_parallel import gather_sequence, sequence_parallel_size, split_sequence

PADDED_VOCAB_LOGIT = -1e9


def build_attention_mask(padding_mask: Optional[torch.Tensor], seq_length: int) -> Optional[torch.Tensor]:
    """The megatron-core attention mask (True = masked out) for causal attention with key padding anywhere.

    Only needed when pads can precede real tokens (left padding); right-padded rows need no mask at all.

    Args:
        padding_mask: ``[b, s]`` bool, True on real tokens; None when nothing is padded.
        seq_length: s.

    Returns:
        ``[b, 1, s, s]`` bool, or None (megatron-core then applies its default causal mask).
    """
    if padding_mask is None or bool(padding_mask.all()):
        return None
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool, device=padding_mask.device).tril()
    allowed = causal[None, None] & padding_mask[:, None, None, :].bool()
    # A fully masked row (a left pad attends to no real key) would give NaN in some kernels: let pads see
    # themselves. Their outputs never reach real tokens, whose keys exclude all pads.
    allowed |= torch.eye(seq_length, dtype=torch.bool, device=padding_mask.device)[None, None]
    return ~allowed


class PuffinLLM(GPTModel):
    """Qwen2.5 decoder on megatron-core with Puffin's forward (see module docstring).

    ``pg_collection`` (megatron-core's ``GPTModel`` argument) holds the process groups: tensor parallelism over
    ``tp``, this stage's place in ``pp``, the tied embedding over ``embd``.
    """

    def __init__(
        self,
        llm_config: LLMConfig,
        transformer_config,
        transformer_layer_spec: Union[ModuleSpec, TransformerBlockSubmodules],
        pre_process: bool = True,
        post_process: bool = True,
        *,
        pg_collection: ProcessGroupCollection,
    ) -> None:
        tp_size = transformer_config.tensor_model_parallel_size
        super().__init__(
            config=transformer_config,
            transformer_layer_spec=transformer_layer_spec,
            vocab_size=llm_config.padded_vocab_size(tp_size),
            max_sequence_length=llm_config.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=llm_config.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=llm_config.rotary_base,
            # Puffin scatters visual tokens and meta queries into the embeddings first, then splits the sequence
            # (megatron_puffin.models.sequence_parallel); the embedding itself returns the whole sequence.
            scatter_embedding_sequence_parallel=False,
            pg_collection=pg_collection,
        )
        self.llm_config = llm_config
        # Only the local SDPA core attention applies an arbitrary mask; TE's causal attention ignores one.
        layer_specs = getattr(transformer_layer_spec, "layer_specs", None) or [transformer_layer_spec]
        self.accepts_attention_mask = all(
            getattr(spec, "submodules", None) is not None
            and spec.submodules.self_attention.submodules.core_attention is SDPACausalAttention
            for spec in layer_specs
        )

    # -- inputs -------------------------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[b, s] -> [s, b, h]`` (first pipeline stage only)."""
        return self.embedding(input_ids=input_ids, position_ids=None)

    def rotary_from_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """RoPE angles for explicit positions: ``[b, s] -> [s, b, 1, head_dim]`` (HF's rotate-half layout)."""
        inv_freq = self.rotary_pos_emb.inv_freq.to(device=position_ids.device, dtype=torch.float32)
        freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # [b, s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, d]
        return emb.transpose(0, 1)[:, :, None, :].contiguous()

    # -- outputs ------------------------------------------------------------------------------------------
    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits ``[..., h] -> [..., V_padded / TP]``; padded rows get a large negative value."""
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden_states, weight=weight)
        return self._mask_padded_vocab(logits)

    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        vocab = self.llm_config.vocab_size
        partition = logits.shape[-1]
        start = self._vocab_start(partition)
        if start + partition <= vocab:
            return logits
        valid = torch.arange(start, start + partition, device=logits.device) < vocab
        return logits.masked_fill(~valid, PADDED_VOCAB_LOGIT)

    def _vocab_start(self, partition: int) -> int:
        return get_pg_rank(self.pg_collection.tp) * partition

    def _split_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[s, b, h]`` -> this rank's sequence shard under sequence parallelism (s must be a multiple of TP:
        pad the batch first, :func:`~.padding.pad_sequences_to_multiple`)."""
        multiple = sequence_parallel_size(self.config)
        if embeddings.shape[0] % multiple:
            raise ValueError(f"sequence length {embeddings.shape[0]} is not a multiple of --tensor-model-parallel-size "
                             f"({multiple}) as --sequence-parallel needs; pad the batch with pad_sequences_to_multiple")
        return split_sequence(embeddings, self.config, group=self.pg_collection.tp)[0]

    def _attention_mask(self, padding_mask: Optional[torch.Tensor], seq_length: int) -> Optional[torch.Tensor]:
        """None (causal, no mask) unless pads precede real tokens somewhere; then the explicit mask."""
        if padding_mask is None or is_right_padded(padding_mask):
            return None
        if not self.accepts_attention_mask:
            raise ValueError(
                "padding_mask has pads before real tokens, which Transformer Engine's causal attention cannot mask; "
                "right-pad the rows (megatron_puffin.models.llm.padding.RightPadding)"
            )
        return build_attention_mask(padding_mask, seq_length)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        decoder_input: Optional[torch.Tensor] = None,
        output: str = "logits",
    ) -> torch.Tensor:
        """Run this pipeline stage.

        Args:
            input_ids: ``[b, s]`` token ids (first stage, when ``decoder_input`` is None).
            position_ids: ``[b, s]`` long, each sample's own RoPE positions. Needed on every stage.
            padding_mask: ``[b, s]`` bool, True on real tokens; None when nothing is padded or the caller knows the
                rows are right-padded (then no host synchronisation either). Right-padded rows run causal without a
                mask (fused kernels); other layouts get an explicit mask (local spec only, slow; see
                :class:`~.padding.RightPadding` to move left-padded rows).
            decoder_input: ``[s, b, h]`` input embeddings (first stage), replacing ``input_ids``; under sequence
                parallelism this rank's shard ``[s/TP, b, h]`` (s a multiple of TP).
            output: ``"logits"`` (vocab-parallel ``[s, b, V/TP]``) or ``"hidden"`` (final-normed ``[s, b, h]``, the
                whole sequence also under sequence parallelism); ignored on non-last stages, which return their
                hidden states ``[s, b, h]`` (``[s/TP, b, h]`` under sequence parallelism).
        """
        if self.pre_process and decoder_input is None:
            decoder_input = self._split_embeddings(self.embed_tokens(input_ids))
        if position_ids is None:
            raise ValueError("position_ids are required on every pipeline stage (RoPE uses them)")
        seq_length = position_ids.shape[1]
        hidden_states = self.decoder(
            hidden_states=decoder_input,
            attention_mask=self._attention_mask(padding_mask, seq_length),
            rotary_pos_emb=self.rotary_from_positions(position_ids),
        )
        if not self.post_process:
            return hidden_states
        if output == "hidden":
            return gather_sequence(hidden_states, self.config, group=self.pg_collection.tp)
        if output != "logits":
            raise ValueError(f"output must be 'logits' or 'hidden', got {output!r}")
        return self.compute_logits(hidden_states)


def build_llm(
    config: LLMConfig,
    pre_process: bool = True,
    post_process: bool = True,
    transformer_config=None,
    transformer_impl: str = "local",
    *,
    pg_collection: ProcessGroupCollection,
) -> PuffinLLM:
    """Build the LLM tower (this pipeline stage's part of it).

    Args:
        config: the tower's shape.
        pre_process: holds the token embedding (first pipeline stage).
        post_process: holds the final norm and output layer (last pipeline stage).
        transformer_config: megatron-core ``TransformerConfig``; default derived from ``config`` with the
            tensor/pipeline parallel sizes of ``pg_collection`` in fp32.
        transformer_impl: ``local`` or ``transformer_engine``.
        pg_collection: the process groups (from :func:`megatron_puffin.distributed.process_groups`).
    """
    if transformer_config is None:
        transformer_config = config.to_transformer_config(
            tensor_model_parallel_size=get_pg_size(pg_collection.tp),
            pipeline_model_parallel_size=get_pg_size(pg_collection.pp),
        )
    if transformer_impl == "local":
        use_local_swiglu(transformer_config)  # the local spec's copy-free SwiGLU (same numbers as megatron-core's GLU)
    spec = get_llm_decoder_block_spec(transformer_config, transformer_impl, pp_rank=get_pg_rank(pg_collection.pp))
    return PuffinLLM(config, transformer_config, spec, pre_process=pre_process, post_process=post_process,
                     pg_collection=pg_collection)


class _SingleRankCrossEntropy(torch.autograd.Function):
    """megatron-core's vocab-parallel cross-entropy for a vocabulary held whole by one rank (tensor-parallel size 1):
    the same steps through megatron-core's own ``VocabParallelCrossEntropy`` helpers, without its three
    ``all_reduce`` calls, which over a group of one rank change nothing but still cost a collective each (a gloo
    thread hand-off on CPU). The row maximum is ``torch.amax``: megatron-core's ``calculate_logits_max`` takes
    ``torch.max(dim=-1)[0]`` and drops the argmax indices that call also computes, the same values at about 15x the
    time on CPU (1.30 against 0.09 ms for 327 x 4,748 logits, one thread). Bit-identical to
    ``tensor_parallel.vocab_parallel_cross_entropy`` at TP=1.

    ``row_max(logits, dim)`` computes that maximum; ``benchmarks/bench_cross_entropy.py`` passes megatron-core's
    ``torch.max`` form to measure what ``amax`` saves."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, row_max=torch.amax) -> torch.Tensor:
        helpers = tensor_parallel.cross_entropy.VocabParallelCrossEntropy
        logits = logits.float()
        logits_max = row_max(logits, dim=-1)
        target_mask, masked_target_1d, predicted, sum_exp, exp_logits = helpers.calculate_predicted_logits(
            logits, target, logits_max, 0, logits.shape[-1])
        softmax, loss = helpers.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        helpers = tensor_parallel.cross_entropy.VocabParallelCrossEntropy
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_2d, arange_1d, update, grad_input = helpers.prepare_gradient_calculation_operands(softmax, target_mask)
        return helpers.calculate_gradients(grad_2d, arange_1d, masked_target_1d, update, grad_input, grad_output), \
            None, None


def vocab_parallel_token_losses(logits: torch.Tensor, labels: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Per-token cross-entropy over vocab-parallel logits.

    Args:
        logits: ``[s, b, V/TP]`` from :meth:`PuffinLLM.forward` (unshifted).
        labels: ``[b, s]`` next-token targets aligned with the logits (already shifted), -100 = ignored.
        tp_group: the tensor-parallel group the vocabulary is split over; a group of one rank skips megatron-core's
            collectives (:class:`_SingleRankCrossEntropy`, same numbers); None: megatron-core's function with its
            global tensor-parallel group.

    Returns:
        ``[b, s]`` float32 losses, 0 where ignored.
    """
    mask = labels >= 0
    safe = torch.where(mask, labels, torch.zeros_like(labels)).transpose(0, 1).contiguous()
    if tp_group is not None and get_pg_size(tp_group) == 1:
        losses = _SingleRankCrossEntropy.apply(logits.float(), safe)
    else:
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), safe)
    return losses.transpose(0, 1) * mask


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF-style next-token targets: position t predicts labels[t+1]; the last position is ignored."""
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    return shifted
