"""Puffin's query path (reference names) <-> our :class:`~megatron_puffin.models.connector.QueryConditioner`.

Reference names (the ``Puffin-*.pth`` state dicts, docs/puffin.md §1.5-1.7, §1.11) and ours, per connector ``k`` and
layer ``i`` (``meta_queries``, ``llm2connector_k.*`` and ``projector_k.*`` keep their names)::

    connector_k.layers.i.layer_norm1.{weight,bias}          connector_k.layers.i.input_layernorm.{weight,bias}
    connector_k.layers.i.self_attn.{q,k,v}_proj.{w,b}       connector_k.layers.i.self_attention.linear_qkv.{w,b}
    connector_k.layers.i.self_attn.out_proj.{w,b}           connector_k.layers.i.self_attention.linear_proj.{w,b}
    connector_k.layers.i.layer_norm2.{weight,bias}          connector_k.layers.i.pre_mlp_layernorm.{weight,bias}
    connector_k.layers.i.mlp.fc1.{weight,bias}              connector_k.layers.i.mlp.linear_fc1.{weight,bias}
    connector_k.layers.i.mlp.fc2.{weight,bias}              connector_k.layers.i.mlp.linear_fc2.{weight,bias}

``linear_qkv`` is megatron-core's fused projection, interleaved per head ``[h0: q, k, v | h1: q, k, v | ...]``
(every head is its own query group). The conversion is a permutation, so a round trip is bit-exact.

Our names are relative to the ``QueryConditioner``. Unsharded state dicts are TP=1; the tensor table (name ->
unsharded shape, tensor-parallel split axis) drives the checks, :func:`shard_connector_state_dict` and
:func:`unshard_connector_state_dicts` (through :mod:`megatron_puffin.convert.common`).
"""
from __future__ import annotations

from typing import Iterable, List, Mapping, Sequence

import torch

from megatron_puffin.convert.common import (
    REPLICATED,
    ConversionError,
    StateDict,
    Table,
    check_against_table,
    encoder_layer_table,
    interleave_qkv,
    linear_entries,
    load_checked,
    shard_by_table,
    split_qkv,
    unshard_by_table,
)
from megatron_puffin.models.connector.config import ConnectorConfig

_CONNECTORS = ("connector_1", "connector_2")


def connector_tensor_table(
    config: ConnectorConfig, llm_hidden_size: int, pre_process: bool = True, post_process: bool = True
) -> Table:
    """Every tensor of a :class:`QueryConditioner` (our names): ``name -> (unsharded shape, TP axis or None)``."""
    hidden = config.hidden_size
    table: Table = {}
    if pre_process:
        table["meta_queries"] = ((config.num_queries, llm_hidden_size), REPLICATED)
    if not post_process:
        return table
    outputs = {"1": config.pooled_projection_dim, "2": config.joint_attention_dim}
    for index, out_features in outputs.items():
        table.update(linear_entries(f"llm2connector_{index}", hidden, llm_hidden_size, REPLICATED))
        for layer in range(config.num_layers):
            table.update(encoder_layer_table(f"connector_{index}.layers.{layer}.", hidden, config.ffn_hidden_size))
        table.update(linear_entries(f"projector_{index}", out_features, hidden, REPLICATED))
    return table


_LAYER_RENAMES = {
    # reference (under connector_k.layers.i.)  : ours (same prefix)
    "layer_norm1.weight": "input_layernorm.weight",
    "layer_norm1.bias": "input_layernorm.bias",
    "self_attn.out_proj.weight": "self_attention.linear_proj.weight",
    "self_attn.out_proj.bias": "self_attention.linear_proj.bias",
    "layer_norm2.weight": "pre_mlp_layernorm.weight",
    "layer_norm2.bias": "pre_mlp_layernorm.bias",
    "mlp.fc1.weight": "mlp.linear_fc1.weight",
    "mlp.fc1.bias": "mlp.linear_fc1.bias",
    "mlp.fc2.weight": "mlp.linear_fc2.weight",
    "mlp.fc2.bias": "mlp.linear_fc2.bias",
}


def _layer_prefixes(config: ConnectorConfig) -> Iterable[str]:
    for connector in _CONNECTORS:
        for layer in range(config.num_layers):
            yield f"{connector}.layers.{layer}."


