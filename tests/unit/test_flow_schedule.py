"""The SD3 flow-matching schedule: the values of docs/puffin.md §1.10."""
import pytest
import torch

from megatron_puffin.diffusion import FlowMatchSchedule

SPEC_50_STEP_HEAD = [1.0, 0.99312, 0.98606, 0.97879, 0.97131]
SPEC_50_STEP_TAIL = [0.21659, 0.1703, 0.12053, 0.0669, 0.00893, 0.0]


def test_training_table_is_the_once_shifted_uniform_grid():
    schedule = FlowMatchSchedule(1000, shift=3.0)
    s = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    torch.testing.assert_close(schedule.train_sigmas.double(), 3 * s / (1 + 2 * s), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(schedule.train_timesteps, schedule.train_sigmas * 1000)
    assert schedule.sigma_max == 1.0
    assert schedule.sigma_min == pytest.approx(0.0029940, abs=1e-7)
    assert schedule.train_timesteps[-1].item() == pytest.approx(2.994, abs=1e-4)
    assert bool((schedule.train_sigmas[1:] < schedule.train_sigmas[:-1]).all())


def test_fifty_inference_steps_are_double_shifted_as_in_the_spec():
    grid = FlowMatchSchedule(1000, shift=3.0).inference_schedule(50)
    assert grid.num_steps == 50 and grid.sigmas.shape == (51,) and grid.sigmas.dtype == torch.float32
    assert grid.sigmas[:5].tolist() == pytest.approx(SPEC_50_STEP_HEAD, abs=1e-5)
    assert grid.sigmas[-6:].tolist() == pytest.approx(SPEC_50_STEP_TAIL, abs=1e-5)
    torch.testing.assert_close(grid.timesteps, grid.sigmas[:-1] * 1000)


def test_single_step_and_invalid_arguments():
    schedule = FlowMatchSchedule()
    grid = schedule.inference_schedule(1)
    assert grid.sigmas.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="num_inference_steps \\(0\\) must be at least 1"):
        schedule.inference_schedule(0)
    with pytest.raises(ValueError, match="shift \\(0\\) must be positive"):
        FlowMatchSchedule(shift=0)


def test_no_shift_is_the_plain_uniform_grid():
    schedule = FlowMatchSchedule(10, shift=1.0)
    assert schedule.train_sigmas.tolist() == pytest.approx([k / 10 for k in range(10, 0, -1)])
