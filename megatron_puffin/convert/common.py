"""What every converter shares: the one :class:`ConversionError`, tensor tables (name -> unsharded shape,
tensor-parallel split axis) and the checks, sharding, unsharding and loading they drive, and megatron-core's
per-head q/k/v interleaving.

A table entry's axis is ``COLUMN`` (0: column-parallel weights and biases), ``ROW`` (1: row-parallel weights) or
``REPLICATED`` (None). Unsharded state dicts are TP=1 and hold no Transformer Engine ``_extra_state`` entries.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_puffin.models.extra_state import is_extra_state_key

StateDict = Dict[str, torch.Tensor]
Table = Dict[str, Tuple[tuple, Optional[int]]]
COLUMN, ROW, REPLICATED = 0, 1, None


class ConversionError(ValueError):
    """Tensors that could not be matched between a checkpoint and a tower's tensor table."""


is_extra_state = is_extra_state_key  # Transformer Engine ``_extra_state`` entries, never part of a conversion


def linear_entries(name: str, out_features: int, in_features: int, axis: Optional[int]) -> Table:
    """Table entries of a linear: column-parallel splits weight and bias along dim 0, row-parallel the weight
    along dim 1 (bias whole), replicated neither."""
    bias_axis = COLUMN if axis == COLUMN else REPLICATED
    return {f"{name}.weight": ((out_features, in_features), axis), f"{name}.bias": ((out_features,), bias_axis)}


def check_against_table(state_dict: Mapping[str, torch.Tensor], table: Table, what: str) -> StateDict:
    """The tensors of ``state_dict`` in table order, after checking names both ways and shapes.

    Raises:
        ConversionError: listing every unmatched tensor, missing tensor and wrong shape.
    """
    names = {k for k in state_dict if not is_extra_state(k)}
    problems = []
    unmatched, missing = sorted(names - set(table)), sorted(set(table) - names)
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


def shard_by_table(state_dict: Mapping[str, torch.Tensor], table: Table, tensor_model_parallel_size: int,
                   what: str) -> List[StateDict]:
    """Split an unsharded state dict into one per tensor-parallel rank (contiguous copies of split tensors)."""
    full = check_against_table(state_dict, table, what)
    tp = tensor_model_parallel_size
    shards: List[StateDict] = [{} for _ in range(tp)]
    for name, (_, axis) in table.items():
        pieces = [full[name]] * tp if axis is None else [p.contiguous() for p in full[name].chunk(tp, axis)]
        for rank, piece in enumerate(pieces):
            shards[rank][name] = piece
    return shards


def unshard_by_table(shards: Sequence[Mapping[str, torch.Tensor]], table: Table, check_replicated: bool,
                     what: str) -> StateDict:
    """Join per-rank state dicts (or per-rank gradients by name) into one unsharded dict.

    Raises:
        ConversionError: a rank lacks a tensor, replicated copies differ, or a joined shape is wrong.
    """
    for rank, shard in enumerate(shards):
        lacking = sorted(set(table) - set(shard))
        if lacking:
            raise ConversionError(f"{what}: rank {rank} lacks {len(lacking)} tensor(s): {', '.join(lacking)}")
    joined: StateDict = {}
    for name, (shape, axis) in table.items():
        pieces = [shard[name] for shard in shards]
        if axis is not None:
            joined[name] = torch.cat(pieces, dim=axis)
        elif check_replicated and any(not torch.equal(pieces[0], piece) for piece in pieces[1:]):
            raise ConversionError(f"{what}: replicated tensor {name} differs between tensor-parallel ranks")
        else:
            joined[name] = pieces[0]
        if tuple(joined[name].shape) != shape:
            raise ConversionError(f"{what}: {name} joins to shape {tuple(joined[name].shape)}, expected {shape}")
    return joined


def check_shapes(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "the weights") -> None:
    """Every tensor of ``state_dict`` that ``model`` has must have the model's shape (``load_state_dict`` would raise
    a multi-line RuntimeError listing every one: weights of another model size than the config says).

    Raises:
        ConversionError: naming the count and the first three mismatches.
    """
    own = model.state_dict()
    mismatched = [f"{name} {tuple(tensor.shape)} vs {tuple(own[name].shape)}" for name, tensor in state_dict.items()
                  if name in own and not is_extra_state(name) and isinstance(tensor, torch.Tensor)
                  and tuple(tensor.shape) != tuple(own[name].shape)]
    if mismatched:
        more = f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
        raise ConversionError(f"{len(mismatched)} tensor(s) of {what} do not fit the model their config describes "
                              f"(shape in the weights vs in the model): {'; '.join(mismatched[:3])}{more}")


def load_checked(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load one rank's state dict with every tensor accounted for (only ``_extra_state`` may be absent).

    Raises:
        ConversionError: unexpected, missing or wrongly shaped tensors.
    """
    check_shapes(model, state_dict)
    result = model.load_state_dict(dict(state_dict), strict=False)
    missing = [k for k in result.missing_keys if not is_extra_state(k)]
    if missing or result.unexpected_keys:
        raise ConversionError(f"load: missing {missing}, unexpected {list(result.unexpected_keys)}")


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Separate q/k/v (``[h, ...]`` each, heads-major) -> megatron-core's per-head ``[3h, ...]`` layout."""
    rest = q.shape[1:]
    per_head = [t.reshape(num_heads, -1, *rest) for t in (q, k, v)]
    return torch.cat(per_head, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave_qkv`: ``[3h, ...] -> (q, k, v)``, each ``[h, ...]``."""
    rest = qkv.shape[1:]
    grouped = qkv.reshape(num_heads, 3, -1, *rest)
    return tuple(grouped[:, index].reshape(-1, *rest) for index in range(3))  # type: ignore[return-value]


def encoder_layer_table(prefix: str, hidden: int, ffn: int) -> Table:
    """Table of one bidirectional encoder layer (our names under ``prefix``): the ViT's and the connectors'."""
    table: Table = {
        f"{prefix}input_layernorm.weight": ((hidden,), REPLICATED),
        f"{prefix}input_layernorm.bias": ((hidden,), REPLICATED),
        f"{prefix}pre_mlp_layernorm.weight": ((hidden,), REPLICATED),
        f"{prefix}pre_mlp_layernorm.bias": ((hidden,), REPLICATED),
    }
    table.update(linear_entries(f"{prefix}self_attention.linear_qkv", 3 * hidden, hidden, COLUMN))
    table.update(linear_entries(f"{prefix}self_attention.linear_proj", hidden, hidden, ROW))
    table.update(linear_entries(f"{prefix}mlp.linear_fc1", ffn, hidden, COLUMN))
    table.update(linear_entries(f"{prefix}mlp.linear_fc2", hidden, ffn, ROW))
    return table
