"""Greedy decoding on the LLM tower, with megatron-core's static KV cache or by full recomputation.

The prompt batch is left-padded (docs/puffin.md §8): ``attention_mask`` is False on pads, ``position_ids`` are
``cumsum(mask) - 1`` clamped at 0. Each step appends one token per sequence at position ``max(previous) + 1`` with
the mask extended by True; a sequence that has produced the end token keeps emitting it, and decoding stops when
every sequence has (docs/puffin.md §6.1).

KV cache: megatron-core's :class:`~megatron.core.inference.contexts.StaticInferenceContext` keeps the (pre-RoPE)
keys and values of every layer; its attention applies the RoPE angles of the whole sequence so far to the cached
keys and of the new positions to the queries, which is why :func:`greedy_decode` hands the decoder the angles of
every position up to the current one. The core attention receives an explicit key-padding mask ``[b, 1, q, k]``
(the local spec's SDPA core treats "no mask" as top-left causal, which is wrong for one query against many keys).

Pipeline stages (validation during a PP > 1 run decodes with the training layout): each stage keeps the cache of its
own layers; per step the hidden states go stage to stage (point-to-point, in the model's parameter dtype) and the
last stage's chosen tokens are broadcast back to every stage, which embeds them (first stage), extends its mask and
positions, and stops when the last stage's tokens say so. The tokens equal one stage's (the same layers in the same
order; tests/distributed/test_inference_parallel.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_puffin.models.batch import PuffinBatch
from megatron_puffin.models.llm.model import build_attention_mask

logger = logging.getLogger(__name__)


@dataclass
class DecodeOutput:
    """Result of :func:`greedy_decode`.

    Attributes:
        tokens: int64 ``[b, n]`` generated ids (n <= max_new_tokens; the end token repeats after a sequence ends).
        lengths: per sequence, generated tokens up to and including its first end token (n if it never ended).
        finished: per sequence, whether it produced the end token.
        logits: when requested, the float32 full-vocabulary logits ``[b, V]`` of every step.
    """

    tokens: torch.Tensor
    lengths: List[int]
    finished: List[bool]
    logits: Optional[List[torch.Tensor]] = None

    def sequences(self) -> List[List[int]]:
        """Each sequence's tokens without the end token and what follows it."""
        rows = zip(self.tokens.tolist(), self.lengths, self.finished)
        return [row[: length - int(done)] for row, length, done in rows]


def _full_vocab(logits: torch.Tensor, vocab_size: int, tp_group) -> torch.Tensor:
    """Vocab-parallel ``[..., V_padded / TP]`` -> float32 ``[..., vocab_size]`` on every rank of ``tp_group``."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron.core.utils import get_pg_size

    if get_pg_size(tp_group) > 1:
        logits = gather_from_tensor_model_parallel_region(logits.contiguous(), group=tp_group)
    return logits[..., :vocab_size].float()


class _CachedLLM:
    """The LLM decoder with a megatron-core static KV cache (see module docstring)."""

    def __init__(self, llm, batch_size: int, max_length: int) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        self.llm = llm
        self.context = StaticInferenceContext(batch_size, max_length)

    def step(self, embeds: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Run ``embeds`` ``[q, b, h]`` (the next q positions; on a later pipeline stage, the previous stage's
        output); ``positions``/``key_mask`` ``[b, k]`` cover all k positions so far (cached + new). Returns this
        stage's hidden states ``[q, b, h]``, final-normed on the last stage."""
        offset, new = self.context.sequence_len_offset, embeds.shape[0]
        if offset == 0:
            attention_mask = build_attention_mask(key_mask, new)
        else:
            attention_mask = ~key_mask[:, None, None, :].bool()  # one query row per sequence, all real keys
        if not self.llm.pre_process:  # megatron-core's block reads a later stage's input from set_input_tensor
            self.llm.decoder.set_input_tensor(embeds)
        hidden = self.llm.decoder(
            hidden_states=embeds, attention_mask=attention_mask, inference_context=self.context,
            rotary_pos_emb=self.llm.rotary_from_positions(positions),
        )
        self.context.sequence_len_offset = offset + new
        return hidden


class _PipelineStages:
    """Greedy decoding over pipeline stages: each step, a stage receives the previous stage's hidden states, runs
    its layers (each stage keeps the KV cache of its own layers) and sends its output on; the last stage picks the
    next tokens and broadcasts them to every stage, so all stages embed, extend their masks and stop together."""

    def __init__(self, model) -> None:
        from megatron.core.utils import get_pg_rank, get_pg_size

        self.group = model.pg_collection.pp
        rank, size = get_pg_rank(self.group), get_pg_size(self.group)
        self.previous = dist.get_global_rank(self.group, rank - 1) if rank > 0 else None
        self.next = dist.get_global_rank(self.group, rank + 1) if rank + 1 < size else None
        self.last = dist.get_global_rank(self.group, size - 1)
        self.device = model.device
        self.dtype = model.puffin_config.params_dtype  # the activations' dtype on every stage

    def receive(self, positions: int, batch_size: int, hidden_size: int) -> torch.Tensor:
        hidden = torch.empty(positions, batch_size, hidden_size, dtype=self.dtype, device=self.device)
        dist.recv(hidden, src=self.previous, group=self.group)
        return hidden

    def send(self, hidden: torch.Tensor) -> None:
        dist.send(hidden.to(self.dtype).contiguous(), dst=self.next, group=self.group)

    def tokens_from_last_stage(self, next_ids: Optional[torch.Tensor], batch_size: int) -> torch.Tensor:
        if next_ids is None:
            next_ids = torch.empty(batch_size, dtype=torch.long, device=self.device)
        dist.broadcast(next_ids, src=self.last, group=self.group)
        return next_ids

    def logits_from_last_stage(self, logits: Optional[torch.Tensor], batch_size: int,
                               vocab_size: int) -> torch.Tensor:
        """The last stage's float32 ``[b, vocab_size]`` logits of this step, on every stage (``keep_logits``)."""
        if logits is None:
            logits = torch.empty(batch_size, vocab_size, dtype=torch.float32, device=self.device)
        dist.broadcast(logits.contiguous(), src=self.last, group=self.group)
        return logits


