"""Flow matching for the DiT: the SD3 schedule, training noise levels, the loss, and the Euler/CFG sampler."""
from megatron_puffin.diffusion.config import FlowMatchingConfig
from megatron_puffin.diffusion.loss import (
    FlowMatchingInputs,
    add_noise,
    flow_matching_loss,
    make_flow_matching_inputs,
    per_sample_mse,
    velocity_target,
)
from megatron_puffin.diffusion.sampler import (
    FlowMatchEulerSampler,
    classifier_free_guidance,
    euler_step,
    guided_dit_velocity,
)
from megatron_puffin.diffusion.schedule import FlowMatchSchedule, InferenceSchedule
from megatron_puffin.diffusion.timesteps import WEIGHTING_SCHEMES, NoiseLevels, sample_density, sample_noise_levels

__all__ = [
    "FlowMatchEulerSampler",
    "FlowMatchSchedule",
    "FlowMatchingConfig",
    "FlowMatchingInputs",
    "InferenceSchedule",
    "NoiseLevels",
    "WEIGHTING_SCHEMES",
    "add_noise",
    "classifier_free_guidance",
    "euler_step",
    "flow_matching_loss",
    "guided_dit_velocity",
    "make_flow_matching_inputs",
    "per_sample_mse",
    "sample_density",
    "sample_noise_levels",
    "velocity_target",
]
