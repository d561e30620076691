"""Speed patches of megatron-core (megatron_puffin.platform): each is still needed (megatron-core's own call site
does the extra work with the patch off) and changes no number."""
from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import megatron_puffin.distributed as mpd
from helpers.llm import tiny_llm_config
from megatron_puffin import platform
from megatron_puffin.models.llm import build_llm


@pytest.fixture()
def single_process():
    mpd.initialize(seed=0)
    yield mpd.process_groups()
    mpd.destroy()


def _profiled_fwd_bwd(model, input_ids, position_ids):
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        logits = model(input_ids=input_ids, position_ids=position_ids)
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    counts = Counter({event.key: event.count for event in prof.key_averages()})
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}, counts


def test_rope_cos_sin_once_is_still_needed_and_bit_identical(single_process):
    """Through SelfAttention.forward of a 3-layer LLM: megatron-core's RoPE takes cos and sin twice per layer
    (query, key) and copies both; patched, once per forward and one cat fewer per call (rotate_half's remains),
    with identical logits and gradients (torch.equal)."""
    assert "ROPE_COS_SIN_ONCE" in platform.applied()
    num_layers = 3
    model = build_llm(tiny_llm_config(num_layers=num_layers), pg_collection=single_process)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 250, (2, 11), generator=generator)
    position_ids = torch.arange(11).expand(2, 11)
    patched = _profiled_fwd_bwd(model, input_ids, position_ids)
    with platform.unpatched("ROPE_COS_SIN_ONCE"):
        original = _profiled_fwd_bwd(model, input_ids, position_ids)
    assert original[2]["aten::cos"] == original[2]["aten::sin"] == 2 * num_layers
    assert patched[2]["aten::cos"] == patched[2]["aten::sin"] == 1
    assert original[2]["aten::cat"] - patched[2]["aten::cat"] == 2 * num_layers
    assert torch.equal(patched[0], original[0])
    for name, grad in original[1].items():
        assert torch.equal(patched[1][name], grad), name


def test_rope_replacement_leaves_other_variants_to_megatron_core(single_process):
    """Partial rotary dims (a pass-through part) and mscale != 1 go to megatron-core's function unchanged."""
    from megatron.core.transformer import attention

    replacement = attention.apply_rotary_pos_emb
    config = tiny_llm_config(num_layers=1).to_transformer_config()
    t = torch.randn(5, 2, 3, 16)
    partial = torch.randn(5, 2, 1, 8)
    assert torch.equal(replacement(t, partial, config), replacement.original(t, partial, config))
    full = torch.randn(5, 2, 1, 16)
    assert torch.equal(replacement(t, full, config, mscale=0.5), replacement.original(t, full, config, mscale=0.5))
    assert torch.equal(replacement(t, full, config), replacement.original(t, full, config))
