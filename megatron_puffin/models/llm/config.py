"""Configuration of the LLM tower (Qwen2.5 shape on megatron-core)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from megatron_puffin.models.common.transformer_config import runtime_transformer_kwargs


@dataclass
class LLMConfig:
    """The Qwen2.5 decoder: shapes, norms, RoPE and embedding tying."""

    num_layers: int = 28
    """Number of decoder layers (Qwen2.5-1.5B: 28)."""
    hidden_size: int = 1536
    """Hidden size of the decoder (Qwen2.5-1.5B: 1536)."""
    ffn_hidden_size: int = 8960
    """Intermediate size of the SwiGLU MLP (Qwen2.5-1.5B: 8960)."""
    num_attention_heads: int = 12
    """Number of query heads (Qwen2.5-1.5B: 12)."""
    num_query_groups: int = 2
    """Number of key/value heads for grouped-query attention (Qwen2.5-1.5B: 2)."""
    kv_channels: Optional[int] = None
    """Head dimension; default hidden-size / num-attention-heads."""
    vocab_size: int = 151936
    """Rows of the token embedding before padding for tensor parallelism (Qwen2.5: 151936)."""
    make_vocab_size_divisible_by: int = 1
    """Pad the vocabulary to a multiple of this times the tensor-parallel size; padded rows never reach outputs."""
    max_position_embeddings: int = 32768
    """Maximum sequence length the RoPE tables cover."""
    rotary_base: float = 1000000.0
    """RoPE theta (Qwen2.5: 1e6)."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = True
    """Share the token embedding with the output layer (Qwen2.5-1.5B: true)."""
    add_qkv_bias: bool = True
    """Bias on the q/k/v projections (Qwen2: true; o_proj and the MLP never have bias)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation (HF initializer_range)."""
    recompute: bool = False
    """Recompute every LLM layer's activations in the backward pass (activation checkpointing; the reference
    checkpoints the LLM in stages 2-4)."""

    FLAG_PREFIX = ""

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Vocabulary size padded to a multiple of ``make_vocab_size_divisible_by * TP``."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    @classmethod
    def from_hf(cls, config_dict: Dict[str, Any]) -> "LLMConfig":
        """Build from a Hugging Face Qwen2 ``config.json`` dictionary."""
        model_type = config_dict.get("model_type", "qwen2")
        if model_type != "qwen2":  # Qwen2.5 is "qwen2" too; another family's tensors would be reported one by one
            raise ValueError(f"config.json says model_type {model_type!r}: not a Qwen2 / Qwen2.5 model (model_type "
                             "'qwen2'), the only LLM this tower converts")
        unsupported = []
        if config_dict.get("use_sliding_window"):
            unsupported.append("use_sliding_window=true")
        if config_dict.get("rope_scaling"):
            unsupported.append(f"rope_scaling={config_dict['rope_scaling']}")
        if config_dict.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act={config_dict['hidden_act']}")
        if unsupported:
            raise ValueError(f"unsupported Qwen2 config options: {', '.join(unsupported)}")
        heads = config_dict["num_attention_heads"]
        return cls(
            num_layers=config_dict["num_hidden_layers"],
            hidden_size=config_dict["hidden_size"],
            ffn_hidden_size=config_dict["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=config_dict.get("num_key_value_heads", heads),
            kv_channels=config_dict.get("head_dim") or config_dict["hidden_size"] // heads,
            vocab_size=config_dict["vocab_size"],
            max_position_embeddings=config_dict.get("max_position_embeddings", 32768),
            rotary_base=float(config_dict.get("rope_theta", 10000.0)),
            norm_epsilon=config_dict.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(config_dict.get("tie_word_embeddings", False)),
            init_method_std=config_dict.get("initializer_range", 0.02),
        )

    def to_hf(self) -> Dict[str, Any]:
        """The Hugging Face ``Qwen2Config`` dictionary of this configuration."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rotary_base,
            "rms_norm_eps": self.norm_epsilon,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.init_method_std,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "torch_dtype": "float32",
        }

    def to_transformer_config(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        params_dtype: torch.dtype = torch.float32,
        sequence_parallel: bool = False,
        recompute: Optional[bool] = None,
        fp8: Optional[str] = None,
        fp8_recipe: str = "delayed",
        use_cpu_initialization: Optional[bool] = None,
        num_layers_in_first_pipeline_stage: Optional[int] = None,
        num_layers_in_last_pipeline_stage: Optional[int] = None,
    ):
        """The megatron-core ``TransformerConfig`` of this tower for a parallel layout and precision (decoder
        layers on the first/last pipeline stage: None for megatron-core's even split)."""
        from megatron.core.transformer import TransformerConfig

        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=self.add_qkv_bias,
            init_method_std=self.init_method_std,
            sequence_parallel=sequence_parallel,
            num_layers_in_first_pipeline_stage=num_layers_in_first_pipeline_stage,
            num_layers_in_last_pipeline_stage=num_layers_in_last_pipeline_stage,
            **runtime_transformer_kwargs(
                tensor_model_parallel_size, pipeline_model_parallel_size, params_dtype, fp8, fp8_recipe,
                self.recompute if recompute is None else recompute,
                use_cpu_initialization, fuse_bias_ops=True,
            ),
        )

