"""DiT input/output plumbing: sin-cos tables, timestep features, the dynamic image-stream layout, unpatchify."""
import pytest
import torch
from diffusers.models.embeddings import PatchEmbed as DiffusersPatchEmbed
from diffusers.models.embeddings import get_timestep_embedding

from megatron_puffin.models.dit import DiTConfig, build_layout, unpatchify
from megatron_puffin.models.dit.embeddings import PatchEmbed, timestep_sinusoids
from megatron_puffin.models.dit.image_stream import place_tokens


def _config(**overrides):
    values = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                  num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12,
                  pos_embed_max_size=24)
    values.update(overrides)
    return DiTConfig(**values)


def test_position_table_is_bit_identical_to_diffusers_patch_embed():
    config = _config()
    ref = DiffusersPatchEmbed(height=16, width=16, patch_size=2, in_channels=4, embed_dim=32, pos_embed_max_size=24)
    ours = PatchEmbed(config)
    assert torch.equal(ours.pos_embed, ref.pos_embed)
    for height, width in [(16, 16), (8, 12), (48, 2)]:
        assert torch.equal(ours.cropped_pos_embed(height // 2, width // 2)[None], ref.cropped_pos_embed(height, width))


def test_patch_embedding_equals_diffusers_on_the_same_weights():
    config = _config()
    ours = PatchEmbed(config)
    ref = DiffusersPatchEmbed(height=16, width=16, patch_size=2, in_channels=4, embed_dim=32, pos_embed_max_size=24)
    ref.load_state_dict(ours.state_dict())
    latents = torch.randn(3, 4, 10, 6)
    torch.testing.assert_close(ours(latents).transpose(0, 1), ref(latents), rtol=1e-6, atol=1e-6)


def test_oversized_latent_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds --dit-pos-embed-max-size"):
        PatchEmbed(_config())(torch.randn(1, 4, 50, 2))


def test_timestep_features_are_bit_identical_to_diffusers():
    timesteps = torch.tensor([0.0, 2.994, 500.5, 1000.0])
    ref = get_timestep_embedding(timesteps, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(timestep_sinusoids(timesteps), ref)


def test_layout_of_a_uniform_batch_is_dense_and_unpadded():
    layout = build_layout(torch.zeros(3, 4, 8, 6), None, patch_size=2)
    assert layout.dense and not layout.padded and layout.seq_lens == (12, 12, 12)
    assert layout.key_padding_mask(5, torch.device("cpu")) is None


def test_condition_latents_share_groups_by_shape_and_follow_their_target():
    targets = [torch.zeros(4, 8, 8), torch.zeros(4, 4, 4)]
    conds = [[torch.zeros(4, 8, 8), torch.zeros(4, 4, 4)], [torch.zeros(4, 8, 8)]]
    layout = build_layout(targets, conds, patch_size=2)
    assert layout.seq_lens == (16 + 16 + 4, 4 + 16) and layout.padded and not layout.dense
    by_shape = {g.shape: g for g in layout.groups}
    assert by_shape[(8, 8)].members == ((0, 0), (0, 1), (1, 1)) and by_shape[(8, 8)].offsets == (0, 16, 4)
    assert by_shape[(4, 4)].members == ((0, 2), (1, 0)) and by_shape[(4, 4)].offsets == (32, 0)
    mask = layout.key_padding_mask(3, torch.device("cpu"))  # joint [text ; image]: pads only at the end
    assert mask.shape == (2, 1, 1, 3 + 36)
    assert not mask[0].any() and mask[1, 0, 0, 3 + 20:].all() and not mask[1, 0, 0, :3 + 20].any()
    assert layout.target_groups() == [((8, 8), [0]), ((4, 4), [1])]


def test_tokens_land_at_their_sample_and_position():
    targets = [torch.zeros(4, 4, 4), torch.zeros(4, 2, 4)]
    conds = [[torch.zeros(4, 2, 4)], None]
    layout = build_layout(targets, conds, patch_size=2)
    # Give every token a code: 100 * sample + 10 * slot + index in its latent.
    codes = {}
    for group in layout.groups:
        count = layout.num_tokens(group.shape)
        codes[group.shape] = torch.stack(
            [torch.tensor([100.0 * s + 10 * slot + t for t in range(count)]) for s, slot in group.members], dim=1
        )[..., None]
    stream = place_tokens([codes[g.shape] for g in layout.groups], layout)[..., 0]
    assert stream[:, 0].tolist() == [0, 1, 2, 3, 10, 11]
    assert stream[:, 1].tolist() == [100, 101, 0, 0, 0, 0]


def test_unpatchify_matches_diffusers_channel_order():
    tokens = torch.randn(3 * 2, 5, 2 * 2 * 4)  # 6x4 latent, patch 2 -> 3x2 grid
    ours = unpatchify(tokens, (6, 4), 2, 4)
    ref = tokens.transpose(0, 1).reshape(5, 3, 2, 2, 2, 4)
    ref = torch.einsum("nhwpqc->nchpwq", ref).reshape(5, 4, 6, 4)
    assert torch.equal(ours, ref)


def test_latent_sides_must_be_multiples_of_the_patch():
    with pytest.raises(ValueError, match="not a multiple of 2"):
        build_layout([torch.zeros(4, 5, 4)], None, patch_size=2)
    with pytest.raises(ValueError, match="one \\(possibly empty\\) list of condition latents per sample"):
        build_layout(torch.zeros(2, 4, 4, 4), [[]], patch_size=2)
