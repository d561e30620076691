"""Configuration of the vision tower: C-RADIOv3-H's ViT shape (defaults), its input conditioning, the 2x2 fold
and the MLP projector (docs/puffin.md §1.3-1.4)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

import torch
import torch.nn.functional as F

from megatron_puffin.models.common.transformer_config import (
    CheckedConfig,
    encoder_transformer_kwargs,
    tensor_parallel_problems,
)
from megatron_puffin.optional_deps import transformer_engine_error

# OpenAI CLIP normalisation used by RADIO's input conditioner (docs/puffin.md §1.3).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig(CheckedConfig):
    """The RADIO vision encoder (C-RADIOv3-H shape), the 2x2 pixel fold and the MLP projector into the LLM."""

    FLAG_PREFIX: ClassVar[str] = "vision-"
    TOWER: ClassVar[str] = "vision"

    patch_size: int = 16
    """Side of the square pixel patch embedded as one token (C-RADIOv3-H: 16)."""
    hidden_size: int = 1280
    """Width of the ViT (C-RADIOv3-H: 1280)."""
    num_layers: int = 32
    """Number of ViT blocks (C-RADIOv3-H: 32)."""
    num_attention_heads: int = 16
    """Attention heads of the ViT (C-RADIOv3-H: 16, head dim 80)."""
    ffn_hidden_size: int = 5120
    """Width of the GELU MLP of each ViT block (C-RADIOv3-H: 5120)."""
    layernorm_epsilon: float = 1e-6
    """Epsilon of the ViT's LayerNorms (timm ViT: 1e-6)."""
    max_image_size: int = 2048
    """Largest image side the CPE position grid covers, in pixels (C-RADIOv3-H: 2048 -> a 128x128 grid)."""
    class_token_len: int = 8
    """Summary (class) plus register tokens prepended to the patches; they are stripped from the output. Must
    match the checkpoint (the RADIO converter checks it)."""
    final_norm: bool = False
    """Apply the ViT's final LayerNorm to the features (RADIO's 'model_norm'; off in C-RADIOv3-H's HF config)."""
    feature_normalizer: bool = False
    """Apply RADIO's feature normaliser ((x - mean) @ tx^T, buffers from the checkpoint) to the features."""
    cpe_pos_dropout: float = 0.1
    """Probability of dropping the position embedding of a sample while the encoder is in train mode (RADIO CPE
    augmentation; train mode also samples a random position-grid window)."""
    fold_size: int = 2
    """Side of the square block of patch features folded into one LLM token (space-to-depth, docs/puffin.md §1.4)."""
    vision_grad_scale: float = field(default=0.1, metadata={"flag": "--vision-grad-scale"})
    """Multiplier of the gradient flowing from the projector back into a trainable vision encoder (identity in
    the forward pass; the reference's visual_encoder_grad_scale)."""
    frozen_train_mode: bool = False
    """Keep a frozen encoder in train mode (CPE random windows and position-embedding dropout active), as the
    reference does by accident (docs/puffin.md §1.3 quirk, §9 point 10). Default: a frozen encoder runs in eval mode."""
    recompute: bool = False
    """Recompute every ViT block's activations in the backward pass (activation checkpointing)."""

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def max_grid_size(self) -> int:
        """Side of the learned CPE position grid in patches."""
        return self.max_image_size // self.patch_size

    @property
    def image_size_multiple(self) -> int:
        """Image height and width must be multiples of this (patch size x fold size; 32 for Puffin)."""
        return self.patch_size * self.fold_size

    @property
    def folded_hidden_size(self) -> int:
        """Width of one folded token (fold^2 x hidden; 5120 for Puffin), the projector's input."""
        return self.fold_size * self.fold_size * self.hidden_size

    def num_tokens(self, height: int, width: int) -> int:
        """Number of LLM tokens an image of ``height x width`` pixels becomes."""
        unit = self.image_size_multiple
        return (height // unit) * (width // unit)

    def validate(self, tensor_model_parallel_size: int = 1) -> List[str]:
        """Every rule this tower imposes, as flag-naming messages (empty when valid)."""
        tp = tensor_model_parallel_size
        positive = ("patch_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                    "max_image_size", "fold_size")
        problems = [
            f"--vision-{name.replace('_', '-')} ({getattr(self, name)}) must be at least 1"
            for name in positive if getattr(self, name) < 1
        ]
        if problems:
            return problems
        if self.class_token_len < 0:
            problems.append(f"--vision-class-token-len ({self.class_token_len}) must be at least 0")
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"--vision-hidden-size ({self.hidden_size}) must be divisible by "
                            f"--vision-num-attention-heads ({self.num_attention_heads})")
        problems += tensor_parallel_problems(
            "vision", tp, num_attention_heads=self.num_attention_heads, ffn_hidden_size=self.ffn_hidden_size
        )
        if self.max_image_size % self.patch_size:
            problems.append(f"--vision-max-image-size ({self.max_image_size}) must be a multiple of "
                            f"--vision-patch-size ({self.patch_size})")
        if not 0.0 <= self.cpe_pos_dropout < 1.0:
            problems.append(f"--vision-cpe-pos-dropout ({self.cpe_pos_dropout}) must be in [0, 1)")
        if self.vision_grad_scale < 0:
            problems.append(f"--vision-grad-scale ({self.vision_grad_scale}) must be at least 0")
        if not self.layernorm_epsilon > 0:  # a layer norm of a constant row divides by sqrt(epsilon)
            problems.append(f"--vision-layernorm-epsilon ({self.layernorm_epsilon}) must be positive (e.g. 1e-6)")
        return problems

    def to_transformer_config(
        self,
        tensor_model_parallel_size: int = 1,
        params_dtype: torch.dtype = torch.float32,
        fp8: Optional[str] = None,
        fp8_recipe: str = "delayed",
        recompute: Optional[bool] = None,
        use_cpu_initialization: Optional[bool] = None,
    ):
        """The megatron-core ``TransformerConfig`` of the ViT blocks.

        The tower is never split over pipeline stages (it lives on the first stage whole), so the config says
        pipeline size 1 whatever the run's layout; megatron-core then builds every block on that stage.

        Args:
            tensor_model_parallel_size: TP size (heads and MLP columns are split over it).
            params_dtype: parameter dtype (fp32 on CPU, bf16 on GPU by default).
            fp8: ``e4m3`` / ``hybrid`` through Transformer Engine, or None; FP8 without a usable Transformer
                Engine raises (megatron-core alone would silently ignore it).
            fp8_recipe: Transformer Engine scaling recipe.
            recompute: recompute every block in backward; default ``self.recompute``.
            use_cpu_initialization: default True exactly when CUDA is absent.
        """
        from megatron.core.transformer import TransformerConfig

        if fp8 is not None and transformer_engine_error() is not None:
            raise RuntimeError(
                f"--fp8-format ({fp8}) for the vision tower needs Transformer Engine with CUDA, but "
                f"{transformer_engine_error()}; drop --fp8-format or run on a GPU with transformer-engine"
            )
        self.check(tensor_model_parallel_size)
        recompute = self.recompute if recompute is None else recompute
        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            kv_channels=self.head_dim,
            activation_func=F.gelu,  # exact GELU (timm nn.GELU); megatron's fused bias-GELU is the tanh form
            **encoder_transformer_kwargs(
                self.layernorm_epsilon, tensor_model_parallel_size, params_dtype, fp8, fp8_recipe, recompute,
                use_cpu_initialization,
            ),
        )

    def projector_transformer_config(self, llm_hidden_size: int, vit_config):
        """The megatron-core config of the MLP projector: ``folded -> llm_hidden -> llm_hidden`` with SiLU.

        Args:
            llm_hidden_size: the LLM's hidden size (projector width and output).
            vit_config: the ViT's config (parallel layout, dtype and init are shared).
        """
        return dataclasses.replace(
            vit_config, hidden_size=llm_hidden_size, ffn_hidden_size=llm_hidden_size, activation_func=F.silu,
            num_layers=1, recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
        )
