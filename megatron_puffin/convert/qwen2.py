"""Hugging Face Qwen2 <-> our LLM tower (megatron-core local-spec names).

Unsharded state dicts here are TP=1/PP=1 with global layer indices. :func:`shard_llm_state_dict` cuts one into
the part a given (TP rank, PP rank) model holds, and :func:`load_llm_state_dict` loads it into a built model with
every tensor accounted for. Layouts:

* q/k/v: megatron-core interleaves per query group, ``[g0: q heads, k, v | g1: q heads, k, v | ...]``; when TP
  exceeds the number of key/value groups, megatron-core replicates each group over ``TP / groups`` ranks, so the
  sharded layout is built from replicated groups.
* SwiGLU: ``linear_fc1 = [gate; up]``; each TP shard holds ``[gate_shard; up_shard]``.
* Vocabulary: padded with zero rows to a multiple of TP (see ``LLMConfig.padded_vocab_size``); padding is
  stripped again on the way back.
"""
from __future__ import annotations

import re
from typing import Mapping, Tuple

import torch

from megatron_puffin.convert.common import ConversionError, StateDict, check_shapes
from megatron_puffin.models.extra_state import is_extra_state_key
from megatron_puffin.models.llm.config import LLMConfig

_LAYER_MAP = {
    # ours (under decoder.layers.{i}.)      : HF (under model.layers.{i}.)
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def _check_consumed(source: Mapping[str, torch.Tensor], consumed: set, what: str) -> None:
    leftover = sorted(k for k in source if k not in consumed and not is_extra_state_key(k))
    if leftover:
        raise ConversionError(f"{what}: {len(leftover)} unmatched tensor(s): {', '.join(leftover)}")


def _take(source: Mapping[str, torch.Tensor], key: str, consumed: set, what: str) -> torch.Tensor:
    if key not in source:
        raise ConversionError(f"{what}: missing tensor {key}")
    consumed.add(key)
    return source[key]


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: LLMConfig) -> torch.Tensor:
    groups, d = config.num_query_groups, config.head_dim
    per_group = config.num_attention_heads // groups
    rest = q.shape[1:]
    q = q.reshape(groups, per_group * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _split_qkv(qkv: torch.Tensor, config: LLMConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, d = config.num_query_groups, config.head_dim
    per_group = config.num_attention_heads // groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def hf_to_mcore(hf_state_dict: Mapping[str, torch.Tensor], config: LLMConfig) -> StateDict:
    """Convert a Hugging Face ``Qwen2ForCausalLM`` state dict to our unsharded (TP=1, PP=1) LLM state dict.

    A missing ``lm_head.weight`` is accepted when ``config.tie_word_embeddings`` (Qwen2.5-1.5B ships so); any
    tensor left unmatched, or missing, raises :class:`ConversionError` listing them.
    """
    what = "HF Qwen2 -> megatron_puffin"
    consumed: set = set()
    out: StateDict = {"embedding.word_embeddings.weight": _take(hf_state_dict, "model.embed_tokens.weight", consumed, what)}
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"decoder.layers.{i}."
        for our_name, hf_name in _LAYER_MAP.items():
            out[ours + our_name] = _take(hf_state_dict, hf + hf_name, consumed, what)
        for kind in ("weight", "bias") if config.add_qkv_bias else ("weight",):
            q, k, v = (_take(hf_state_dict, f"{hf}self_attn.{p}_proj.{kind}", consumed, what) for p in "qkv")
            out[f"{ours}self_attention.linear_qkv.{kind}"] = _interleave_qkv(q, k, v, config)
        gate = _take(hf_state_dict, hf + "mlp.gate_proj.weight", consumed, what)
        up = _take(hf_state_dict, hf + "mlp.up_proj.weight", consumed, what)
        out[ours + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
    out["decoder.final_layernorm.weight"] = _take(hf_state_dict, "model.norm.weight", consumed, what)
    if config.tie_word_embeddings:
        consumed.add("lm_head.weight")  # optional duplicate of the embedding in tied checkpoints
    else:
        out["output_layer.weight"] = _take(hf_state_dict, "lm_head.weight", consumed, what)
    _check_consumed(hf_state_dict, consumed, what)
    return out


def mcore_to_hf(state_dict: Mapping[str, torch.Tensor], config: LLMConfig) -> StateDict:
    """Convert our unsharded LLM state dict back to Hugging Face ``Qwen2ForCausalLM`` names.

    Padded vocabulary rows are dropped; tied models get no ``lm_head.weight`` (as Qwen2.5 ships).
    """
    what = "megatron_puffin -> HF Qwen2"
    consumed: set = set()
    vocab = config.vocab_size
    out: StateDict = {
        "model.embed_tokens.weight": _take(state_dict, "embedding.word_embeddings.weight", consumed, what)[:vocab]
    }
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"decoder.layers.{i}."
        for our_name, hf_name in _LAYER_MAP.items():
            out[hf + hf_name] = _take(state_dict, ours + our_name, consumed, what)
        for kind in ("weight", "bias") if config.add_qkv_bias else ("weight",):
            qkv = _take(state_dict, f"{ours}self_attention.linear_qkv.{kind}", consumed, what)
            for proj, tensor in zip("qkv", _split_qkv(qkv, config)):
                out[f"{hf}self_attn.{proj}_proj.{kind}"] = tensor.contiguous()
        gate, up = torch.chunk(_take(state_dict, ours + "mlp.linear_fc1.weight", consumed, what), 2, dim=0)
        out[hf + "mlp.gate_proj.weight"] = gate.contiguous()
        out[hf + "mlp.up_proj.weight"] = up.contiguous()
    out["model.norm.weight"] = _take(state_dict, "decoder.final_layernorm.weight", consumed, what)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = _take(state_dict, "output_layer.weight", consumed, what)[:vocab]
    else:
        consumed.add("output_layer.weight")
    _check_consumed(state_dict, consumed, what)
    return out


# -- tensor / pipeline sharding ------------------------------------------------------------------------------
def _pad_vocab(weight: torch.Tensor, padded: int) -> torch.Tensor:
    if weight.shape[0] == padded:
        return weight
    pad = weight.new_zeros(padded - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, pad], dim=0)


def _replicate_groups(qkv: torch.Tensor, config: LLMConfig, tp_size: int) -> torch.Tensor:
    """megatron-core's layout when TP exceeds the key/value groups: each group replicated per TP rank, each
    replica holding its TP rank's share of the group's query heads."""
    q, k, v = _split_qkv(qkv, config)
    groups, d, heads = config.num_query_groups, config.head_dim, config.num_attention_heads
    replicas = tp_size // groups
    rest = qkv.shape[1:]
    q = q.reshape(tp_size, heads // tp_size * d, *rest)  # consecutive query heads: rank r's share
    k = k.reshape(groups, 1, d, *rest).expand(groups, replicas, d, *rest).reshape(tp_size, d, *rest)
    v = v.reshape(groups, 1, d, *rest).expand(groups, replicas, d, *rest).reshape(tp_size, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _tp_shard(name: str, tensor: torch.Tensor, config: LLMConfig, tp_rank: int, tp_size: int) -> torch.Tensor:
    if tp_size == 1 and "word_embeddings" not in name and "output_layer" not in name:
        return tensor
    if "word_embeddings" in name or name.startswith("output_layer"):
        return torch.chunk(_pad_vocab(tensor, config.padded_vocab_size(tp_size)), tp_size, dim=0)[tp_rank]
    if "linear_qkv" in name:
        if config.num_query_groups < tp_size:
            tensor = _replicate_groups(tensor, config, tp_size)
        return torch.chunk(tensor, tp_size, dim=0)[tp_rank]
    if "linear_fc1" in name:
        gate, up = torch.chunk(tensor, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp_size, 0)[tp_rank], torch.chunk(up, tp_size, 0)[tp_rank]], dim=0)
    if "linear_proj" in name or "linear_fc2" in name:
        return torch.chunk(tensor, tp_size, dim=1)[tp_rank]
    return tensor  # norms: replicated


def shard_llm_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: LLMConfig,
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
) -> StateDict:
    """The part of an unsharded LLM state dict held by one (TP rank, PP rank), with stage-local layer indices."""
    per_stage = config.num_layers // pp_size
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    out: StateDict = {}
    for name, tensor in state_dict.items():
        match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if match:
            layer = int(match.group(1))
            if not per_stage * pp_rank <= layer < per_stage * (pp_rank + 1):
                continue
            name = f"decoder.layers.{layer - per_stage * pp_rank}.{match.group(2)}"
        elif name.startswith("embedding.") and not first:
            continue
        elif (name.startswith("decoder.final_layernorm") or name.startswith("output_layer")) and not last:
            continue
        out[name] = _tp_shard(name, tensor, config, tp_rank, tp_size)
    if config.tie_word_embeddings and last and not first:
        # The last stage keeps its own copy of the tied embedding as the output weight.
        out["output_layer.weight"] = _tp_shard(
            "output_layer.weight", state_dict["embedding.word_embeddings.weight"], config, tp_rank, tp_size
        )
    return out


# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear layer.
_TE_NORM_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def te_layer_names(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Local-spec names -> Transformer Engine spec names (fused layer norms)."""
    out: StateDict = {}
    for name, tensor in state_dict.items():
        for local, te in _TE_NORM_NAMES.items():
            if name.endswith("." + local):
                name = name[: -len(local)] + te
                break
        out[name] = tensor
    return out


def load_llm_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], config: LLMConfig) -> None:
    """Load an unsharded LLM state dict into a built model (a ``PuffinLLM``) at its own TP/PP ranks (its
    ``pg_collection``), every tensor checked (local or Transformer Engine spec)."""
    from megatron.core.utils import get_pg_rank, get_pg_size

    tp, pp = model.pg_collection.tp, model.pg_collection.pp
    shard = shard_llm_state_dict(state_dict, config, get_pg_rank(tp), get_pg_size(tp), get_pg_rank(pp), get_pg_size(pp))
    if any(name.endswith("linear_qkv.layer_norm_weight") for name in model.state_dict()):
        shard = te_layer_names(shard)
    check_shapes(model, shard)
    result = model.load_state_dict(shard, strict=False)
    missing = [k for k in result.missing_keys if not is_extra_state_key(k)]
    if missing or result.unexpected_keys:
        raise ConversionError(f"LLM state dict mismatch: missing {missing}, unexpected {result.unexpected_keys}")
