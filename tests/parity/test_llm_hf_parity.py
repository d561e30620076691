"""Our LLM tower against transformers' Qwen2ForCausalLM with the same weights (fp32, tiny random configs)."""
import pytest
import torch

import megatron_puffin.distributed as dist_utils
from helpers.llm import hf_qwen2, left_padded_batch, tiny_llm_config
from megatron_puffin.convert.qwen2 import hf_to_mcore, load_llm_state_dict, mcore_to_hf
from megatron_puffin.models.llm import build_llm

MAX_REL_ERROR = 1e-5


@pytest.fixture(scope="module", autouse=True)
def single_process():
    dist_utils.initialize(seed=0)
    yield
    dist_utils.destroy()


def _max_rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_hf_with_left_padding(tied):
    config = tiny_llm_config(tied=tied)
    hf = hf_qwen2(config)
    ours = build_llm(config, pg_collection=dist_utils.process_groups()).eval()
    load_llm_state_dict(ours, hf_to_mcore(hf.state_dict(), config), config)
    input_ids, mask, position_ids, _ = left_padded_batch(config.vocab_size, [12, 7, 3], 12)
    with torch.no_grad():
        ref = hf(input_ids=input_ids, attention_mask=mask.long(), position_ids=position_ids).logits
        out = ours(input_ids=input_ids, position_ids=position_ids, padding_mask=mask).transpose(0, 1)
    assert out.shape == ref.shape
    error = _max_rel_error(out[mask], ref[mask])
    assert error <= MAX_REL_ERROR, f"max relative logits error {error:.3e} (tied={tied})"


def test_hidden_states_match_hf_final_hidden():
    config = tiny_llm_config()
    hf = hf_qwen2(config, seed=3)
    ours = build_llm(config, pg_collection=dist_utils.process_groups()).eval()
    load_llm_state_dict(ours, hf_to_mcore(hf.state_dict(), config), config)
    input_ids, mask, position_ids, _ = left_padded_batch(config.vocab_size, [9, 9], 9)
    with torch.no_grad():
        ref = hf.model(input_ids=input_ids, attention_mask=mask.long(), position_ids=position_ids).last_hidden_state
        out = ours(input_ids=input_ids, position_ids=position_ids, padding_mask=None, output="hidden")
    assert _max_rel_error(out.transpose(0, 1), ref) <= MAX_REL_ERROR


def test_input_embeddings_replace_token_ids():
    config = tiny_llm_config()
    ours = build_llm(config, pg_collection=dist_utils.process_groups()).eval()
    input_ids, mask, position_ids, _ = left_padded_batch(config.vocab_size, [6, 4], 6)
    with torch.no_grad():
        from_ids = ours(input_ids=input_ids, position_ids=position_ids, padding_mask=mask)
        from_embeds = ours(decoder_input=ours.embed_tokens(input_ids), position_ids=position_ids, padding_mask=mask)
    torch.testing.assert_close(from_embeds, from_ids, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_hf_round_trip_is_bit_exact(tied):
    config = tiny_llm_config(tied=tied)
    hf_sd = hf_qwen2(config).state_dict()
    back = mcore_to_hf(hf_to_mcore(hf_sd, config), config)
    expected = {k: v for k, v in hf_sd.items() if not (tied and k == "lm_head.weight")}
    assert sorted(back) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


def test_unmatched_tensors_are_listed():
    from megatron_puffin.convert.common import ConversionError

    config = tiny_llm_config()
    hf_sd = dict(hf_qwen2(config).state_dict())
    hf_sd["model.layers.0.self_attn.rotary_extra.weight"] = torch.zeros(1)
    del hf_sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        hf_to_mcore(hf_sd, config)
    hf_sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(config.ffn_hidden_size, config.hidden_size)
    with pytest.raises(ConversionError, match="rotary_extra"):
        hf_to_mcore(hf_sd, config)
