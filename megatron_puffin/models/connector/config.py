"""Configuration of the query path: 64 meta queries, ``llm2connector_{1,2}``, the two connector encoders and the
zero-initialised ``projector_{1,2}`` into the DiT's conditioning (docs/puffin.md §1.5-1.7)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional

import torch
import torch.nn.functional as F

from megatron_puffin.models.common.transformer_config import (
    CheckedConfig,
    encoder_transformer_kwargs,
    tensor_parallel_problems,
)
from megatron_puffin.optional_deps import transformer_engine_error


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (HF ``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


@dataclass
class ConnectorConfig(CheckedConfig):
    """The connectors between the LLM's meta-query states and the DiT (two identical bidirectional encoders)."""

    FLAG_PREFIX: ClassVar[str] = "connector-"
    TOWER: ClassVar[str] = "connector"

    num_queries: int = 64
    """Learnable meta queries appended to the prompt; their last-layer LLM states condition the DiT."""
    hidden_size: int = 1024
    """Width of each connector encoder (Puffin: 1024)."""
    num_layers: int = 6
    """Encoder layers per connector (Puffin: 6)."""
    num_attention_heads: int = 16
    """Attention heads per connector layer (Puffin: 16, head dim 64)."""
    ffn_hidden_size: int = 4096
    """Width of the tanh-GELU MLP of each connector layer (Puffin: 4096)."""
    layernorm_epsilon: float = 1e-6
    """Epsilon of the pre-attention and pre-MLP LayerNorms."""
    pooled_projection_dim: int = 2048
    """Width of the pooled conditioning from projector_1 (the DiT's pooled_projection_dim; SD3: 2048)."""
    joint_attention_dim: int = 4096
    """Width of the sequence conditioning from projector_2 (the DiT's joint_attention_dim; SD3: 4096)."""
    recompute: bool = False
    """Recompute every connector layer's activations in the backward pass (activation checkpointing)."""

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_attention_heads

    def validate(self, tensor_model_parallel_size: int = 1) -> List[str]:
        """Every rule of this group, as flag-naming messages (empty when valid)."""
        names = ("num_queries", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                 "pooled_projection_dim", "joint_attention_dim")
        problems = [
            f"--connector-{name.replace('_', '-')} ({getattr(self, name)}) must be at least 1"
            for name in names if getattr(self, name) < 1
        ]
        if problems:
            return problems
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"--connector-hidden-size ({self.hidden_size}) must be divisible by "
                            f"--connector-num-attention-heads ({self.num_attention_heads})")
        problems += tensor_parallel_problems(
            "connector", tensor_model_parallel_size,
            num_attention_heads=self.num_attention_heads, ffn_hidden_size=self.ffn_hidden_size,
        )
        if not self.layernorm_epsilon > 0:  # a layer norm of a constant row divides by sqrt(epsilon)
            problems.append(f"--connector-layernorm-epsilon ({self.layernorm_epsilon}) must be positive (e.g. 1e-6)")
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
        """The megatron-core ``TransformerConfig`` of a connector encoder (both connectors share it).

        Pipeline size 1: the connectors live whole on the last pipeline stage. megatron-core's initialisation
        runs (it also tags the tensor-parallel attributes of every weight) and :class:`~.model.QueryConditioner`
        then overwrites it with the reference initialisation (§1.6).

        Args:
            tensor_model_parallel_size: TP size (heads and MLP columns are split over it).
            params_dtype: parameter dtype.
            fp8: ``e4m3`` / ``hybrid`` through Transformer Engine, or None (raises without a usable TE).
            fp8_recipe: Transformer Engine scaling recipe.
            recompute: recompute every layer in backward; default ``self.recompute``.
            use_cpu_initialization: default True exactly when CUDA is absent.
        """
        from megatron.core.transformer import TransformerConfig

        if fp8 is not None and transformer_engine_error() is not None:
            raise RuntimeError(
                f"--fp8-format ({fp8}) for the connectors needs Transformer Engine with CUDA, but "
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
            activation_func=gelu_tanh,
            **encoder_transformer_kwargs(
                self.layernorm_epsilon, tensor_model_parallel_size, params_dtype, fp8, fp8_recipe, recompute,
                use_cpu_initialization,
            ),
        )
