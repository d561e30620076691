"""diffusers SD3 <-> our DiT conversion: round trips, tensor-parallel sharding, folders, and clear errors."""
import pytest
import torch
from diffusers import SD3Transformer2DModel

import megatron_puffin.distributed as dist_utils
from megatron_puffin.convert.common import ConversionError
from megatron_puffin.convert.sd3 import (
    diffusers_to_mcore,
    dit_tensor_table,
    load_diffusers_transformer,
    load_dit_state_dict,
    mcore_to_diffusers,
    save_diffusers_transformer,
    shard_dit_state_dict,
    unshard_dit_state_dicts,
)
from megatron_puffin.models.dit import DiTConfig, build_dit

TINY = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12,
            pos_embed_max_size=24)


@pytest.fixture(scope="module", autouse=True)
def single_process():
    dist_utils.initialize(seed=0)
    yield
    dist_utils.destroy()


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**TINY)
    return model, DiTConfig.from_diffusers(dict(model.config))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_table_lists_exactly_the_diffusers_tensors(reference):
    model, config = reference
    table = dit_tensor_table(config)
    state = model.state_dict()
    assert set(table) == set(state)
    assert all(tuple(state[name].shape) == shape for name, (shape, _) in table.items())


def test_round_trip_is_bit_exact_in_any_dtype(reference):
    model, config = reference
    for dtype in (torch.float32, torch.bfloat16):
        state = {k: v.to(dtype) for k, v in model.state_dict().items()}
        ours = diffusers_to_mcore(state, config)
        assert _same(mcore_to_diffusers(ours, config), state)


def test_our_state_dict_converts_back_and_loads_into_diffusers(reference):
    model, config = reference
    ours = build_dit(config, device="cpu", pg_collection=dist_utils.process_groups())
    back = mcore_to_diffusers(ours.state_dict(), config)  # megatron layers' _extra_state entries are dropped
    fresh = SD3Transformer2DModel(**TINY)
    fresh.load_state_dict(back, strict=True)
    assert _same(fresh.state_dict(), back)


@pytest.mark.parametrize("tp", [2, 4])
def test_sharding_splits_by_axis_and_unshards_bit_exactly(reference, tp):
    model, config = reference
    full = diffusers_to_mcore(model.state_dict(), config)
    shards = shard_dit_state_dict(full, config, tp)
    assert len(shards) == tp
    q = "transformer_blocks.0.attn.to_q.weight"
    out = "transformer_blocks.0.attn.to_out.0"
    assert shards[1][q].shape == (32 // tp, 32) and torch.equal(shards[1][q], full[q][32 // tp : 2 * 32 // tp])
    assert shards[1][f"{out}.weight"].shape == (32, 32 // tp)
    assert torch.equal(shards[1][f"{out}.bias"], full[f"{out}.bias"])
    assert shards[0]["transformer_blocks.2.norm1_context.linear.weight"].shape == (2 * 32 // tp, 32)
    assert _same(unshard_dit_state_dicts(shards, config), full)


def test_sharding_rejects_an_impossible_tensor_parallel_size(reference):
    model, config = reference
    with pytest.raises(ValueError, match="--dit-num-attention-heads \\(4\\) must be divisible"):
        shard_dit_state_dict(diffusers_to_mcore(model.state_dict(), config), config, 3)


def test_unshard_detects_diverged_replicated_copies(reference):
    model, config = reference
    shards = shard_dit_state_dict(diffusers_to_mcore(model.state_dict(), config), config, 2)
    shards[1] = dict(shards[1], **{"proj_out.bias": shards[1]["proj_out.bias"] + 1})
    with pytest.raises(ConversionError, match="replicated tensor proj_out.bias differs"):
        unshard_dit_state_dicts(shards, config)


def test_unmatched_missing_and_misshaped_tensors_are_listed(reference):
    model, config = reference
    state = dict(model.state_dict())
    state["transformer_blocks.0.attn.norm_q.weight"] = torch.ones(8)
    del state["proj_out.bias"]
    state["context_embedder.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConversionError) as error:
        diffusers_to_mcore(state, config)
    message = str(error.value)
    assert "1 unmatched tensor(s): transformer_blocks.0.attn.norm_q.weight" in message
    assert "1 missing tensor(s): proj_out.bias" in message
    assert "context_embedder.weight has shape (3, 3), expected (32, 24)" in message


def test_diffusers_folder_round_trip(reference, tmp_path):
    model, config = reference
    model.save_pretrained(tmp_path / "transformer")
    loaded_config, state = load_diffusers_transformer(str(tmp_path / "transformer"))
    assert loaded_config == config
    assert _same(state, diffusers_to_mcore(model.state_dict(), config))
    ours = build_dit(config, device="cpu", pg_collection=dist_utils.process_groups()).eval()
    load_dit_state_dict(ours, state)
    save_diffusers_transformer(str(tmp_path / "back"), ours.state_dict(), config)
    again = SD3Transformer2DModel.from_pretrained(str(tmp_path / "back"))
    assert _same(again.state_dict(), model.state_dict())


def test_loading_into_a_model_accounts_for_every_tensor(reference):
    model, config = reference
    ours = build_dit(config, device="cpu", pg_collection=dist_utils.process_groups())
    state = diffusers_to_mcore(model.state_dict(), config)
    load_dit_state_dict(ours, state)
    name = "transformer_blocks.1.ff.net.2.weight"
    assert torch.equal(ours.state_dict()[name], state[name])
    with pytest.raises(ConversionError, match="missing \\['proj_out.weight'\\]"):
        load_dit_state_dict(ours, {k: v for k, v in state.items() if k != "proj_out.weight"})
