"""The frozen VAE wrapper on a tiny random diffusers AutoencoderKL built from a config (nothing downloaded)."""
import pytest
import torch
from diffusers import AutoencoderKL

from megatron_puffin.models.vae import FrozenVAE

TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16], layers_per_block=1,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], norm_num_groups=4, sample_size=16,
    scaling_factor=1.5305, shift_factor=0.0609,
)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return FrozenVAE.from_config(TINY_VAE)


def _images(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 16, 16, generator=gen) * 2 - 1, torch.rand(3, 8, 24, generator=gen) * 2 - 1,
            torch.rand(3, 16, 16, generator=gen) * 2 - 1]


def test_frozen_eval_and_without_autograd(vae):
    assert not any(p.requires_grad for p in vae.parameters())
    vae.train()
    assert not vae.training and not vae.vae.training and all(not m.training for m in vae.modules())
    images = torch.rand(1, 3, 16, 16, requires_grad=True)
    latents = vae.encode(images)
    assert not latents.requires_grad and latents.grad_fn is None


def test_shift_and_scale_come_from_the_vae_config(vae):
    assert (vae.shift_factor, vae.scaling_factor) == (0.0609, 1.5305)
    no_shift = FrozenVAE(AutoencoderKL.from_config({**TINY_VAE, "shift_factor": None, "scaling_factor": 0.5}))
    assert (no_shift.shift_factor, no_shift.scaling_factor) == (0.0, 0.5)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    raw_mean = vae.vae.encode(images).latent_dist.mean
    torch.testing.assert_close(vae.encode(images, sample_posterior=False), (raw_mean - 0.0609) * 1.5305)


def test_sample_vs_mean_flag(vae):
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    mean = vae.encode(images, sample_posterior=False)
    sampled = vae.encode(images, generator=torch.Generator().manual_seed(4))
    assert vae.sample_posterior and not torch.equal(sampled, mean)
    posterior = vae.vae.encode(images).latent_dist
    expected = (posterior.sample(generator=torch.Generator().manual_seed(4)) - 0.0609) * 1.5305
    torch.testing.assert_close(sampled, expected, rtol=0, atol=0)
    mean_vae = FrozenVAE(vae.vae, sample_posterior=False)
    assert torch.equal(mean_vae.encode(images), mean)


def test_batched_encode_of_mixed_sizes_equals_per_sample_encode(vae):
    images = _images()
    batched = vae.encode(images, sample_posterior=False)
    assert [z.shape for z in batched] == [(4, 8, 8), (4, 4, 12), (4, 8, 8)]
    for image, latent in zip(images, batched):
        torch.testing.assert_close(latent, vae.encode(image[None], sample_posterior=False)[0], rtol=1e-5, atol=1e-6)


def test_chunked_calls_equal_one_call(vae):
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    chunked = FrozenVAE(vae.vae, sample_posterior=False, max_batch_size=2)
    torch.testing.assert_close(chunked.encode(images), vae.encode(images, sample_posterior=False), rtol=1e-5, atol=1e-6)
    latents = vae.encode(images, sample_posterior=False)
    torch.testing.assert_close(chunked.decode(latents), vae.decode(latents), rtol=1e-5, atol=1e-6)


def test_decode_inverts_the_normalisation_and_handles_lists(vae):
    latents = vae.encode(_images(1), sample_posterior=False)
    decoded = vae.decode(latents)
    assert [x.shape for x in decoded] == [(3, 16, 16), (3, 8, 24), (3, 16, 16)]
    raw = vae.vae.decode(latents[0][None] / 1.5305 + 0.0609).sample[0]
    torch.testing.assert_close(decoded[0], raw, rtol=1e-4, atol=1e-5)


def test_cached_moments_reproduce_posterior_sampling(vae):
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = vae.encode_moments(images)
    posterior = vae.vae.encode(images).latent_dist
    torch.testing.assert_close(mean, posterior.mean)
    torch.testing.assert_close(std, posterior.std)
    from_moments = vae.latents_from_moments(mean, std, generator=torch.Generator().manual_seed(9))
    direct = vae.encode(images, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(from_moments, direct, rtol=1e-5, atol=1e-6)
    means, stds = vae.encode_moments(_images(2))
    assert [m.shape for m in means] == [s.shape for s in stds] == [(4, 8, 8), (4, 4, 12), (4, 8, 8)]
