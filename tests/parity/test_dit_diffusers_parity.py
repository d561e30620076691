"""Our DiT tower against diffusers' SD3Transformer2DModel with the same weights (fp32, tiny random configs).

The condition-latent and mixed-size checks compare with a reference assembled from diffusers' own modules: the
image stream ``[target | conds]`` is built with diffusers' ``PatchEmbed`` per latent, concatenated, and run through
diffusers' joint blocks and output layers (what Puffin's dynamic SD3 forward does, one sample at a time).
"""
import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed

import megatron_puffin.distributed as dist_utils
from megatron_puffin.convert.sd3 import diffusers_to_mcore, load_dit_state_dict
from megatron_puffin.models.dit import DiTConfig, build_dit
from megatron_puffin.models.dit.embeddings import sincos_2d_grid

MAX_REL_ERROR = 1e-5

TINY_CONFIGS = {
    "2 blocks, 4 heads": dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                              attention_head_dim=8, num_attention_heads=4, joint_attention_dim=24,
                              caption_projection_dim=32, pooled_projection_dim=12, pos_embed_max_size=24),
    "3 blocks, 2 heads": dict(sample_size=32, patch_size=2, in_channels=8, out_channels=8, num_layers=3,
                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=40,
                              caption_projection_dim=32, pooled_projection_dim=20, pos_embed_max_size=32),
}


@pytest.fixture(scope="module", autouse=True)
def single_process():
    dist_utils.initialize(seed=0)
    yield
    dist_utils.destroy()


def _pair(name, seed=0):
    """(diffusers model, our model with the same weights, our config), both in eval mode."""
    torch.manual_seed(seed)
    ref = SD3Transformer2DModel(**TINY_CONFIGS[name]).eval()
    config = DiTConfig.from_diffusers(dict(ref.config))
    ours = build_dit(config, device="cpu", pg_collection=dist_utils.process_groups()).eval()
    load_dit_state_dict(ours, diffusers_to_mcore(ref.state_dict(), config))
    return ref, ours, config


def _conditioning(config, batch, seed=1, text_tokens=7):
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, text_tokens, config.joint_attention_dim, generator=gen)
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=gen)
    timestep = torch.rand(batch, generator=gen) * 1000
    return text, pooled, timestep


def _rel(ours, ref):
    """max |ours - ref| / max |ref| (0 when both are exactly zero, e.g. the unused text queries of the last block)."""
    error = (ours - ref).abs().max()
    return 0.0 if error == 0 else (error / ref.abs().max()).item()


def _reference_dynamic(ref, target, conds, text, pooled, timestep):
    """One sample through diffusers' modules on the concatenated image stream ``[target | conds]``.

    Returns:
        ``[C, h, w]`` velocity of the target.
    """
    streams = [ref.pos_embed(latent[None]) for latent in [target, *conds]]
    tokens = torch.cat(streams, dim=1)
    temb = ref.time_text_embed(timestep[None], pooled[None])
    context = ref.context_embedder(text[None])
    for block in ref.transformer_blocks:
        context, tokens = block(hidden_states=tokens, encoder_hidden_states=context, temb=temb)
    out = ref.proj_out(ref.norm_out(tokens, temb))[:, : streams[0].shape[1]]
    patch, channels = ref.config.patch_size, ref.out_channels
    height, width = target.shape[-2] // patch, target.shape[-1] // patch
    out = out.reshape(1, height, width, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(channels, height * patch, width * patch)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_output_matches_diffusers(name):
    ref, ours, config = _pair(name)
    latents = torch.randn(3, config.in_channels, 12, 8)
    text, pooled, timestep = _conditioning(config, 3)
    with torch.no_grad():
        expected = ref(latents, text, pooled, timestep).sample
        got = ours(latents, text, pooled, timestep)
    assert got.shape == expected.shape
    assert _rel(got, expected) <= MAX_REL_ERROR
    assert ours.transformer_blocks[-1].context_pre_only and ref.transformer_blocks[-1].context_pre_only


def test_gradients_match_diffusers():
    ref, ours, config = _pair("2 blocks, 4 heads", seed=3)
    ref.train(), ours.train()
    latents = torch.randn(2, config.in_channels, 8, 8)
    text, pooled, timestep = _conditioning(config, 2)
    weight = torch.randn(2, config.out_channels, 8, 8)
    (ref(latents, text, pooled, timestep).sample * weight).sum().backward()
    (ours(latents, text, pooled, timestep) * weight).sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        if param.grad is None:  # the last block's text queries: ours never computes them, diffusers' get zero
            assert name.startswith(f"transformer_blocks.{config.num_layers - 1}.attn.add_q_proj."), name
            assert not ref_grads[name].grad.any(), name
            continue
        assert _rel(param.grad, ref_grads[name].grad) <= MAX_REL_ERROR, name


def test_condition_latents_equal_a_plain_mmdit_on_the_concatenated_stream():
    ref, ours, config = _pair("3 blocks, 2 heads", seed=5)
    channels = config.in_channels
    targets = torch.randn(2, channels, 8, 8)
    conds = [[torch.randn(channels, 8, 8), torch.randn(channels, 8, 8)] for _ in range(2)]
    text, pooled, timestep = _conditioning(config, 2)
    with torch.no_grad():
        got = ours(targets, text, pooled, timestep, cond_hidden_states=conds)
        expected = torch.stack(
            [_reference_dynamic(ref, targets[i], conds[i], text[i], pooled[i], timestep[i]) for i in range(2)]
        )
        plain = ours(targets, text, pooled, timestep)
    assert got.shape == targets.shape
    assert _rel(got, expected) <= MAX_REL_ERROR
    assert _rel(plain, got) > 1e-3  # the conditions do change the prediction


def test_mixed_sizes_in_one_batch_equal_each_sample_alone():
    ref, ours, config = _pair("2 blocks, 4 heads", seed=7)
    channels = config.in_channels
    targets = [torch.randn(channels, 8, 8), torch.randn(channels, 12, 4), torch.randn(channels, 8, 8)]
    conds = [[torch.randn(channels, 8, 8)], [torch.randn(channels, 12, 4), torch.randn(channels, 8, 8)], []]
    text, pooled, timestep = _conditioning(config, 3)
    with torch.no_grad():
        batched = ours(targets, text, pooled, timestep, cond_hidden_states=conds)
        assert isinstance(batched, list) and [b.shape for b in batched] == [t.shape for t in targets]
        for i in range(3):
            alone = ours([targets[i]], text[i : i + 1], pooled[i : i + 1], timestep[i : i + 1], [conds[i]])[0]
            expected = _reference_dynamic(ref, targets[i], conds[i], text[i], pooled[i], timestep[i])
            assert _rel(batched[i], alone) <= MAX_REL_ERROR, i
            assert _rel(batched[i], expected) <= MAX_REL_ERROR, i


def test_sd3_medium_position_table_matches_diffusers():
    expected = get_2d_sincos_pos_embed(1536, 192, base_size=64, interpolation_scale=1, output_type="pt").float()
    assert torch.equal(sincos_2d_grid(1536, 192, 64), expected)