def _take(source: Mapping[str, torch.Tensor], key: str, consumed: set) -> torch.Tensor:
    if key not in source:
        raise ConversionError(f"reference -> mcore: missing tensor {key}")
    consumed.add(key)
    return source[key]


def reference_to_mcore(
    state_dict: Mapping[str, torch.Tensor],
    config: ConnectorConfig,
    llm_hidden_size: int,
    pre_process: bool = True,
    post_process: bool = True,
) -> StateDict:
    """Reference query-path tensors (``meta_queries``, ``llm2connector_k``, ``connector_k``, ``projector_k``)
    -> our unsharded ``QueryConditioner`` state dict for the given pipeline role.

    Raises:
        ConversionError: tensors left over, missing or of the wrong shape (all listed).
    """
    wanted = connector_tensor_table(config, llm_hidden_size, pre_process, post_process)
    consumed: set = set()
    ours: StateDict = {}
    for name in wanted:
        if not name.startswith("connector_"):
            ours[name] = _take(state_dict, name, consumed)
    if post_process:
        heads = config.num_attention_heads
        for prefix in _layer_prefixes(config):
            for ref_name, our_name in _LAYER_RENAMES.items():
                ours[prefix + our_name] = _take(state_dict, prefix + ref_name, consumed)
            for kind in ("weight", "bias"):
                q, k, v = (_take(state_dict, f"{prefix}self_attn.{p}_proj.{kind}", consumed) for p in "qkv")
                ours[f"{prefix}self_attention.linear_qkv.{kind}"] = interleave_qkv(q, k, v, heads)
    leftover = sorted(set(state_dict) - consumed)
    if leftover:
        raise ConversionError(f"reference -> mcore: {len(leftover)} unmatched tensor(s): {', '.join(leftover)}")
    return check_against_table(ours, wanted, "reference -> mcore")


def mcore_to_reference(
    state_dict: Mapping[str, torch.Tensor],
    config: ConnectorConfig,
    llm_hidden_size: int,
    pre_process: bool = True,
    post_process: bool = True,
) -> StateDict:
    """Our unsharded ``QueryConditioner`` state dict -> the reference's names (``_extra_state`` dropped).

    Raises:
        ConversionError: names or shapes that do not match the table (all listed).
    """
    ours = check_against_table(
        state_dict, connector_tensor_table(config, llm_hidden_size, pre_process, post_process), "mcore -> reference"
    )
    reference: StateDict = {name: tensor for name, tensor in ours.items() if not name.startswith("connector_")}
    if post_process:
        for prefix in _layer_prefixes(config):
            for ref_name, our_name in _LAYER_RENAMES.items():
                reference[prefix + ref_name] = ours[prefix + our_name]
            for kind in ("weight", "bias"):
                qkv = split_qkv(ours[f"{prefix}self_attention.linear_qkv.{kind}"], config.num_attention_heads)
                for part, tensor in zip("qkv", qkv):
                    reference[f"{prefix}self_attn.{part}_proj.{kind}"] = tensor
    return reference


def shard_connector_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: ConnectorConfig,
    llm_hidden_size: int,
    tensor_model_parallel_size: int,
    pre_process: bool = True,
    post_process: bool = True,
) -> List[StateDict]:
    """Split our unsharded ``QueryConditioner`` state dict into one per tensor-parallel rank."""
    config.check(tensor_model_parallel_size)
    table = connector_tensor_table(config, llm_hidden_size, pre_process, post_process)
    return shard_by_table(state_dict, table, tensor_model_parallel_size, "shard connectors")


def unshard_connector_state_dicts(
    shards: Sequence[Mapping[str, torch.Tensor]],
    config: ConnectorConfig,
    llm_hidden_size: int,
    check_replicated: bool = True,
    pre_process: bool = True,
    post_process: bool = True,
) -> StateDict:
    """Join per-rank ``QueryConditioner`` state dicts (or gradients by parameter name) into an unsharded one."""
    table = connector_tensor_table(config, llm_hidden_size, pre_process, post_process)
    return unshard_by_table(shards, table, check_replicated, "unshard connectors")


def load_connector_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load one rank's ``QueryConditioner`` state dict, every tensor accounted for."""
    load_checked(model, state_dict)
