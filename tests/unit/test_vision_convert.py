"""RADIO / Puffin-projector checkpoints -> our vision tower: a synthetic tiny state dict with the published names
converts with every tensor accounted for, loads, and round-trips bit-exactly; leftovers, missing tensors and
wrong shapes are listed with flag hints; TP sharding joins back."""
import pytest
import torch

import megatron_puffin.distributed as dist_utils
from megatron_puffin.convert.common import ConversionError
from megatron_puffin.convert.radio import (
    load_vision_state_dict,
    mcore_to_projector,
    mcore_to_radio,
    projector_to_mcore,
    radio_grid_and_tokens,
    radio_to_mcore,
    radio_vision_shape,
    shard_vision_state_dict,
    unshard_vision_state_dicts,
    vision_tensor_table,
)
from megatron_puffin.models.vision import VisionConfig, build_vision

LLM_HIDDEN = 24
D, P, GRID, TOKENS, LAYERS, FFN = 32, 4, 8, 3, 2, 64


@pytest.fixture(scope="module", autouse=True)
def single_process():
    dist_utils.initialize(seed=0)
    yield
    dist_utils.destroy()


def _config(**overrides):
    values = dict(patch_size=P, hidden_size=D, num_layers=LAYERS, num_attention_heads=4, ffn_hidden_size=FFN,
                  max_image_size=GRID * P, class_token_len=TOKENS)
    values.update(overrides)
    return VisionConfig(**values)


