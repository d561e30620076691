"""Configuration of the DiT tower: SD3's MMDiT shape (SD3-medium defaults) on megatron-core."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Dict, List, Optional

import torch
import torch.nn.functional as F

from megatron_puffin.models.common.transformer_config import CheckedConfig, runtime_transformer_kwargs
from megatron_puffin.optional_deps import transformer_engine_error

# diffusers' SD3Transformer2DModel config keys that only carry bookkeeping (no effect on the computation).
_DIFFUSERS_BOOKKEEPING_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class DiTConfig(CheckedConfig):
    """The SD3 MMDiT generator ("dynamic" variant): shapes, positional grid and activation recomputation."""

    FLAG_PREFIX: ClassVar[str] = "dit-"
    TOWER: ClassVar[str] = "DiT"

    sample_size: int = 128
    """Latent height/width the positional embedding was designed for (SD3-medium: 128); sets its base grid."""
    patch_size: int = 2
    """Side of the square latent patch turned into one token (SD3: 2)."""
    in_channels: int = 16
    """Latent channels of the input (SD3 VAE: 16)."""
    out_channels: int = 16
    """Latent channels of the predicted velocity (SD3: 16)."""
    num_layers: int = 24
    """Number of joint (MMDiT) blocks; the last one is context_pre_only (SD3-medium: 24)."""
    attention_head_dim: int = 64
    """Channels per attention head (SD3: 64)."""
    num_attention_heads: int = 24
    """Attention heads; hidden size = heads x head dim (SD3-medium: 24 -> 1536)."""
    joint_attention_dim: int = 4096
    """Width of the text-sequence conditioning fed to the context embedder (SD3: 4096)."""
    caption_projection_dim: int = 1536
    """Output width of the context embedder; must equal the hidden size (SD3-medium: 1536)."""
    pooled_projection_dim: int = 2048
    """Width of the pooled text conditioning (SD3: 2048)."""
    pos_embed_max_size: int = 192
    """Side of the persistent 2-D sin-cos grid that positions are centre-cropped from (SD3-medium: 192)."""
    recompute: bool = False
    """Recompute every joint block's activations in the backward pass (activation checkpointing)."""

    @property
    def hidden_size(self) -> int:
        """Width of both token streams (heads x head dim)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ffn_hidden_size(self) -> int:
        """Width of the GELU-tanh feed-forward layers (4 x hidden, as in SD3)."""
        return 4 * self.hidden_size

    @property
    def base_grid_size(self) -> int:
        """Base size of the positional grid in tokens (``sample_size / patch_size``)."""
        return self.sample_size // self.patch_size

    @classmethod
    def from_diffusers(cls, config_dict: Dict[str, Any]) -> "DiTConfig":
        """Build from a diffusers ``SD3Transformer2DModel`` ``config.json`` dictionary.

        Raises:
            ValueError: for SD3.5-only features (dual attention layers, QK norm) or unknown keys.
        """
        class_name = config_dict.get("_class_name", "SD3Transformer2DModel")
        if class_name != "SD3Transformer2DModel":
            raise ValueError(f"config.json describes a {class_name}, not an SD3Transformer2DModel (give the "
                             "transformer/ folder of an SD3 diffusers pipeline)")
        unsupported = []
        if config_dict.get("dual_attention_layers"):
            unsupported.append(f"dual_attention_layers={list(config_dict['dual_attention_layers'])}")
        if config_dict.get("qk_norm"):
            unsupported.append(f"qk_norm={config_dict['qk_norm']}")
        known = {f.name for f in fields(cls)} | {"dual_attention_layers", "qk_norm"}
        unknown = sorted(k for k in config_dict if k not in known and k not in _DIFFUSERS_BOOKKEEPING_KEYS)
        if unknown:
            unsupported.append(f"unknown keys {unknown}")
        if unsupported:
            raise ValueError(f"unsupported SD3Transformer2DModel config options: {', '.join(unsupported)}")
        values = {f.name: config_dict[f.name] for f in fields(cls) if f.name in config_dict}
        if values.get("out_channels") is None:
            values["out_channels"] = values.get("in_channels", cls.in_channels)
        return cls(**values)

    def to_diffusers(self) -> Dict[str, Any]:
        """The diffusers ``SD3Transformer2DModel`` config dictionary of this configuration."""
        names = [f.name for f in fields(self) if f.name != "recompute"]
        config = {name: getattr(self, name) for name in names}
        config.update(_class_name="SD3Transformer2DModel", dual_attention_layers=[], qk_norm=None)
        return config

    def validate(self, tensor_model_parallel_size: int = 1) -> List[str]:
        """Every rule this tower imposes, as flag-naming messages (empty when valid).

        Args:
            tensor_model_parallel_size: the run's TP size (attention heads are split over it).
        """
        tp = tensor_model_parallel_size
        problems = [
            f"--dit-{name.replace('_', '-')} ({getattr(self, name)}) must be at least 1"
            for name in ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                         "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "pos_embed_max_size")
            if getattr(self, name) < 1
        ]
        if problems:
            return problems
        if self.num_attention_heads % tp:
            problems.append(
                f"--dit-num-attention-heads ({self.num_attention_heads}) must be divisible by "
                f"--tensor-model-parallel-size ({tp}); use a --tensor-model-parallel-size of "
                f"{', '.join(map(str, _divisors(self.num_attention_heads)))}"
            )
        if self.caption_projection_dim != self.hidden_size:
            problems.append(
                f"--dit-caption-projection-dim ({self.caption_projection_dim}) must equal --dit-num-attention-heads "
                f"x --dit-attention-head-dim ({self.hidden_size}): both token streams share the attention width"
            )
        if self.sample_size % self.patch_size:
            problems.append(
                f"--dit-sample-size ({self.sample_size}) must be divisible by --dit-patch-size ({self.patch_size})"
            )
        elif self.base_grid_size > self.pos_embed_max_size:
            problems.append(
                f"--dit-pos-embed-max-size ({self.pos_embed_max_size}) must be at least --dit-sample-size / "
                f"--dit-patch-size ({self.base_grid_size})"
            )
        if self.attention_head_dim % 2 or self.hidden_size % 4:
            problems.append(
                f"--dit-attention-head-dim ({self.attention_head_dim}) must be even and the hidden size "
                f"({self.hidden_size}) a multiple of 4 (sin-cos timestep and 2-D position embeddings)"
            )
        return problems

    def to_transformer_config(
        self,
        tensor_model_parallel_size: int = 1,
        params_dtype: torch.dtype = torch.float32,
        fp8: Optional[str] = None,
        fp8_recipe: str = "delayed",
        recompute: Optional[bool] = None,
        use_cpu_initialization: Optional[bool] = None,
        init_method_std: float = 0.02,
    ):
        """The megatron-core ``TransformerConfig`` the joint blocks are built from.

        Args:
            tensor_model_parallel_size: TP size (heads and MLP columns are split over it).
            params_dtype: dtype of the parameters (fp32 on CPU, bf16 on GPU by default).
            fp8: ``e4m3`` / ``hybrid`` FP8 through Transformer Engine, or None. Asking for FP8 without a usable
                Transformer Engine raises (megatron-core alone would silently ignore it).
            fp8_recipe: Transformer Engine scaling recipe.
            recompute: recompute every block in backward; default ``self.recompute``.
            use_cpu_initialization: default True exactly when CUDA is absent.
            init_method_std: std of the normal weight initialisation (biases start at zero).
        """
        from megatron.core.transformer import TransformerConfig

        if fp8 is not None and transformer_engine_error() is not None:
            raise RuntimeError(
                f"--fp8-format ({fp8}) for the DiT needs Transformer Engine with CUDA, but "
                f"{transformer_engine_error()}; drop --fp8-format or run on a GPU with transformer-engine"
            )
        self.check(tensor_model_parallel_size)
        recompute = self.recompute if recompute is None else recompute
        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            kv_channels=self.attention_head_dim,
            normalization="LayerNorm",
            layernorm_epsilon=1e-6,
            activation_func=_gelu_tanh,
            add_bias_linear=True,
            add_qkv_bias=True,
            init_method_std=init_method_std,
            **runtime_transformer_kwargs(
                tensor_model_parallel_size, 1, params_dtype, fp8, fp8_recipe, recompute, use_cpu_initialization
            ),
        )
