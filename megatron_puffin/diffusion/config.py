"""Configuration of flow-matching training and sampling."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

from megatron_puffin.diffusion.timesteps import MODE_SCALE_RANGE, WEIGHTING_SCHEMES

MAX_TRAIN_TIMESTEPS = 1_000_000
"""Largest training table accepted (SD3: 1,000 levels; the table is held in memory as float32)."""
MAX_INFERENCE_STEPS = 10_000
"""Most Euler steps accepted: 200 times Puffin's 50, each a full MMDiT pass (twice with CFG). The bound turns a
mistyped count into a one-line error instead of an allocation of its grid that fails deep inside numpy."""


def inference_steps_problem(flag: str, steps: int) -> Optional[str]:
    """Why ``steps`` Euler steps cannot be sampled, or None."""
    if not 1 <= steps <= MAX_INFERENCE_STEPS:
        return f"{flag} ({steps}) must lie in [1, {MAX_INFERENCE_STEPS:,}] (Puffin samples with 50)"
    return None


@dataclass
class FlowMatchingConfig:
    """The SD3 flow-matching schedule, the training noise-level density, and the Euler/CFG sampler."""

    FLAG_PREFIX: ClassVar[str] = "flow-"

    num_train_timesteps: int = 1000
    """Entries of the discrete training table (SD3: 1000)."""
    shift: float = 3.0
    """Timestep shift s: sigma = s u / (1 + (s - 1) u) (SD3-medium: 3.0; inference applies it twice, as diffusers)."""
    weighting_scheme: str = field(default="none", metadata={"choices": list(WEIGHTING_SCHEMES)})
    """Density of training noise levels: none (uniform, Puffin), logit_normal (SD3 paper) or mode."""
    logit_mean: float = 0.0
    """Mean of the logit-normal density."""
    logit_std: float = 1.0
    """Standard deviation of the logit-normal density."""
    mode_scale: float = 1.29
    """Scale of the mode density."""
    num_inference_steps: int = 50
    """Euler steps when sampling (Puffin: 50): the default of the inference tools for this checkpoint."""
    guidance_scale: float = 4.5
    """Classifier-free guidance scale; CFG is off at 1 or below (Puffin: 4.5): the inference tools' default."""

    def validate(self) -> List[str]:
        """Flag-naming messages for every violated rule (empty when valid)."""
        problems = []
        if not 1 <= self.num_train_timesteps <= MAX_TRAIN_TIMESTEPS:
            problems.append(f"--flow-num-train-timesteps ({self.num_train_timesteps}) must lie in "
                            f"[1, {MAX_TRAIN_TIMESTEPS:,}] (SD3: 1000)")
        if self.shift <= 0:
            problems.append(f"--flow-shift ({self.shift}) must be positive")
        if self.logit_std <= 0:
            problems.append(f"--flow-logit-std ({self.logit_std}) must be positive")
        steps = inference_steps_problem("--flow-num-inference-steps", self.num_inference_steps)
        if steps:
            problems.append(steps)
        if self.weighting_scheme == "mode" and not MODE_SCALE_RANGE[0] <= self.mode_scale <= MODE_SCALE_RANGE[1]:
            problems.append(
                f"--flow-mode-scale ({self.mode_scale}) must lie in [{MODE_SCALE_RANGE[0]:g}, {MODE_SCALE_RANGE[1]:g}] "
                "with --flow-weighting-scheme mode: outside it the density leaves [0, 1] (SD3 uses 1.29)"
            )
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            problems.append(
                f"--flow-weighting-scheme ({self.weighting_scheme}) must be one of {', '.join(WEIGHTING_SCHEMES)}"
            )
        return problems