def _radio_state_dict(prefix="radio_model.", seed=0):
    """The published RADIO (HF RADIOModel) names at tiny shapes, plus tensors Puffin deliberately ignores."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    state = {
        "input_conditioner.norm_mean": rand(3, 1, 1),
        "input_conditioner.norm_std": rand(3, 1, 1).abs() + 0.1,
        "model.patch_generator.embedder.weight": rand(D, 3 * P * P),
        "model.patch_generator.pos_embed": rand(1, GRID * GRID, D),
        "model.patch_generator.cls_token.token": rand(TOKENS, D),
        "summary_idxs": torch.tensor([0, 1]),
    }
    for i in range(LAYERS):
        block = f"model.blocks.{i}."
        for name, shape in (("norm1", (D,)), ("norm2", (D,))):
            state[f"{block}{name}.weight"], state[f"{block}{name}.bias"] = rand(*shape), rand(*shape)
        linears = (("attn.qkv", 3 * D, D), ("attn.proj", D, D), ("mlp.fc1", FFN, D), ("mlp.fc2", D, FFN))
        for name, out_f, in_f in linears:
            state[f"{block}{name}.weight"], state[f"{block}{name}.bias"] = rand(out_f, in_f), rand(out_f)
    return {prefix + k: v for k, v in state.items()}


def _projector_state_dict(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {"projector.0.weight": torch.randn(LLM_HIDDEN, 4 * D, generator=gen),
            "projector.0.bias": torch.randn(LLM_HIDDEN, generator=gen),
            "projector.2.weight": torch.randn(LLM_HIDDEN, LLM_HIDDEN, generator=gen),
            "projector.2.bias": torch.randn(LLM_HIDDEN, generator=gen)}


def test_every_radio_tensor_is_converted_loaded_and_round_trips_bit_exactly():
    config, radio = _config(), _radio_state_dict()
    ours = radio_to_mcore(radio, config)
    ours.update(projector_to_mcore(_projector_state_dict(), config, LLM_HIDDEN))
    assert set(ours) == set(vision_tensor_table(config, LLM_HIDDEN))
    model = build_vision(config, LLM_HIDDEN, pg_collection=dist_utils.process_groups())
    load_vision_state_dict(model, ours)
    loaded = model.state_dict()
    back = mcore_to_radio(loaded, config)
    expected = {k: v for k, v in radio.items() if not k.endswith("summary_idxs")}
    assert set(back) == set(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    projector = mcore_to_projector(loaded, config, LLM_HIDDEN)
    assert all(torch.equal(projector[k], v) for k, v in _projector_state_dict().items())


def test_qkv_is_reordered_per_head():
    config, radio = _config(), _radio_state_dict(prefix="")
    qkv = radio["model.blocks.0.attn.qkv.weight"]
    ours = radio_to_mcore(radio, config)["encoder.decoder.layers.0.self_attention.linear_qkv.weight"]
    head_dim = D // 4
    for head in range(4):
        for part in range(3):  # megatron: [h0: q, k, v | h1: ...]; timm: [q (heads) ; k ; v]
            mine = ours[(3 * head + part) * head_dim:(3 * head + part + 1) * head_dim]
            theirs = qkv[part * D + head * head_dim:part * D + (head + 1) * head_dim]
            assert torch.equal(mine, theirs)


def test_prefixes_torch_hub_hf_and_puffin():
    config = _config()
    hub = radio_to_mcore(_radio_state_dict(prefix=""), config)
    hf = radio_to_mcore(_radio_state_dict(prefix="radio_model."), config)
    puffin = radio_to_mcore(_radio_state_dict(prefix="visual_encoder.radio_model."), config,
                            prefix="visual_encoder.radio_model.")
    assert all(torch.equal(hub[k], hf[k]) and torch.equal(hub[k], puffin[k]) for k in hub)
    with pytest.raises(ConversionError, match=r"outside prefix 'radio_model\.': llm\.x"):
        radio_to_mcore({**_radio_state_dict(), "llm.x": torch.zeros(1)}, config, prefix="radio_model.")
    assert radio_grid_and_tokens(_radio_state_dict()) == (GRID, TOKENS)
    assert radio_vision_shape(_radio_state_dict()) == dict(
        patch_size=P, hidden_size=D, num_layers=LAYERS, ffn_hidden_size=FFN, max_image_size=GRID * P,
        class_token_len=TOKENS)
    with pytest.raises(ConversionError, match="not a RADIO state dict"):
        radio_vision_shape({"llm.x": torch.zeros(1)})


def test_unmatched_and_missing_tensors_are_listed_together():
    radio = _radio_state_dict()
    radio["radio_model.model.blocks.1.mlp.norm.weight"] = torch.zeros(FFN)  # RADIO's 'mlpnorm' flavour
    radio["radio_model.model.blocks.0.ls1.gamma"] = torch.zeros(D)
    del radio["radio_model.model.blocks.0.norm2.bias"]
    with pytest.raises(ConversionError) as error:
        radio_to_mcore(radio, _config())
    message = str(error.value)
    assert "2 unmatched tensor(s): model.blocks.0.ls1.gamma, model.blocks.1.mlp.norm.weight" in message
    radio = _radio_state_dict()
    del radio["radio_model.model.blocks.0.norm2.bias"]
    missing = r"1 missing tensor\(s\): encoder.decoder.layers.0.pre_mlp_layernorm.bias"
    with pytest.raises(ConversionError, match=missing):
        radio_to_mcore(radio, _config())


def test_shape_mismatches_name_the_flag_to_set():
    with pytest.raises(ConversionError) as error:
        radio_to_mcore(_radio_state_dict(), _config(class_token_len=8, max_image_size=64))
    message = str(error.value)
    assert "set --vision-class-token-len 3 (now 8)" in message
    assert "set --vision-max-image-size 32 (now 64)" in message
    radio = {**_radio_state_dict(), "radio_model.model.norm.weight": torch.ones(D),
             "radio_model.model.norm.bias": torch.zeros(D)}
    with pytest.raises(ConversionError, match="set --vision-final-norm"):
        radio_to_mcore(radio, _config())
    converted = radio_to_mcore(radio, _config(final_norm=True))
    assert torch.equal(converted["encoder.ln_post.weight"], torch.ones(D))


def test_ignored_tensors_are_only_the_documented_ones():
    radio = {**_radio_state_dict(), "radio_model.adaptors.clip.head.weight": torch.zeros(2),
             "radio_model.inter_feature_normalizer.alphas": torch.zeros(2)}
    assert set(radio_to_mcore(radio, _config())) == set(radio_to_mcore(_radio_state_dict(), _config()))


def test_projector_names_are_checked():
    config = _config()
    bad = {**_projector_state_dict(), "projector.1.weight": torch.zeros(1)}
    with pytest.raises(ConversionError, match=r"1 unmatched tensor\(s\): projector.1.weight"):
        projector_to_mcore(bad, config, LLM_HIDDEN)
    wrong = dict(_projector_state_dict())
    wrong["projector.0.weight"] = torch.zeros(LLM_HIDDEN, 3 * D)
    shape = r"projector.linear_fc1.weight has shape \(24, 96\), expected \(24, 128\)"
    with pytest.raises(ConversionError, match=shape):
        projector_to_mcore(wrong, config, LLM_HIDDEN)


def test_tensor_parallel_shards_join_back():
    config = _config()
    full = radio_to_mcore(_radio_state_dict(), config)
    full.update(projector_to_mcore(_projector_state_dict(), config, LLM_HIDDEN))
    shards = shard_vision_state_dict(full, config, LLM_HIDDEN, 2)
    assert shards[0]["encoder.embedder.weight"].shape == (D // 2, 3 * P * P)
    assert shards[1]["projector.linear_fc2.weight"].shape == (LLM_HIDDEN, LLM_HIDDEN // 2)
    assert shards[0]["encoder.decoder.layers.0.self_attention.linear_qkv.weight"].shape == (3 * D // 2, D)
    joined = unshard_vision_state_dicts(shards, config, LLM_HIDDEN)
    assert all(torch.equal(joined[k], full[k]) for k in full)
