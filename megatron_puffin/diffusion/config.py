"""Configuration of flow-matching training and sampling."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List

from megatron_puffin.diffusion.timesteps import MODE_SCALE_RANGE, WEIGHTING_SCHEMES


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
    """Euler steps when sampling (Puffin: 50)."""
    guidance_scale: float = 4.5
    """Classifier-free guidance scale; CFG is off at 1 or below (Puffin: 4.5)."""

    def validate(self) -> List[str]:
        """Flag-naming messages for every violated rule (empty when valid)."""
        problems = []
        if self.num_train_timesteps < 1:
            problems.append(f"--flow-num-train-timesteps ({self.num_train_timesteps}) must be at least 1")
        if self.shift <= 0:
            problems.append(f"--flow-shift ({self.shift}) must be positive")
        if self.logit_std <= 0:
            problems.append(f"--flow-logit-std ({self.logit_std}) must be positive")
        if self.num_inference_steps < 1:
            problems.append(f"--flow-num-inference-steps ({self.num_inference_steps}) must be at least 1")
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
