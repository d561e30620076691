"""The LLM tower on a GPU: NCCL start-up, bf16 logits against the fp32 CPU model, and the Transformer Engine spec
(local vs TE in bf16, and FP8 actually taking effect). Skipped without CUDA; TE checks skip without TE."""
import pytest
import torch

from megatron_puffin.optional_deps import transformer_engine_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def nccl_world():
    import megatron_puffin.distributed as mpd

    ctx = mpd.initialize(seed=0)
    yield ctx
    mpd.destroy()


def _models(config, impl, dtype, fp8=None):
    from megatron_puffin.distributed import process_groups
    from megatron_puffin.models.llm import build_llm

    tconfig = config.to_transformer_config(params_dtype=dtype, fp8=fp8)
    return build_llm(config, transformer_config=tconfig, transformer_impl=impl,
                     pg_collection=process_groups()).cuda().eval()


def _load(model, config, hf_state):
    from megatron_puffin.convert.qwen2 import hf_to_mcore, load_llm_state_dict

    load_llm_state_dict(model, hf_to_mcore(hf_state, config), config)


def test_nccl_start_up_and_bf16_logits_match_cpu_fp32(nccl_world):
    from helpers.llm import hf_qwen2, left_padded_batch, tiny_llm_config

    assert nccl_world.backend == "nccl" and nccl_world.device.type == "cuda"
    config = tiny_llm_config(hidden_size=128, num_attention_heads=8, num_query_groups=2, kv_channels=16,
                             ffn_hidden_size=256)
    hf = hf_qwen2(config)
    gpu = _models(config, "local", torch.bfloat16)
    _load(gpu, config, hf.state_dict())
    ids, mask, pos, _ = left_padded_batch(config.vocab_size, [16, 11], 16)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long(), position_ids=pos).logits
        out = gpu(input_ids=ids.cuda(), position_ids=pos.cuda(), padding_mask=mask.cuda()).transpose(0, 1).float().cpu()
    error = ((out - ref)[mask].abs().max() / ref[mask].abs().max()).item()
    assert error < 3e-2, f"bf16 GPU logits differ from fp32 reference by {error:.3e} (relative)"


@pytest.mark.skipif(transformer_engine_error() is not None, reason=f"Transformer Engine unusable: {transformer_engine_error()}")
def test_transformer_engine_spec_matches_local_and_fp8_takes_effect(nccl_world):
    from helpers.llm import hf_qwen2, left_padded_batch, tiny_llm_config
    from megatron_puffin.convert.qwen2 import te_layer_names
    from megatron_puffin.models.llm import RightPadding

    config = tiny_llm_config(hidden_size=128, num_attention_heads=8, num_query_groups=2, kv_channels=16,
                             ffn_hidden_size=256, vocab_size=256)
    state = hf_qwen2(config).state_dict()
    local, te, te_fp8 = (_models(config, "local", torch.bfloat16), _models(config, "transformer_engine", torch.bfloat16),
                         _models(config, "transformer_engine", torch.bfloat16, fp8="hybrid"))
    for model in (local, te, te_fp8):
        _load(model, config, state)
    assert any("layer_norm_weight" in k for k in te.state_dict()) and te_layer_names
    # Mixed lengths, right-padded as training lays them out (TE's causal mask, no padding mask); real tokens compared.
    ids, mask, pos, _ = left_padded_batch(config.vocab_size, [32, 21], 32)
    layout = RightPadding.from_left_padded(mask)
    args = dict(input_ids=layout.apply(ids).cuda(), position_ids=layout.apply(pos).cuda(), padding_mask=None)
    real = layout.apply(mask).cuda()
    with torch.no_grad():
        a, b, c = (m(**args).transpose(0, 1)[real].float() for m in (local, te, te_fp8))
    rel = lambda x, y: ((x - y).abs().max() / y.abs().max()).item()  # noqa: E731
    assert rel(b, a) < 2e-2, "TE spec differs from the local spec beyond bf16 tolerance"
    assert 0 < rel(c, b) < 0.2, "FP8 output should differ a little from bf16 (else FP8 silently did not apply)"
