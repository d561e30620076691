"""Layout of the "dynamic" image stream: per-sample target latents of any size plus clean condition latents,
embedded with the same patchifier and positions, concatenated per sample as ``[target | cond_1 | cond_2 ...]``
and right-padded to the longest sample (docs/puffin.md §1.8 items 1-3, 5).

Latents of equal shape are embedded together (one convolution per distinct shape, not per sample), and their
tokens are placed into the padded ``[L, b, h]`` stream by one ``index_put`` with a precomputed destination
index. A batch whose samples all have one same-shaped latent needs no placement at all. The key-padding mask
exists only when sample lengths differ, and is a broadcast ``[b, 1, 1, T + L]`` vector over the joint
``[text ; image]`` sequence (pads at the end of each row), never ``L x L``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

Latents = Union[torch.Tensor, Sequence[torch.Tensor]]
CondLatents = Optional[Sequence[Optional[Sequence[torch.Tensor]]]]


@dataclass(frozen=True)
class LatentGroup:
    """Latents sharing one shape, embedded in one call.

    Attributes:
        shape: latent ``(h, w)``.
        members: ``(sample, slot)`` per latent; slot 0 is the target, slot k the k-th condition.
        offsets: first token position of each member in its sample's image stream.
    """

    shape: Tuple[int, int]
    members: Tuple[Tuple[int, int], ...]
    offsets: Tuple[int, ...]


@dataclass(frozen=True)
class ImageStreamLayout:
    """Where every latent's tokens live in the padded image stream.

    Attributes:
        batch_size: b.
        patch_size: p.
        seq_lens: image-stream tokens per sample.
        target_shapes: target latent ``(h, w)`` per sample.
        groups: latents grouped by shape, in order of first appearance.
        token_multiple: the stream length is rounded up to a multiple of this (FP8 GEMMs need row counts of a
            multiple; the extra positions are key-padded like any other padding).
    """

    batch_size: int
    patch_size: int
    seq_lens: Tuple[int, ...]
    target_shapes: Tuple[Tuple[int, int], ...]
    groups: Tuple[LatentGroup, ...]
    token_multiple: int = 1

    @property
    def max_len(self) -> int:
        """L: length of the padded image stream (the longest sample, rounded up to ``token_multiple``)."""
        return -(-max(self.seq_lens) // self.token_multiple) * self.token_multiple

    @property
    def target_len(self) -> int:
        """Length of the stream's prefix that holds every sample's target tokens (targets come first in each
        sample), rounded up to ``token_multiple`` like ``max_len``: the only positions whose last-block output
        the model uses."""
        longest = max(self.num_tokens(shape) for shape in self.target_shapes)
        return min(-(-longest // self.token_multiple) * self.token_multiple, self.max_len)

    @property
    def padded(self) -> bool:
        """Whether any sample is shorter than L (a key-padding mask is needed)."""
        return min(self.seq_lens) != self.max_len

    @property
    def dense(self) -> bool:
        """One group holding exactly the targets of all samples in order, unpadded: its embedding is the stream."""
        targets_in_order = tuple((b, 0) for b in range(self.batch_size))
        return not self.padded and len(self.groups) == 1 and self.groups[0].members == targets_in_order

    def num_tokens(self, shape: Tuple[int, int]) -> int:
        """Tokens of a latent of shape ``(h, w)``."""
        return (shape[0] // self.patch_size) * (shape[1] // self.patch_size)

    def scatter_index(self, device: torch.device) -> torch.Tensor:
        """Destination of every embedded token in the flattened ``[L * b]`` stream.

        Group ``g``'s embedding ``[N_g, n_g, h]`` flattened row-major puts token ``t`` of member ``m`` at
        ``(offset_m + t) * b + sample_m``.

        Returns:
            ``[sum_g N_g * n_g]`` long.
        """
        pieces = []
        for group in self.groups:
            positions = torch.arange(self.num_tokens(group.shape), device=device)[:, None]
            offsets = torch.tensor(group.offsets, device=device)[None, :]
            samples = torch.tensor([sample for sample, _ in group.members], device=device)[None, :]
            pieces.append(((positions + offsets) * self.batch_size + samples).reshape(-1))
        return torch.cat(pieces)

    def key_padding_mask(self, num_text_tokens: int, device: torch.device) -> Optional[torch.Tensor]:
        """Joint-attention key mask ``[b, 1, 1, T + L]`` bool over ``[text ; image]``, True = padded image token
        (always at the end of the row); None when unpadded."""
        if not self.padded:
            return None
        joint_lengths = torch.tensor(self.seq_lens, device=device) + num_text_tokens
        joint = torch.arange(num_text_tokens + self.max_len, device=device)[None, :]
        return (joint >= joint_lengths[:, None])[:, None, None, :]

    def target_groups(self) -> List[Tuple[Tuple[int, int], List[int]]]:
        """Samples grouped by target shape, in order of first appearance: ``[(shape, [sample, ...]), ...]``."""
        by_shape: Dict[Tuple[int, int], List[int]] = {}
        for sample, shape in enumerate(self.target_shapes):
            by_shape.setdefault(shape, []).append(sample)
        return list(by_shape.items())


def _spatial(latent: torch.Tensor) -> Tuple[int, int]:
    return int(latent.shape[-2]), int(latent.shape[-1])


def _per_sample_latents(hidden_states: Latents, cond_hidden_states: CondLatents) -> List[List[torch.Tensor]]:
    targets = list(hidden_states.unbind(0)) if isinstance(hidden_states, torch.Tensor) else list(hidden_states)
    if cond_hidden_states is not None and len(cond_hidden_states) != len(targets):
        raise ValueError(
            f"cond_hidden_states has {len(cond_hidden_states)} entries but the batch has {len(targets)} samples; "
            "give one (possibly empty) list of condition latents per sample"
        )
    conds = cond_hidden_states if cond_hidden_states is not None else [None] * len(targets)
    return [[target, *(sample_conds or [])] for target, sample_conds in zip(targets, conds)]


def build_layout(hidden_states: Latents, cond_hidden_states: CondLatents, patch_size: int,
                 token_multiple: int = 1) -> ImageStreamLayout:
    """The layout of a batch (metadata only: shapes, no tensor data is touched).

    Args:
        hidden_states: ``[b, C, H, W]`` or a list of ``[C, h_i, w_i]`` target latents.
        cond_hidden_states: per sample, a list of ``[C, h, w]`` condition latents (or None / empty).
        patch_size: p; every latent side must be a multiple of it.
        token_multiple: round the stream length up to a multiple of this (FP8; 1: no rounding).
    """
    samples = _per_sample_latents(hidden_states, cond_hidden_states)
    groups: Dict[Tuple[int, int], Tuple[list, list]] = {}
    seq_lens = []
    for sample, latents in enumerate(samples):
        position = 0
        for slot, latent in enumerate(latents):
            shape = _spatial(latent)
            if shape[0] % patch_size or shape[1] % patch_size:
                raise ValueError(f"latent of sample {sample} has spatial shape {shape}, not a multiple of {patch_size}")
            members, offsets = groups.setdefault(shape, ([], []))
            members.append((sample, slot))
            offsets.append(position)
            position += (shape[0] // patch_size) * (shape[1] // patch_size)
        seq_lens.append(position)
    return ImageStreamLayout(
        batch_size=len(samples),
        patch_size=patch_size,
        seq_lens=tuple(seq_lens),
        target_shapes=tuple(_spatial(latents[0]) for latents in samples),
        groups=tuple(LatentGroup(shape, tuple(m), tuple(o)) for shape, (m, o) in groups.items()),
        token_multiple=max(1, token_multiple),
    )


def stack_group_latents(
    hidden_states: Latents, cond_hidden_states: CondLatents, layout: ImageStreamLayout
) -> List[torch.Tensor]:
    """The latents of each layout group stacked as ``[n_g, C, h, w]`` (the input tensor itself when dense)."""
    if layout.dense and isinstance(hidden_states, torch.Tensor):
        return [hidden_states]
    samples = _per_sample_latents(hidden_states, cond_hidden_states)
    return [torch.stack([samples[sample][slot] for sample, slot in group.members]) for group in layout.groups]


def place_tokens(group_tokens: List[torch.Tensor], layout: ImageStreamLayout) -> torch.Tensor:
    """Assemble the padded image stream from the groups' embeddings.

    Args:
        group_tokens: per group, ``[N_g, n_g, h]`` tokens.
        layout: the batch layout.

    Returns:
        ``[L, b, h]``; padding positions are zero.
    """
    if layout.dense:
        # The patch embedding's tokens are a permuted view; made contiguous like the scattered stream below, so a
        # compiled block (--compile) sees one memory layout for every task instead of recompiling per layout.
        return group_tokens[0].contiguous()
    hidden = group_tokens[0].shape[-1]
    source = torch.cat([tokens.reshape(-1, hidden) for tokens in group_tokens])
    index = layout.scatter_index(source.device)
    stream = source.new_zeros(layout.max_len * layout.batch_size, hidden)
    return stream.index_put((index,), source).view(layout.max_len, layout.batch_size, hidden)


def unpatchify(tokens: torch.Tensor, shape: Tuple[int, int], patch_size: int, channels: int) -> torch.Tensor:
    """Patch predictions back to latents (channel order ``(p, q, c)`` inside a patch, as SD3).

    Args:
        tokens: ``[N, n, p * p * C]`` for a ``(h, w)`` latent (``N = h/p * w/p``).

    Returns:
        ``[n, C, h, w]``.
    """
    grid_h, grid_w = shape[0] // patch_size, shape[1] // patch_size
    n = tokens.shape[1]
    patches = tokens.transpose(0, 1).reshape(n, grid_h, grid_w, patch_size, patch_size, channels)
    return patches.permute(0, 5, 1, 3, 2, 4).reshape(n, channels, grid_h * patch_size, grid_w * patch_size)
