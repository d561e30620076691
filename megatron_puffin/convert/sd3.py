"""diffusers SD3 transformer <-> our DiT tower, at any tensor-parallel size.

Our tower keeps diffusers' parameter names (``transformer_blocks.{i}.attn.to_q.weight``...), so conversion is a
table: every tensor's name, shape and tensor-parallel split axis, derived from the config. The table checks
that a checkpoint has exactly the expected tensors (unmatched ones are an error listing them) and drives
sharding: column-parallel layers (q/k/v of both streams, fc1, the AdaLN modulation linears) split weight and bias
along dim 0; row-parallel layers (``to_out.0``, ``to_add_out``, fc2) split the weight along dim 1 and keep the
bias whole; everything else is replicated. Sharding is contiguous, which for q/k/v is a split by heads.

Unsharded state dicts are TP=1 and hold no Transformer Engine ``_extra_state`` entries.
"""
from __future__ import annotations

import json
import os
from typing import List, Mapping, Sequence, Tuple

import torch

from megatron_puffin.convert.common import (
    COLUMN,
    REPLICATED,
    ROW,
    StateDict,
    Table,
    check_against_table,
    linear_entries,
    load_checked,
    shard_by_table,
    unshard_by_table,
)
from megatron_puffin.convert.hf_io import load_hf_directory
from megatron_puffin.models.dit.config import DiTConfig
from megatron_puffin.models.dit.embeddings import TIMESTEP_CHANNELS

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
BUFFERS = ("pos_embed.pos_embed",)  # persistent buffers: in checkpoints, never in gradients


def _block_table(config: DiTConfig, index: int) -> Table:
    hidden, ffn = config.hidden_size, config.ffn_hidden_size
    last = index == config.num_layers - 1
    prefix = f"transformer_blocks.{index}."
    table = {}
    table.update(linear_entries(prefix + "norm1.linear", 6 * hidden, hidden, COLUMN))
    table.update(linear_entries(prefix + "norm1_context.linear", (2 if last else 6) * hidden, hidden, COLUMN))
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        table.update(linear_entries(f"{prefix}attn.{name}", hidden, hidden, COLUMN))
    table.update(linear_entries(prefix + "attn.to_out.0", hidden, hidden, ROW))
    streams = ["ff"] if last else ["ff", "ff_context"]
    if not last:
        table.update(linear_entries(prefix + "attn.to_add_out", hidden, hidden, ROW))
    for stream in streams:
        table.update(linear_entries(f"{prefix}{stream}.net.0.proj", ffn, hidden, COLUMN))
        table.update(linear_entries(f"{prefix}{stream}.net.2", hidden, ffn, ROW))
    return table


def dit_tensor_table(config: DiTConfig) -> Table:
    """Every tensor of the tower: ``name -> (unsharded shape, TP split axis or None)``."""
    hidden, patch = config.hidden_size, config.patch_size
    grid = config.pos_embed_max_size
    table = {
        "pos_embed.proj.weight": ((hidden, config.in_channels, patch, patch), REPLICATED),
        "pos_embed.proj.bias": ((hidden,), REPLICATED),
        "pos_embed.pos_embed": ((1, grid * grid, hidden), REPLICATED),
    }
    table.update(linear_entries("time_text_embed.timestep_embedder.linear_1", hidden, TIMESTEP_CHANNELS, REPLICATED))
    table.update(linear_entries("time_text_embed.timestep_embedder.linear_2", hidden, hidden, REPLICATED))
    table.update(linear_entries("time_text_embed.text_embedder.linear_1", hidden, config.pooled_projection_dim, REPLICATED))
    table.update(linear_entries("time_text_embed.text_embedder.linear_2", hidden, hidden, REPLICATED))
    table.update(linear_entries("context_embedder", config.caption_projection_dim, config.joint_attention_dim, REPLICATED))
    for index in range(config.num_layers):
        table.update(_block_table(config, index))
    table.update(linear_entries("norm_out.linear", 2 * hidden, hidden, COLUMN))
    table.update(linear_entries("proj_out", patch * patch * config.out_channels, hidden, REPLICATED))
    return table


def _checked_copy(state_dict: Mapping[str, torch.Tensor], config: DiTConfig, what: str) -> StateDict:
    """The tensors of ``state_dict`` named in the table, after checking names and shapes both ways."""
    return check_against_table(state_dict, dit_tensor_table(config), what)


def diffusers_to_mcore(state_dict: Mapping[str, torch.Tensor], config: DiTConfig) -> StateDict:
    """A diffusers ``SD3Transformer2DModel`` state dict as our unsharded (TP=1) DiT state dict.

    Raises:
        ConversionError: names or shapes that do not match the tower built from ``config`` (all listed).
    """
    return _checked_copy(state_dict, config, "diffusers -> mcore")


def mcore_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: DiTConfig) -> StateDict:
    """Our unsharded DiT state dict as a diffusers ``SD3Transformer2DModel`` state dict (``_extra_state`` dropped).

    Raises:
        ConversionError: names or shapes that do not match the table (all listed).
    """
    return _checked_copy(state_dict, config, "mcore -> diffusers")


def shard_dit_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: DiTConfig, tensor_model_parallel_size: int
) -> List[StateDict]:
    """Split an unsharded DiT state dict into one state dict per tensor-parallel rank.

    Returns:
        ``tensor_model_parallel_size`` state dicts, rank order; split tensors are contiguous copies.
    """
    config.check(tensor_model_parallel_size)
    return shard_by_table(state_dict, dit_tensor_table(config), tensor_model_parallel_size, "shard")


def unshard_dit_state_dicts(
    shards: Sequence[Mapping[str, torch.Tensor]],
    config: DiTConfig,
    check_replicated: bool = True,
    parameters_only: bool = False,
) -> StateDict:
    """Join per-rank DiT state dicts (or per-rank gradients by parameter name) into one unsharded dict.

    Args:
        shards: one mapping per tensor-parallel rank, in rank order.
        config: the tower's shape.
        check_replicated: require replicated tensors to be identical on every rank.
        parameters_only: the mappings hold parameters only (e.g. gradients), not the ``pos_embed`` buffer.

    Raises:
        ConversionError: a rank lacks a tensor, or replicated copies differ.
    """
    table = {k: v for k, v in dit_tensor_table(config).items() if not (parameters_only and k in BUFFERS)}
    return unshard_by_table(shards, table, check_replicated, "unshard")


def load_dit_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load one rank's DiT state dict into a built model, every tensor accounted for (only Transformer Engine
    ``_extra_state`` entries may be absent).

    Raises:
        ConversionError: unexpected or missing tensors.
    """
    load_checked(model, state_dict)


def load_diffusers_transformer(folder: str) -> Tuple[DiTConfig, StateDict]:
    """Read a diffusers ``transformer/`` folder (``config.json`` + one or several safetensors files).

    Returns:
        ``(config, our unsharded state dict)``.
    """
    config_dict, state_dict = load_hf_directory(folder)
    config = DiTConfig.from_diffusers(config_dict)
    return config, diffusers_to_mcore(state_dict, config)


def save_diffusers_transformer(folder: str, state_dict: Mapping[str, torch.Tensor], config: DiTConfig) -> None:
    """Write our unsharded DiT state dict as a diffusers ``transformer/`` folder (``config.json`` + safetensors)
    that ``SD3Transformer2DModel.from_pretrained`` reads."""
    from safetensors.torch import save_file

    tensors = mcore_to_diffusers(state_dict, config)
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, DIFFUSERS_WEIGHTS))
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(config.to_diffusers(), handle, indent=2)
