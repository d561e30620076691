"""Right padding for the LLM: every sample's real tokens first, pads at the end of the row.

Causality alone then keeps real tokens from seeing pads (a pad comes after every real token of its row), so the
decoder needs no attention mask: torch SDPA runs its fused causal kernels (grouped-query heads in place) and
Transformer Engine's ``causal`` mask is exact. Pads attend to real tokens, but nothing reads their outputs: the
understanding loss ignores their labels and the meta queries are read at each sample's own positions
(:meth:`RightPadding.last_positions`).

The data pipeline collates left-padded rows (the reference's layout, docs/puffin.md §8); :meth:`RightPadding.from_left_padded`
moves each row's real tokens to the front with one gather, keeping their order, token ids, labels and position ids,
so every real token sees exactly the keys and RoPE positions it saw before.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, TypeVar

import torch

#: Batch fields laid out ``[b, s]`` along the LLM sequence, moved together.
SEQUENCE_FIELDS = ("input_ids", "labels", "position_ids", "attention_mask")

Batch = TypeVar("Batch")
"""A collated batch dict or a :class:`~megatron_puffin.models.batch.PuffinBatch`."""


def _sequence_fields(batch) -> Dict[str, torch.Tensor]:
    """The batch's present :data:`SEQUENCE_FIELDS`, by name."""
    get = batch.get if isinstance(batch, dict) else lambda key: getattr(batch, key, None)
    return {key: get(key) for key in SEQUENCE_FIELDS if get(key) is not None}


def _with_fields(batch: Batch, changes: Dict[str, Any]) -> Batch:
    """A shallow copy of ``batch`` (a dict or a dataclass) with ``changes``."""
    return dict(batch, **changes) if isinstance(batch, dict) else dataclasses.replace(batch, **changes)


def is_right_padded(padding_mask: torch.Tensor) -> bool:
    """Whether every row of ``padding_mask`` (``[b, s]`` bool, True on real tokens) is real tokens then pads."""
    lengths = padding_mask.sum(dim=1, keepdim=True)
    expected = torch.arange(padding_mask.shape[1], device=padding_mask.device)[None, :] < lengths
    return bool(torch.equal(padding_mask.bool(), expected))


@dataclass(frozen=True)
class RightPadding:
    """A right-padded layout of a ``[b, s]`` batch.

    Attributes:
        lengths: ``[b]`` long, real tokens per sample.
        source_index: ``[b, s]`` long, where each right-padded position is read from in the original row; None when
            the original rows are already right-padded (nothing moves).
    """

    lengths: torch.Tensor
    source_index: Optional[torch.Tensor] = None

    @classmethod
    def from_left_padded(cls, padding_mask: torch.Tensor) -> "RightPadding":
        """The layout moving left-padded rows (pads first, then real tokens) to right padding.

        Args:
            padding_mask: ``[b, s]`` bool, True on real tokens, which must be contiguous at the end of each row.

        Raises:
            ValueError: a row is not left-padded.
        """
        mask = padding_mask.bool()
        seq_length = mask.shape[1]
        lengths = mask.sum(dim=1)
        pads = seq_length - lengths
        positions = torch.arange(seq_length, device=mask.device)[None, :]
        if not torch.equal(mask, positions >= pads[:, None]):
            raise ValueError("attention_mask is not left-padded (pads first, then contiguous real tokens)")
        if not bool(pads.any()):
            return cls(lengths)
        # Row i: positions 0..len-1 read the real tokens (pads_i..s-1), positions len..s-1 read the pads (0..pads_i-1).
        return cls(lengths, (positions + pads[:, None]) % seq_length)

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[b, s, ...]`` in the original layout -> the same rows right-padded."""
        if self.source_index is None:
            return tensor
        index = self.source_index.to(tensor.device)
        index = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand_as(tensor)
        return tensor.gather(1, index)

    def apply_to_batch(self, batch: Batch) -> Batch:
        """A shallow copy of a collated batch with its :data:`SEQUENCE_FIELDS` right-padded."""
        return _with_fields(batch, {key: self.apply(value) for key, value in _sequence_fields(batch).items()})

    def last_positions(self, count: int, device: Optional[torch.device] = None) -> torch.Tensor:
        """Positions of each sample's last ``count`` real tokens (e.g. the meta queries): ``[count, b]`` long."""
        lengths = self.lengths.to(device)
        return lengths[None, :] - count + torch.arange(count, device=device)[:, None]


def pad_sequences_to_multiple(batch: Batch, multiple: int) -> Batch:
    """A right-padded batch with more pads at the end so the sequence length is a multiple of ``multiple`` (FP8
    GEMMs; see :mod:`megatron_puffin.models.fp8`). Pads are invisible to real tokens (causality), so nothing a real
    token computes changes: ``input_ids`` 0, ``labels`` -100, ``attention_mask`` False, ``position_ids``
    continuing the row's count."""
    fields = _sequence_fields(batch)
    seq_length = fields["input_ids"].shape[1]
    extra = -seq_length % multiple if multiple > 1 else 0
    if not extra:
        return batch
    padded = {}
    fills = {"input_ids": 0, "labels": -100, "attention_mask": False}
    for key, tensor in fields.items():
        if key == "position_ids":
            tail = tensor[:, -1:] + torch.arange(1, extra + 1, device=tensor.device)[None, :]
        else:
            tail = torch.full((tensor.shape[0], extra), fills[key], dtype=tensor.dtype, device=tensor.device)
        padded[key] = torch.cat([tensor, tail], dim=1)
    return _with_fields(batch, padded)


def gather_positions(hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per-sample rows of a sequence-first tensor: ``[s, b, h]`` at ``[n, b]`` positions -> ``[n, b, h]``."""
    index = positions.to(hidden_states.device)[..., None].expand(-1, -1, hidden_states.shape[-1])
    return hidden_states.gather(0, index)
