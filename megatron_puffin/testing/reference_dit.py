"""Puffin's reference MMDiT forward ("dynamic" SD3, docs/puffin.md §1.8) on diffusers' ``SD3Transformer2DModel`` modules.

What the reference does, and what our tower replaces (docs/puffin.md §9.1, §9.4): every latent of every sample (target,
then its condition latents) is patch-embedded by its own ``pos_embed`` call; the per-sample streams
``[target | cond_1 | cond_2 ...]`` are right-padded with zeros to the longest; a dense ``[B, 1, L, L]`` boolean
mask (outer product of the validity vector extended with the text tokens, diagonal forced True) is built even when
nothing is padded and given to SDPA in every joint block; ``norm_out`` / ``proj_out`` run on all tokens and each
sample's first ``(h/2)(w/2)`` tokens are unpatchified.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

Latents = Union[torch.Tensor, Sequence[torch.Tensor]]


class DenseMaskJointAttnProcessor:
    """The reference's joint attention: diffusers' SD3 joint attention with a boolean mask given to SDPA."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **unused):
        batch, image_len = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query = torch.cat([heads(attn.to_q(hidden_states)), heads(attn.add_q_proj(encoder_hidden_states))], dim=2)
        key = torch.cat([heads(attn.to_k(hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))], dim=2)
        value = torch.cat([heads(attn.to_v(hidden_states)), heads(attn.add_v_proj(encoder_hidden_states))], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[1] * query.shape[-1])
        image_out, text_out = out[:, :image_len], out[:, image_len:]
        text_out = None if attn.context_pre_only else attn.to_add_out(text_out)
        return attn.to_out[0](image_out), text_out


@contextlib.contextmanager
def dense_mask_processors(transformer) -> Iterator[None]:
    """Run ``transformer``'s joint blocks with :class:`DenseMaskJointAttnProcessor`, restoring them afterwards."""
    blocks = transformer.transformer_blocks
    processors = [block.attn.processor for block in blocks]
    for block in blocks:
        block.attn.processor = DenseMaskJointAttnProcessor()
    try:
        yield
    finally:
        for block, processor in zip(blocks, processors):
            block.attn.processor = processor


def dense_joint_mask(image_valid: torch.Tensor, num_text_tokens: int) -> torch.Tensor:
    """The reference's mask over ``[image stream ; text]``.

    Args:
        image_valid: ``[B, L_img]`` bool, True on real (unpadded) image-stream tokens.
        num_text_tokens: T, all valid.

    Returns:
        ``[B, 1, L_img + T, L_img + T]`` bool: outer product of validity with the diagonal forced True.
    """
    text = torch.ones(image_valid.shape[0], num_text_tokens, dtype=torch.bool, device=image_valid.device)
    valid = torch.cat([image_valid, text], dim=1)
    mask = valid[:, None, :, None] & valid[:, None, None, :]
    return mask | torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)[None, None]


def unpatchify(tokens: torch.Tensor, height: int, width: int, patch: int, channels: int) -> torch.Tensor:
    """``[(h/p)(w/p), p*p*C]`` tokens (channel order p, q, c) -> ``[C, h, w]``."""
    grid_h, grid_w = height // patch, width // patch
    tokens = tokens.reshape(grid_h, grid_w, patch, patch, channels)
    return torch.einsum("hwpqc->chpwq", tokens).reshape(channels, height, width)


def reference_dynamic_forward(
    transformer,
    hidden_states: Latents,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    timestep: torch.Tensor,
    cond_hidden_states: Optional[Sequence[Sequence[torch.Tensor]]] = None,
) -> Latents:
    """Velocities of the targets, computed the reference's way (module docstring).

    Args:
        transformer: a diffusers ``SD3Transformer2DModel`` (its modules are used; its ``forward`` is not).
        hidden_states: noisy targets, ``[B, C, H, W]`` or a list of ``[C, h_i, w_i]``.
        encoder_hidden_states: ``[B, T, joint_attention_dim]``.
        pooled_projections: ``[B, pooled_projection_dim]``.
        timestep: ``[B]`` on the 0..1000 scale.
        cond_hidden_states: per sample, a list of clean ``[C, h, w]`` condition latents (or None).

    Returns:
        ``[B, C, H, W]`` when all targets share a shape, else a list of ``[C, h_i, w_i]``.
    """
    targets = list(hidden_states)
    conds = cond_hidden_states if cond_hidden_states is not None else [[] for _ in targets]
    streams = [torch.cat([transformer.pos_embed(latent[None]) for latent in [target, *cond]], dim=1)[0]
               for target, cond in zip(targets, conds)]
    lengths = [stream.shape[0] for stream in streams]
    longest = max(lengths)
    tokens = torch.stack([F.pad(stream, (0, 0, 0, longest - stream.shape[0])) for stream in streams])
    valid = torch.arange(longest, device=tokens.device)[None] < torch.tensor(lengths, device=tokens.device)[:, None]
    temb = transformer.time_text_embed(timestep, pooled_projections)
    context = transformer.context_embedder(encoder_hidden_states)
    kwargs = {"attention_mask": dense_joint_mask(valid, context.shape[1])}
    with dense_mask_processors(transformer):
        for block in transformer.transformer_blocks:
            context, tokens = block(hidden_states=tokens, encoder_hidden_states=context, temb=temb,
                                    joint_attention_kwargs=kwargs)
    out = transformer.proj_out(transformer.norm_out(tokens, temb))
    patch, channels = transformer.config.patch_size, transformer.out_channels
    velocities: List[torch.Tensor] = []
    for i, target in enumerate(targets):
        height, width = target.shape[-2:]
        num_target = (height // patch) * (width // patch)
        velocities.append(unpatchify(out[i, :num_target], height, width, patch, channels))
    if all(v.shape == velocities[0].shape for v in velocities):
        return torch.stack(velocities)
    return velocities