def _next_tokens(llm, hidden_last: torch.Tensor, vocab_size: int):
    """(argmax ids ``[b]``, float32 logits ``[b, V]``) from the last position's hidden states ``[b, h]``."""
    logits = _full_vocab(llm.compute_logits(hidden_last), vocab_size, llm.pg_collection.tp)
    return logits.argmax(dim=-1), logits


@torch.no_grad()
def greedy_decode(model, batch: Dict[str, Any], end_token_id: int, max_new_tokens: int, vocab_size: int,
                  use_kv_cache: bool = True, keep_logits: bool = False) -> DecodeOutput:
    """Greedy continuation of a left-padded prompt batch.

    Args:
        model: a :class:`~megatron_puffin.models.puffin.PuffinModel` in eval mode, any TP; with pipeline stages,
            every rank of the pipeline calls this with the same batch (the tokens, and with ``keep_logits`` the
            logits, come from the last stage to every stage).
        batch: ``task``, ``input_ids`` / ``attention_mask`` / ``position_ids`` ``[b, s]`` (left padded),
            ``vision_images`` and ``positions`` when the prompt holds image placeholders (as the collator makes).
        end_token_id: ``<|im_end|>``.
        max_new_tokens: at most this many tokens per sequence (and no more than the LLM's
            ``max_position_embeddings`` less the prompt length).
        vocab_size: real vocabulary size (padded rows are never chosen).
        use_kv_cache: decode with the KV cache (default) or recompute the whole sequence every step (then every
            stage sends the whole sequence's hidden states on).
        keep_logits: return every step's logits (on every pipeline stage).
    """
    stages = None if model.pre_process and model.post_process else _PipelineStages(model)
    llm, device = model.llm, model.device
    embeds = model.embed_inputs(PuffinBatch.from_collated(batch)) if model.pre_process else None  # [s, b, h]
    mask = batch["attention_mask"].to(device).bool()
    positions = batch["position_ids"].to(device)
    batch_size = mask.shape[0]
    # No position beyond the LLM's table: also keeps the KV cache (allocated for prompt + new tokens) finite.
    max_new_tokens = max(0, min(max_new_tokens, model.puffin_config.llm.max_position_embeddings - mask.shape[1]))
    cache = _CachedLLM(llm, batch_size, mask.shape[1] + max_new_tokens) if use_kv_cache else None
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    lengths = torch.full((batch_size,), max_new_tokens, dtype=torch.long, device=device)
    tokens: List[torch.Tensor] = []
    logits_kept: List[torch.Tensor] = []
    step_input = embeds
    for step in range(max_new_tokens):
        if not model.pre_process:  # a later pipeline stage: the previous stage's output
            step_input = stages.receive(mask.shape[1] if step == 0 or cache is None else 1, batch_size,
                                        model.puffin_config.llm.hidden_size)
        if cache is not None:
            hidden = cache.step(step_input, positions, mask)
        else:
            if not model.pre_process:  # megatron-core's block reads a later stage's input from set_input_tensor
                llm.decoder.set_input_tensor(step_input)
            hidden = llm(decoder_input=embeds if model.pre_process else step_input, position_ids=positions,
                         padding_mask=mask, output="hidden")
        next_ids = logits = None
        if model.post_process:
            next_ids, logits = _next_tokens(llm, hidden[-1], vocab_size)
        else:
            stages.send(hidden)
        if stages is not None:
            next_ids = stages.tokens_from_last_stage(next_ids, batch_size)
            if keep_logits:
                logits = stages.logits_from_last_stage(logits, batch_size, vocab_size)
        next_ids = torch.where(done, torch.full_like(next_ids, end_token_id), next_ids)
        tokens.append(next_ids)
        if keep_logits:
            logits_kept.append(logits)
        newly = (next_ids == end_token_id) & ~done
        lengths = torch.where(newly, torch.full_like(lengths, step + 1), lengths)
        done |= newly
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        if model.pre_process:
            step_input = llm.embed_tokens(next_ids[:, None])  # [1, b, h]
            if cache is None:
                embeds = torch.cat([embeds, step_input])
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        mask = torch.cat([mask, torch.ones(batch_size, 1, dtype=torch.bool, device=device)], dim=1)
    generated = torch.stack(tokens, dim=1) if tokens else torch.zeros(batch_size, 0, dtype=torch.long, device=device)
    return DecodeOutput(tokens=generated.cpu(), lengths=[min(int(n), generated.shape[1]) for n in lengths],
                        finished=done.tolist(), logits=logits_kept if keep_logits else None)
