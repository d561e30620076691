"""Configuration of the composed Puffin model: which towers train, and the frozen VAE."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional


@dataclass
class PuffinModelConfig:
    """Per-tower freezing and the frozen VAE (the tower shapes have their own flag groups)."""

    FLAG_PREFIX: ClassVar[str] = ""

    freeze_llm: bool = False
    """Freeze the LLM tower (requires_grad=False: no gradient buffers, no optimizer state)."""
    freeze_vision: bool = False
    """Freeze the vision encoder (runs in eval mode unless --vision-frozen-train-mode); the projector still trains."""
    freeze_dit: bool = False
    """Freeze the MMDiT generator (connectors, queries and projectors still train)."""
    vae_path: Optional[str] = None
    """diffusers AutoencoderKL folder (config.json + weights), e.g. SD3-medium's vae/; always frozen."""
    vae_config: Optional[str] = None
    """A diffusers AutoencoderKL config.json to build a randomly initialised VAE from (tiny CPU runs and tests)."""
    vae_sample_posterior: bool = True
    """Encode with a posterior sample (the reference) instead of the posterior mean."""
    image_pad_token_id: int = 151655
    """Token id of <|image_pad|>, whose positions receive the initial view's visual tokens in image2image prompts
    (Qwen2.5: 151655; the training script takes it from the tokenizer)."""

    def validate(self) -> List[str]:
        problems = []
        if self.vae_path and self.vae_config:
            problems.append("--vae-path and --vae-config are mutually exclusive; give one")
        return problems
