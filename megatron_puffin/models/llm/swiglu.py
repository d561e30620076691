"""SwiGLU of the LLM's fused ``linear_fc1`` output for the local (pure torch) spec, without megatron-core's copies.

megatron-core's local MLP applies a gated linear unit as ``silu(x[..., :F]) * (x[..., F:] + glu_linear_offset)``
on the ``[s, b, 2F]`` output of the fused gate/up projection. On CPU that costs, per layer and micro-batch, an
elementwise pass adding the offset 0.0 (forward), and in the backward a ``cat`` of the two halves' gradients (the
backward of ``torch.chunk``) into a fresh ``[s, b, 2F]`` tensor. :class:`SwiGLU` computes the same values with the
same kernels (``silu``, ``mul``; backward ``mul``, ``silu_backward``, the operands autograd would use) and writes
the two gradient halves straight into one ``[s, b, 2F]`` tensor: forward and backward are bit-identical to
megatron-core's ``glu`` with offset 0.0 and no clamp (``tests/unit/test_llm_swiglu.py``).

The MLP calls it on the whole fc1 output when ``TransformerConfig.use_te_activation_func`` is set and the layer
spec names an activation module (megatron-core's switch for "the spec's activation module replaces the config's
activation and the GLU split", named for Transformer Engine's fused activations); :func:`use_local_swiglu` sets
that switch for the local spec only. Under ``torch.compile`` the plain formulation is traced instead (inductor
fuses it; a custom ``autograd.Function`` with ``out=`` writes gains nothing there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class _SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up`` of ``x = [gate, up]`` (last dim); the backward fills one gradient tensor in place."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(x, 2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(x, activated)
        return activated * up

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        x, activated = ctx.saved_tensors
        gate, up = torch.chunk(x, 2, dim=-1)
        grad_x = torch.empty_like(x)
        grad_gate, grad_up = torch.chunk(grad_x, 2, dim=-1)
        # The operands of autograd's MulBackward0 (grad * other) and SiluBackward0 (silu_backward(grad, self)).
        torch.mul(grad_output, activated, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_output * up, gate, grad_input=grad_gate)
        return grad_x


class SwiGLU(MegatronModule):
    """The MLP's activation module for the local LLM spec: ``[..., 2F] -> [..., F]`` (see the module docstring).
    A ``MegatronModule`` without parameters: the MLP's ``sharded_state_dict`` asks every child for its (empty) part.

    Args:
        config: the LLM's ``TransformerConfig`` (megatron-core builds activation modules with it); it must describe
            a plain SwiGLU: ``gated_linear_unit``, ``F.silu``, no clamp, ``glu_linear_offset`` 0.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config=config)
        if not is_plain_swiglu(config):
            raise ValueError("SwiGLU needs gated_linear_unit with F.silu, no activation clamp and glu_linear_offset 0")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            gate, up = torch.chunk(x, 2, dim=-1)
            return F.silu(gate) * up
        return _SwiGLUFunction.apply(x)


def is_plain_swiglu(config: TransformerConfig) -> bool:
    """Whether the config's MLP activation is exactly ``silu(gate) * up``."""
    return (
        config.gated_linear_unit
        and config.activation_func is F.silu
        and getattr(config, "activation_func_clamp_value", None) is None
        and getattr(config, "glu_linear_offset", 0.0) == 0.0
    )


def use_local_swiglu(config: TransformerConfig) -> bool:
    """Switch the local spec's MLPs to :class:`SwiGLU` (sets ``config.use_te_activation_func``) where it computes
    what megatron-core's unfused GLU computes; megatron-core's fused bias-SwiGLU (``bias_activation_fusion``, GPU)
    keeps its own path. Returns whether the switch is on."""
    if config.bias_activation_fusion or not is_plain_swiglu(config):
        return False
    config.use_te_activation_func = True
    return True
