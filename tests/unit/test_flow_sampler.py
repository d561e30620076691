"""Euler/CFG sampler mechanics: branch order, shared condition latents, guidance off, mixed-size latents."""
import pytest
import torch

import megatron_puffin.distributed as dist_utils
from megatron_puffin.diffusion import (
    FlowMatchEulerSampler,
    FlowMatchSchedule,
    classifier_free_guidance,
    guided_dit_velocity,
)
from megatron_puffin.models.dit import DiTConfig, build_dit


@pytest.fixture(scope="module", autouse=True)
def single_process():
    dist_utils.initialize(seed=0)
    yield
    dist_utils.destroy()


class _LinearField:
    """A real velocity field v(x, t) = a x + b t with per-branch coefficients; records what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, latents, timestep):
        self.calls.append((latents, timestep))
        if isinstance(latents, torch.Tensor):
            branch = torch.arange(latents.shape[0], dtype=latents.dtype).reshape(-1, 1, 1, 1)
            return 0.5 * latents + 1e-3 * timestep.reshape(-1, 1, 1, 1) * (1 + branch)
        return [0.5 * x + 1e-3 * t for x, t in zip(latents, timestep)]


def test_cfg_evaluates_negatives_first_and_combines_as_diffusers():
    field = _LinearField()
    sampler = FlowMatchEulerSampler(FlowMatchSchedule(), num_inference_steps=3, guidance_scale=4.5)
    latents = torch.randn(2, 4, 4, 4)
    out = sampler.sample(field, latents)
    assert len(field.calls) == 3
    first_input, first_t = field.calls[0]
    assert torch.equal(first_input, torch.cat([latents, latents])) and first_t.tolist() == [1000.0] * 4
    assert out.shape == latents.shape and out.dtype == latents.dtype


def test_guidance_of_one_or_less_runs_a_single_branch():
    field = _LinearField()
    sampler = FlowMatchEulerSampler(FlowMatchSchedule(), num_inference_steps=2, guidance_scale=1.0)
    sampler.sample(field, torch.randn(3, 4, 4, 4))
    assert field.calls[0][0].shape[0] == 3 and not sampler.do_classifier_free_guidance


def test_guidance_formula():
    uncond, cond = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0])
    assert classifier_free_guidance(uncond, cond, 4.5).tolist() == [10.0, 2.0]
    listed = classifier_free_guidance([uncond], [cond], 4.5)
    assert listed[0].tolist() == [10.0, 2.0]


def test_mixed_size_latents_sample_like_each_alone():
    sampler = FlowMatchEulerSampler(FlowMatchSchedule(), num_inference_steps=4, guidance_scale=3.0)
    latents = [torch.randn(4, 8, 8), torch.randn(4, 4, 6)]
    together = sampler.sample(_LinearField(), latents)
    for i, latent in enumerate(latents):
        alone = sampler.sample(_LinearField(), [latent])[0]
        torch.testing.assert_close(together[i], alone, rtol=0, atol=0)


def test_dit_velocity_gives_both_branches_the_same_condition_latents():
    config = DiTConfig(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                       attention_head_dim=8, num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32,
                       pooled_projection_dim=12, pos_embed_max_size=24)
    model = build_dit(config, device="cpu", pg_collection=dist_utils.process_groups()).eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    conds = [[torch.randn(4, 8, 8)], [torch.randn(4, 8, 8)]]
    text, pooled = torch.randn(2, 5, 24), torch.randn(2, 12)
    velocity_fn = guided_dit_velocity(model, text, pooled, torch.zeros(2, 5, 24), torch.zeros(2, 12), conds)
    with torch.no_grad():
        out = velocity_fn(torch.randn(4, 4, 8, 8), torch.full((4,), 500.0))
    given = seen[0]["cond_hidden_states"]
    assert len(given) == 4 and given[0] is conds[0] and given[2] is conds[0] and given[3] is conds[1]
    assert out.shape == (4, 4, 8, 8)
