"""Flow-matching training inputs and loss (docs/puffin.md §2.3): noising, velocity target, per-sample mean, densities."""
import pytest
import torch

from megatron_puffin.diffusion import (
    FlowMatchingConfig,
    FlowMatchSchedule,
    add_noise,
    flow_matching_loss,
    make_flow_matching_inputs,
    per_sample_mse,
    sample_density,
    sample_noise_levels,
    velocity_target,
)


def _mixed(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, h, w, generator=gen) for h, w in [(8, 8), (2, 6), (6, 4)]]


def test_noising_and_target_follow_the_straight_path():
    x0, eps = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    xt = add_noise(x0, eps, sigmas)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], eps[2])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * eps[1])
    assert torch.equal(velocity_target(x0, eps), eps - x0)


def test_lists_of_mixed_sizes_equal_per_sample_computation():
    x0, eps = _mixed(0), _mixed(1)
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    noisy, target = add_noise(x0, eps, sigmas), velocity_target(x0, eps)
    for i in range(3):
        torch.testing.assert_close(noisy[i], add_noise(x0[i][None], eps[i][None], sigmas[i : i + 1])[0], rtol=0, atol=0)
        assert torch.equal(target[i], eps[i] - x0[i])


def test_every_sample_counts_equally_whatever_its_size():
    target = [torch.zeros(4, 8, 8), torch.zeros(4, 2, 2)]
    prediction = [torch.full((4, 8, 8), 1.0), torch.full((4, 2, 2), 3.0)]
    loss, per_sample = flow_matching_loss(prediction, target)
    assert per_sample.tolist() == [1.0, 9.0]
    assert loss.item() == 5.0  # not the element-weighted mean (~1.03)
    weighted, _ = flow_matching_loss(prediction, target, weights=torch.tensor([2.0, 0.0]))
    assert weighted.item() == 1.0


def test_loss_is_float32_and_list_equals_tensor_path():
    pred = torch.randn(2, 4, 6, 6, dtype=torch.bfloat16)
    target = torch.randn(2, 4, 6, 6, dtype=torch.bfloat16)
    loss, per_sample = flow_matching_loss(pred, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(per_sample_mse(list(pred), list(target)), per_sample, rtol=1e-6, atol=0)
    expected = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


def test_loss_backpropagates_to_the_prediction():
    pred = [torch.randn(4, 4, 4, requires_grad=True), torch.randn(4, 2, 2, requires_grad=True)]
    loss, _ = flow_matching_loss(pred, [torch.zeros(4, 4, 4), torch.zeros(4, 2, 2)])
    loss.backward()
    torch.testing.assert_close(pred[1].grad, pred[1].detach() * 2 / 16 / 2)


def test_uniform_density_indexes_the_descending_table():
    schedule = FlowMatchSchedule()
    gen = torch.Generator().manual_seed(0)
    levels = sample_noise_levels(schedule, 4096, "none", generator=gen)
    u = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    assert torch.equal(levels.indices, (u * 1000).long())
    assert torch.equal(levels.sigmas, schedule.train_sigmas[levels.indices])
    assert torch.equal(levels.timesteps, schedule.train_timesteps[levels.indices])
    assert levels.sigmas.mean().item() == pytest.approx(0.677, abs=0.01)  # spec: mean sigma ~0.677
    assert levels.sigmas.median().item() == pytest.approx(0.750, abs=0.01)


def test_logit_normal_and_mode_densities():
    gen = torch.Generator().manual_seed(1)
    u = sample_density(20000, "logit_normal", generator=gen, logit_mean=0.0, logit_std=1.0)
    assert 0 < u.min() and u.max() < 1 and u.median().item() == pytest.approx(0.5, abs=0.01)
    logit = torch.logit(u)
    assert logit.std().item() == pytest.approx(1.0, abs=0.03)
    mode = sample_density(1000, "mode", generator=gen, mode_scale=0.0)
    assert mode.min() > 0 and mode.max() <= 1  # scale 0: u = 1 - v
    with pytest.raises(ValueError, match="weighting_scheme \\(cosine\\) must be one of none, logit_normal, mode"):
        sample_density(2, "cosine")


def test_mode_scale_range_is_where_the_mode_density_stays_in_the_unit_interval():
    """--flow-mode-scale is validated against MODE_SCALE_RANGE: inside it every draw lies in [0, 1], just outside
    it some do not (they would be clamped to the table's ends without a word)."""
    from megatron_puffin.diffusion.timesteps import MODE_SCALE_RANGE

    def draws(scale):
        return sample_density(200_000, "mode", generator=torch.Generator().manual_seed(0), mode_scale=scale)

    for scale in MODE_SCALE_RANGE:
        u = draws(scale)
        assert 0 <= u.min() and u.max() <= 1, scale
    assert draws(MODE_SCALE_RANGE[1] + 0.05).min() < 0
    assert draws(MODE_SCALE_RANGE[0] - 0.05).max() > 1
    assert FlowMatchingConfig(weighting_scheme="mode", mode_scale=7.3).validate()
    assert not FlowMatchingConfig(weighting_scheme="mode", mode_scale=1.29).validate()
    assert not FlowMatchingConfig(weighting_scheme="none", mode_scale=7.3).validate()  # unused then


def test_extreme_density_stays_inside_the_table():
    schedule = FlowMatchSchedule()
    gen = torch.Generator().manual_seed(0)
    levels = sample_noise_levels(schedule, 1000, "logit_normal", generator=gen, logit_mean=40.0, logit_std=0.1)
    assert levels.indices.max().item() == 999


def test_training_inputs_are_reproducible_from_the_generator():
    schedule = FlowMatchSchedule()
    latents = _mixed(2)
    first = make_flow_matching_inputs(latents, schedule, torch.Generator().manual_seed(5))
    again = make_flow_matching_inputs(latents, schedule, torch.Generator().manual_seed(5))
    other = make_flow_matching_inputs(latents, schedule, torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(first.noisy, again.noisy))
    assert not torch.equal(first.noisy[0], other.noisy[0])
    noise = [t + x for t, x in zip(first.target, latents)]  # v + x0 = eps
    for x, n, s, xt in zip(latents, noise, first.sigmas, first.noisy):
        torch.testing.assert_close(xt, (1 - s) * x + s * n)
    assert [t.shape for t in first.noisy] == [t.shape for t in latents]


def test_config_validation_names_flags():
    assert FlowMatchingConfig().validate() == []
    problems = FlowMatchingConfig(shift=-1, num_inference_steps=0, weighting_scheme="x").validate()
    assert problems == [
        "--flow-shift (-1) must be positive",
        "--flow-num-inference-steps (0) must lie in [1, 10,000] (Puffin samples with 50)",
        "--flow-weighting-scheme (x) must be one of none, logit_normal, mode",
    ]
    # sizes that would allocate a table or a sampling grid of terabytes before anything else ran
    assert FlowMatchingConfig(num_train_timesteps=10 ** 12, num_inference_steps=10 ** 12).validate() == [
        "--flow-num-train-timesteps (1000000000000) must lie in [1, 1,000,000] (SD3: 1000)",
        "--flow-num-inference-steps (1000000000000) must lie in [1, 10,000] (Puffin samples with 50)",
    ]
