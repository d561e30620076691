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
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_puffin.convert.hf_io import load_hf_directory
from megatron_puffin.models.dit.config import DiTConfig
from megatron_puffin.models.dit.embeddings import TIMESTEP_CHANNELS
from megatron_puffin.models.extra_state import is_extra_state_key

StateDict = Dict[str, torch.Tensor]
COLUMN, ROW, REPLICATED = 0, 1, None
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
BUFFERS = ("pos_embed.pos_embed",)  # persistent buffers: in checkpoints, never in gradients


class ConversionError(ValueError):
    """Tensors that could not be matched between a checkpoint and the tower's table."""


TableEntries = Dict[str, Tuple[tuple, Optional[int]]]


def _linear(name: str, out_features: int, in_features: int, axis: Optional[int]) -> TableEntries:
    bias_axis = COLUMN if axis == COLUMN else REPLICATED
    return {f"{name}.weight": ((out_features, in_features), axis), f"{name}.bias": ((out_features,), bias_axis)}


def _block_table(config: DiTConfig, index: int) -> Dict[str, Tuple[tuple, Optional[int]]]:
    hidden, ffn = config.hidden_size, config.ffn_hidden_size
    last = index == config.num_layers - 1
    prefix = f"transformer_blocks.{index}."
    table = {}
    table.update(_linear(prefix + "norm1.linear", 6 * hidden, hidden, COLUMN))
    table.update(_linear(prefix + "norm1_context.linear", (2 if last else 6) * hidden, hidden, COLUMN))
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        table.update(_linear(f"{prefix}attn.{name}", hidden, hidden, COLUMN))
    table.update(_linear(prefix + "attn.to_out.0", hidden, hidden, ROW))
    streams = ["ff"] if last else ["ff", "ff_context"]
    if not last:
        table.update(_linear(prefix + "attn.to_add_out", hidden, hidden, ROW))
    for stream in streams:
        table.update(_linear(f"{prefix}{stream}.net.0.proj", ffn, hidden, COLUMN))
        table.update(_linear(f"{prefix}{stream}.net.2", hidden, ffn, ROW))
    return table


def dit_tensor_table(config: DiTConfig) -> Dict[str, Tuple[tuple, Optional[int]]]:
    """Every tensor of the tower: ``name -> (unsharded shape, TP split axis or None)``."""
    hidden, patch = config.hidden_size, config.patch_size
    grid = config.pos_embed_max_size
    table = {
        "pos_embed.proj.weight": ((hidden, config.in_channels, patch, patch), REPLICATED),
        "pos_embed.proj.bias": ((hidden,), REPLICATED),
        "pos_embed.pos_embed": ((1, grid * grid, hidden), REPLICATED),
    }
    table.update(_linear("time_text_embed.timestep_embedder.linear_1", hidden, TIMESTEP_CHANNELS, REPLICATED))
    table.update(_linear("time_text_embed.timestep_embedder.linear_2", hidden, hidden, REPLICATED))
    table.update(_linear("time_text_embed.text_embedder.linear_1", hidden, config.pooled_projection_dim, REPLICATED))
    table.update(_linear("time_text_embed.text_embedder.linear_2", hidden, hidden, REPLICATED))
    table.update(_linear("context_embedder", config.caption_projection_dim, config.joint_attention_dim, REPLICATED))
    for index in range(config.num_layers):
        table.update(_block_table(config, index))
    table.update(_linear("norm_out.linear", 2 * hidden, hidden, COLUMN))
    table.update(_linear("proj_out", patch * patch * config.out_channels, hidden, REPLICATED))
    return table


_is_extra_state = is_extra_state_key


def _checked_copy(state_dict: Mapping[str, torch.Tensor], config: DiTConfig, what: str) -> StateDict:
    """The tensors of ``state_dict`` named in the table, after checking names and shapes both ways."""
    table = dit_tensor_table(config)
    names = {k for k in state_dict if not _is_extra_state(k)}
    problems = []
    unmatched = sorted(names - set(table))
    missing = sorted(set(table) - names)
    if unmatched:
        problems.append(f"{len(unmatched)} unmatched tensor(s): {', '.join(unmatched)}")
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing)}")
    for name in sorted(names & set(table)):
        shape = tuple(state_dict[name].shape)
        if shape != table[name][0]:
            problems.append(f"{name} has shape {shape}, expected {table[name][0]}")
    if problems:
        raise ConversionError(f"{what}: " + "; ".join(problems))
    return {name: state_dict[name] for name in table}


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
    full = _checked_copy(state_dict, config, "shard")
    shards: List[StateDict] = [{} for _ in range(tensor_model_parallel_size)]
    for name, (_, axis) in dit_tensor_table(config).items():
        tensor = full[name]
        if axis is None:
            pieces = [tensor] * tensor_model_parallel_size
        else:
            pieces = [piece.contiguous() for piece in tensor.chunk(tensor_model_parallel_size, axis)]
        for rank, piece in enumerate(pieces):
            shards[rank][name] = piece
    return shards


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
    for rank, shard in enumerate(shards):
        lacking = sorted(set(table) - set(shard))
        if lacking:
            raise ConversionError(f"unshard: rank {rank} lacks {len(lacking)} tensor(s): {', '.join(lacking)}")
    joined: StateDict = {}
    for name, (shape, axis) in table.items():
        pieces = [shard[name] for shard in shards]
        if axis is not None:
            joined[name] = torch.cat(pieces, dim=axis)
        elif check_replicated and any(not torch.equal(pieces[0], piece) for piece in pieces[1:]):
            raise ConversionError(f"unshard: replicated tensor {name} differs between tensor-parallel ranks")
        else:
            joined[name] = pieces[0]
        if tuple(joined[name].shape) != shape:
            raise ConversionError(f"unshard: {name} joins to shape {tuple(joined[name].shape)}, expected {shape}")
    return joined


def load_dit_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load one rank's DiT state dict into a built model, every tensor accounted for (only Transformer Engine
    ``_extra_state`` entries may be absent).

    Raises:
        ConversionError: unexpected or missing tensors.
    """
    result = model.load_state_dict(dict(state_dict), strict=False)
    missing = [k for k in result.missing_keys if not _is_extra_state(k)]
    if missing or result.unexpected_keys:
        raise ConversionError(f"load: missing {missing}, unexpected {list(result.unexpected_keys)}")


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
