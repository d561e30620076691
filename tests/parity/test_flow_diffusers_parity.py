"""Flow matching against diffusers: FlowMatchEulerDiscreteScheduler tables, Euler steps with CFG (driven by our
real tiny DiT, as the SD3 pipeline drives it), and the SD3 training scripts' timestep sampling."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

import megatron_puffin.distributed as dist_utils
from megatron_puffin.diffusion import (
    FlowMatchEulerSampler,
    FlowMatchSchedule,
    euler_step,
    guided_dit_velocity,
    sample_noise_levels,
)
from megatron_puffin.models.dit import DiTConfig, build_dit


@pytest.fixture(scope="module", autouse=True)
def single_process():
    dist_utils.initialize(seed=0)
    yield
    dist_utils.destroy()


def _scheduler(shift=3.0):
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_training_table_is_bit_identical(shift):
    ours, ref = FlowMatchSchedule(1000, shift), _scheduler(shift)
    assert torch.equal(ours.train_sigmas, ref.sigmas) and torch.equal(ours.train_timesteps, ref.timesteps)


@pytest.mark.parametrize("steps", [1, 2, 4, 28, 50])
def test_inference_grid_is_bit_identical(steps):
    ref = _scheduler()
    ref.set_timesteps(steps)
    grid = FlowMatchSchedule(1000, 3.0).inference_schedule(steps)
    assert torch.equal(grid.sigmas, ref.sigmas) and torch.equal(grid.timesteps, ref.timesteps)


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode"])
def test_training_timestep_sampling_matches_the_sd3_training_scripts(scheme):
    ref = _scheduler()
    u = compute_density_for_timestep_sampling(
        scheme, 64, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=torch.Generator().manual_seed(3)
    )
    indices = (u * ref.config.num_train_timesteps).long()
    levels = sample_noise_levels(FlowMatchSchedule(), 64, scheme, generator=torch.Generator().manual_seed(3))
    assert torch.equal(levels.timesteps, ref.timesteps[indices])
    assert torch.equal(levels.sigmas, ref.sigmas[indices])


def _tiny_dit():
    config = DiTConfig(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                       attention_head_dim=8, num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32,
                       pooled_projection_dim=12, pos_embed_max_size=24)
    torch.manual_seed(0)
    return build_dit(config, device="cpu", pg_collection=dist_utils.process_groups()).eval()


def _diffusers_loop(model, latents, text, pooled, neg_text, neg_pooled, conds, steps, guidance):
    """What diffusers' StableDiffusion3Pipeline does per step, with Puffin's conditions in both branches."""
    scheduler = _scheduler()
    scheduler.set_timesteps(steps)
    dtype = latents.dtype
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2)
        with torch.no_grad():
            velocity = model(model_input, torch.cat([neg_text, text]), torch.cat([neg_pooled, pooled]),
                             t.expand(model_input.shape[0]), cond_hidden_states=conds + conds)
        uncond, cond = velocity.chunk(2)
        velocity = uncond + guidance * (cond - uncond)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        latents = latents.to(dtype)
    return latents


@pytest.mark.parametrize("steps", [1, 4])
def test_euler_sampling_with_cfg_is_bit_identical_to_diffusers(steps):
    model = _tiny_dit()
    gen = torch.Generator().manual_seed(11)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    text, neg_text = torch.randn(2, 5, 24, generator=gen), torch.zeros(2, 5, 24)
    pooled, neg_pooled = torch.randn(2, 12, generator=gen), torch.zeros(2, 12)
    conds = [[torch.randn(4, 8, 8, generator=gen)] for _ in range(2)]
    sampler = FlowMatchEulerSampler(FlowMatchSchedule(), num_inference_steps=steps, guidance_scale=4.5)
    velocity_fn = guided_dit_velocity(model, text, pooled, neg_text, neg_pooled, cond_hidden_states=conds)
    ours = sampler.sample(velocity_fn, latents)
    ref = _diffusers_loop(model, latents, text, pooled, neg_text, neg_pooled, conds, steps, 4.5)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, latents)


def test_bf16_euler_step_matches_diffusers_dtype_handling():
    scheduler = _scheduler()
    scheduler.set_timesteps(3)
    gen = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 4, 8, 8, generator=gen).bfloat16()
    velocity = torch.randn(2, 4, 8, 8, generator=gen).bfloat16()
    ref = scheduler.step(velocity, scheduler.timesteps[0], sample, return_dict=False)[0]
    ours = euler_step(sample, velocity, scheduler.sigmas[0], scheduler.sigmas[1])
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, ref)
    listed = euler_step(list(sample), list(velocity), scheduler.sigmas[0], scheduler.sigmas[1])
    assert all(torch.equal(a, b) for a, b in zip(listed, ref))
