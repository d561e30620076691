"""Weight gradients accumulated straight into megatron-core's gradient buffer on CPU.

Without ``gradient_accumulation_fusion``, every megatron-core linear layer computes its weight gradient into a new
weight-sized tensor (``grad_output.t() @ input``), autograd hands it to the parameter, and the DDP hook adds it to
``param.main_grad`` (the gradient buffer) and drops it: one temporary and one extra pass over the weight per layer
and micro-batch. megatron-core's ``gradient_accumulation_fusion`` lets the GEMM accumulate into ``main_grad``
itself (apex's ``fused_weight_gradient_mlp_cuda``; GPU only). On CPU the same GEMM is
``main_grad.addmm_(grad_output.t(), input)`` (BLAS with beta 1): :data:`CPU_WGRAD_KERNELS` stands in for the apex
module (patch ``CPU_WGRAD_ACCUMULATION`` of :mod:`megatron_puffin.platform`, applied without CUDA when apex's
module is missing), and :func:`enable_gradient_accumulation_fusion` switches the layers of a megatron-core
``DistributedDataParallel`` model to it where megatron-core's linear function runs anyway: at tensor-parallel size 1
without sequence parallelism a layer is one ``F.linear`` instead (patch ``PLAIN_LINEAR_AT_TP1``), measured 2-3 %
faster per generation micro-batch at real proportions than the fused path, whose Python autograd function and
separate bias add cost more than the weight-sized temporary and the buffer ``add_`` it saves (round 15 of
docs/performance.md).

The gradients equal the unfused ones within fp32 rounding (the product is added to the buffer inside the GEMM
instead of after it; ``tests/unit/test_wgrad_accumulation.py``). On a GPU nothing changes: the patch does not
apply and :func:`enable_gradient_accumulation_fusion` switches nothing.
"""
from __future__ import annotations

import logging
import types

import torch

from megatron_puffin import patching

logger = logging.getLogger(__name__)

PATCH_NAME = "CPU_WGRAD_ACCUMULATION"


def _wgrad_gemm_accumulate(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """apex's ``wgrad_gemm_accum_fp32/fp16(input, grad_output, main_grad)``: ``main_grad += grad_output^T @ input``
    for 2-D ``[tokens, in]`` / ``[tokens, out]`` operands (megatron-core flattens them first); operands in another
    dtype than the buffer are accumulated in the buffer's dtype, as apex's fp32 kernel does for bf16 inputs."""
    if grad_output.dtype != main_grad.dtype:
        grad_output, total_input = grad_output.to(main_grad.dtype), total_input.to(main_grad.dtype)
    main_grad.addmm_(grad_output.t(), total_input)


CPU_WGRAD_KERNELS = types.SimpleNamespace(
    wgrad_gemm_accum_fp32=_wgrad_gemm_accumulate,
    wgrad_gemm_accum_fp16=_wgrad_gemm_accumulate,
)
"""The stand-in for apex's ``fused_weight_gradient_mlp_cuda`` module (the two functions megatron-core calls)."""


def cpu_wgrad_accumulation_needed() -> bool:
    """No CUDA and no apex kernel: the CPU stand-in is what makes ``gradient_accumulation_fusion`` usable."""
    from megatron.core.tensor_parallel import layers

    return not torch.cuda.is_available() and not layers._grad_accum_fusion_available


def cpu_wgrad_accumulation() -> list:
    """The ``CPU_WGRAD_ACCUMULATION`` row's replacements: megatron-core's linear layers find the apex module
    (missing: the attribute does not exist) and its availability flag, which their constructors check."""
    from megatron.core.tensor_parallel import layers

    return [(layers, "fused_weight_gradient_mlp_cuda", CPU_WGRAD_KERNELS), (layers, "_grad_accum_fusion_available", True)]


def enable_gradient_accumulation_fusion(ddp: torch.nn.Module) -> int:
    """Switch every megatron-core ``ColumnParallelLinear`` / ``RowParallelLinear`` of a megatron-core
    ``DistributedDataParallel`` model whose own weight trains in the gradient buffer to fused weight-gradient
    accumulation (the layer's ``gradient_accumulation_fusion``, what ``TransformerConfig.gradient_accumulation_fusion``
    sets at construction). Only where the CPU stand-in is applied; layers fed an external weight (the tied output
    layer) keep the unfused path, and layers that run as one ``F.linear`` (patch ``PLAIN_LINEAR_AT_TP1``: TP=1, no
    sequence parallelism) stay so. Not for ``torch.compile``d layers (dynamo cannot trace the in-place update of the
    buffer from the layer's backward): the caller skips it under ``--compile``.

    Returns:
        The number of layers switched (0 on a GPU, for FSDP2 or for a model without DDP's buffers).
    """
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_puffin.models.common.plain_linear import is_plain

    if PATCH_NAME not in patching.applied() or not isinstance(ddp, DistributedDataParallel):
        return 0
    plain = patching.in_place("PLAIN_LINEAR_AT_TP1")
    switched = 0
    for module in ddp.module.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and weight is not None
                and weight.requires_grad and hasattr(weight, "main_grad") and not (plain and is_plain(module))):
            module.gradient_accumulation_fusion = True
            switched += 1
    logger.info("weight gradients of %d linear layers accumulate into the gradient buffer (%s)", switched, PATCH_NAME)
    return switched
