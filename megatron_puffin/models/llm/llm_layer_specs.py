"""Layer specs of the LLM tower: a Transformer Engine variant and a local (pure torch) variant of the same
Qwen2 decoder layer (RMSNorm, grouped-query self-attention with q/k/v bias, SwiGLU MLP)."""
from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_puffin.optional_deps import require_transformer_engine

TRANSFORMER_IMPLS = ("local", "transformer_engine")


def get_llm_layer_local_spec() -> ModuleSpec:
    """Pure-torch decoder layer: megatron-core's local attention and MLP with torch RMSNorm."""
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def get_llm_layer_with_transformer_engine_spec() -> ModuleSpec:
    """Transformer Engine decoder layer (fused norm + linear, TE attention, FP8-capable linears)."""
    require_transformer_engine("--transformer-impl transformer_engine")
    return get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm")


def get_llm_layer_spec(transformer_impl: str = "local") -> ModuleSpec:
    """The decoder layer spec for ``--transformer-impl``."""
    if transformer_impl == "local":
        return get_llm_layer_local_spec()
    if transformer_impl == "transformer_engine":
        return get_llm_layer_with_transformer_engine_spec()
    raise ValueError(f"--transformer-impl ({transformer_impl}) must be one of {', '.join(TRANSFORMER_IMPLS)}")
