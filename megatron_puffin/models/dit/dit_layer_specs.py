"""Layer specs of the DiT tower: a local (pure torch) and a Transformer Engine variant of the same SD3 joint
block. Both split q/k/v and fc1 column-parallel and the output projections and fc2 row-parallel; they differ
only in which classes do it.

* local: megatron-core ``ColumnParallelLinear`` / ``RowParallelLinear`` and torch SDPA
  (:class:`~megatron_puffin.models.common.attention.SDPADotProductAttention`).
* transformer_engine: ``TEColumnParallelLinear`` / ``TERowParallelLinear`` (FP8-capable GEMMs) and
  ``TEDotProductAttention`` (flash / cuDNN fused attention, padding masks as varlen). The AdaLN modulation
  layers stay megatron-core's local ``ColumnParallelLinear`` (their GEMMs have one row per sample, which FP8
  cannot take and which costs nothing; see :mod:`.joint_block`).
"""
from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_puffin.models.common.attention import SDPADotProductAttention
from megatron_puffin.models.dit.attention import JointAttention, JointAttentionSubmodules
from megatron_puffin.models.dit.joint_block import (
    FeedForward,
    FeedForwardSubmodules,
    JointTransformerBlock,
    JointTransformerBlockSubmodules,
)
from megatron_puffin.optional_deps import require_transformer_engine

TRANSFORMER_IMPLS = ("local", "transformer_engine")


def _joint_block_spec(column_linear, row_linear, core_attention) -> ModuleSpec:
    return ModuleSpec(
        module=JointTransformerBlock,
        submodules=JointTransformerBlockSubmodules(
            modulation=ColumnParallelLinear,
            attention=ModuleSpec(
                module=JointAttention,
                submodules=JointAttentionSubmodules(
                    linear_qkv=column_linear, core_attention=core_attention, linear_proj=row_linear
                ),
            ),
            feed_forward=ModuleSpec(
                module=FeedForward,
                submodules=FeedForwardSubmodules(linear_fc1=column_linear, linear_fc2=row_linear),
            ),
        ),
    )


def get_dit_layer_local_spec() -> ModuleSpec:
    """Pure-torch joint block: megatron-core tensor-parallel linears and torch SDPA."""
    return _joint_block_spec(ColumnParallelLinear, RowParallelLinear, SDPADotProductAttention)


def get_dit_layer_with_transformer_engine_spec() -> ModuleSpec:
    """Transformer Engine joint block (TE linears and fused attention; FP8-capable).

    Raises:
        RuntimeError: Transformer Engine or CUDA is unusable (with the install line).
    """
    require_transformer_engine("--transformer-impl transformer_engine (DiT)")
    return dit_transformer_engine_layer_spec()


def dit_transformer_engine_layer_spec() -> ModuleSpec:
    """The Transformer Engine joint-block spec itself (no availability check; the spec only names classes)."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TEDotProductAttention,
        TERowParallelLinear,
    )

    return _joint_block_spec(TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention)


def get_dit_layer_spec(transformer_impl: str = "local") -> ModuleSpec:
    """The joint-block spec for ``--transformer-impl``."""
    if transformer_impl == "local":
        return get_dit_layer_local_spec()
    if transformer_impl == "transformer_engine":
        return get_dit_layer_with_transformer_engine_spec()
    raise ValueError(f"--transformer-impl ({transformer_impl}) must be one of {', '.join(TRANSFORMER_IMPLS)}")
