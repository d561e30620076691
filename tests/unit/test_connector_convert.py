"""Reference query-path names <-> our QueryConditioner: bit-exact round trips both ways, per-head q/k/v
interleave, every tensor accounted for (leftovers and missing tensors listed), pipeline roles, TP sharding."""
import pytest
import torch

import megatron_puffin.distributed as dist_utils
from megatron_puffin.convert.common import ConversionError, interleave_qkv, split_qkv
from megatron_puffin.convert.connector import (
    connector_tensor_table,
    load_connector_state_dict,
    mcore_to_reference,
    reference_to_mcore,
    shard_connector_state_dict,
    unshard_connector_state_dicts,
)
from megatron_puffin.models.connector import ConnectorConfig, build_query_conditioner

LLM_HIDDEN = 24
CONFIG = ConnectorConfig(num_queries=6, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                         pooled_projection_dim=12, joint_attention_dim=20)


@pytest.fixture(scope="module", autouse=True)
def single_process():
    dist_utils.initialize(seed=0)
    yield
    dist_utils.destroy()


def _reference_state_dict(seed=0):
    """The reference's names (docs/puffin.md §1.5-1.7) at tiny shapes, random values."""
    gen = torch.Generator().manual_seed(seed)
    h, ffn = CONFIG.hidden_size, CONFIG.ffn_hidden_size
    state = {"meta_queries": torch.randn(6, LLM_HIDDEN, generator=gen)}
    shapes = {"llm2connector_{k}": (h, LLM_HIDDEN), "projector_1": (12, h), "projector_2": (20, h)}
    for k in ("1", "2"):
        for name in ("llm2connector_{k}", f"projector_{k}"):
            out_f, in_f = shapes[name]
            state[f"{name.format(k=k)}.weight"] = torch.randn(out_f, in_f, generator=gen)
            state[f"{name.format(k=k)}.bias"] = torch.randn(out_f, generator=gen)
        for i in range(CONFIG.num_layers):
            prefix = f"connector_{k}.layers.{i}."
            linears = [(f"self_attn.{p}_proj", h, h) for p in ("q", "k", "v", "out")]
            for name, out_f, in_f in linears + [("mlp.fc1", ffn, h), ("mlp.fc2", h, ffn)]:
                state[f"{prefix}{name}.weight"] = torch.randn(out_f, in_f, generator=gen)
                state[f"{prefix}{name}.bias"] = torch.randn(out_f, generator=gen)
            for name in ("layer_norm1", "layer_norm2"):
                state[f"{prefix}{name}.weight"] = torch.randn(h, generator=gen)
                state[f"{prefix}{name}.bias"] = torch.randn(h, generator=gen)
    return state


def test_reference_to_ours_loads_and_round_trips_bit_exactly():
    reference = _reference_state_dict()
    ours = reference_to_mcore(reference, CONFIG, LLM_HIDDEN)
    module = build_query_conditioner(CONFIG, LLM_HIDDEN, pg_collection=dist_utils.process_groups())
    load_connector_state_dict(module, ours)
    back = mcore_to_reference(module.state_dict(), CONFIG, LLM_HIDDEN)
    assert set(back) == set(reference)
    assert all(torch.equal(back[name], reference[name]) for name in reference)


def test_ours_to_reference_and_back_is_bit_exact():
    module = build_query_conditioner(CONFIG, LLM_HIDDEN, pg_collection=dist_utils.process_groups())
    ours = {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
    again = reference_to_mcore(mcore_to_reference(ours, CONFIG, LLM_HIDDEN), CONFIG, LLM_HIDDEN)
    assert set(again) == set(ours) and all(torch.equal(again[k], ours[k]) for k in ours)


def test_qkv_interleave_is_per_head_and_inverts():
    q, k, v = (torch.randn(32, 5) for _ in range(3))
    fused = interleave_qkv(q, k, v, num_heads=4)
    assert torch.equal(fused[8:16], k[0:8]) and torch.equal(fused[24:32], q[8:16])
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, 4), (q, k, v)))
    bias = interleave_qkv(q[:, 0], k[:, 0], v[:, 0], num_heads=4)
    assert torch.equal(bias, fused[:, 0])


def test_every_tensor_is_accounted_for():
    reference = _reference_state_dict()
    reference["connector_1.layers.0.self_attn.rotary.inv_freq"] = torch.zeros(2)
    reference["connector_2.post_layernorm.weight"] = torch.zeros(32)
    unmatched = r"2 unmatched tensor\(s\): connector_1.layers.0.self_attn.rotary.inv_freq, connector_2.post_layernorm"
    with pytest.raises(ConversionError, match=unmatched):
        reference_to_mcore(reference, CONFIG, LLM_HIDDEN)
    reference = _reference_state_dict()
    del reference["connector_2.layers.1.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"missing tensor connector_2.layers.1.mlp.fc2.bias"):
        reference_to_mcore(reference, CONFIG, LLM_HIDDEN)
    reference = _reference_state_dict()
    reference["projector_2.weight"] = torch.zeros(21, 32)
    with pytest.raises(ConversionError, match=r"projector_2.weight has shape \(21, 32\), expected \(20, 32\)"):
        reference_to_mcore(reference, CONFIG, LLM_HIDDEN)


def test_pipeline_roles_take_only_their_tensors():
    reference = _reference_state_dict()
    first = reference_to_mcore({"meta_queries": reference["meta_queries"]}, CONFIG, LLM_HIDDEN, post_process=False)
    assert list(first) == ["meta_queries"]
    last_only = {k: v for k, v in reference.items() if k != "meta_queries"}
    last = reference_to_mcore(last_only, CONFIG, LLM_HIDDEN, pre_process=False)
    assert "meta_queries" not in last and len(last) == len(connector_tensor_table(CONFIG, LLM_HIDDEN)) - 1
    with pytest.raises(ConversionError, match="unmatched tensor.*meta_queries"):
        reference_to_mcore(reference, CONFIG, LLM_HIDDEN, pre_process=False)


def test_tensor_parallel_shards_split_heads_and_join_back():
    ours = reference_to_mcore(_reference_state_dict(), CONFIG, LLM_HIDDEN)
    shards = shard_connector_state_dict(ours, CONFIG, LLM_HIDDEN, 2)
    name = "connector_1.layers.0.self_attention.linear_qkv.weight"
    assert torch.equal(shards[1][name], ours[name][48:])  # heads 2-3 with their q, k, v
    assert shards[0]["connector_2.layers.1.mlp.linear_fc2.weight"].shape == (32, 32)
    assert shards[0]["projector_2.weight"] is ours["projector_2.weight"]
    joined = unshard_connector_state_dicts(shards, CONFIG, LLM_HIDDEN)
    assert all(torch.equal(joined[k], ours[k]) for k in ours)
    shards[1]["llm2connector_1.bias"] = shards[1]["llm2connector_1.bias"] + 1
    with pytest.raises(ConversionError, match="replicated tensor llm2connector_1.bias differs"):
        unshard_connector_state_dicts(shards, CONFIG, LLM_HIDDEN)
