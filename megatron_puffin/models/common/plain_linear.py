"""megatron-core's linear layers at tensor-parallel size 1 as one ``torch.nn.functional.linear`` call.

At TP=1 a megatron-core 0.16.1 ``ColumnParallelLinear`` / ``RowParallelLinear`` forward still passes through two
identity autograd functions (the tensor-parallel region copy, and the reduce or scatter), its own Python autograd
function for the product (``LinearWithGradAccumulationAndAsyncCommunication``, behind ``custom_fwd`` /
``custom_bwd`` autocast wrappers) and a separate bias add. Measured on a CPU (docs/performance.md, rounds 8 and 13):
about 245 µs more host time per forward + backward than ``torch.nn.Linear``. Where the kernels take microseconds
(a GPU at micro-batch 2) an eager step waits on that host time: a text2image micro-batch at half the released
depth calls such layers about 245 times.

:func:`make_forwards` builds the replacements of both classes' ``forward`` (patch ``PLAIN_LINEAR_AT_TP1`` of
:mod:`megatron_puffin.platform`): when the call is the product and the bias alone (:func:`is_plain`: TP=1, no
sequence parallelism, no fused weight-gradient accumulation, no deferred weight gradients, no CPU offloading, no
expert communication, the layer's own weight) it returns ``F.linear(input, weight, bias)``, whose autograd is torch's
C++ one; every other call goes to megatron-core's forward. The products are the same; the bias is added inside the
GEMM (as ``nn.Linear`` does) instead of after it, so results equal megatron-core's within rounding
(``tests/unit/test_megatron_speed_patches.py``). Inside ``torch.compile``'s tracing (``--compile``) the same rule
holds: the graph then holds one ``addmm`` per layer instead of megatron-core's autograd function, its matmul and a
separate bias add, one rule for eager and compiled layers (round 15 of docs/performance.md: on a CPU the compiled
training micro-batches take the same time either way, within 1 %).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

_SINGLE_RANK = "_puffin_single_tp_rank"


def _single_rank(layer: torch.nn.Module) -> bool:
    """The layer's tensor-parallel group has one rank (kept on the layer: a group's size never changes; not while
    dynamo traces, where writing the attribute would make the next call's guards fail and the layer recompile)."""
    if torch.compiler.is_compiling():
        return _group_has_one_rank(layer)
    single = layer.__dict__.get(_SINGLE_RANK)
    if single is None:
        single = layer.__dict__[_SINGLE_RANK] = _group_has_one_rank(layer)
    return single


def _group_has_one_rank(layer: torch.nn.Module) -> bool:
    group = getattr(layer, "tp_group", None)
    return group is not None and group.size() == 1


def is_plain(layer: torch.nn.Module) -> bool:
    """Whether megatron-core's forward of ``layer`` (column- or row-parallel) is ``F.linear`` on this call."""
    config = layer.config
    return (_single_rank(layer) and not layer.sequence_parallel and not layer.gradient_accumulation_fusion
            and not layer.explicit_expert_comm and not config.defer_embedding_wgrad_compute
            and config._cpu_offloading_context is None)


def _plain(layer: torch.nn.Module, input_: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """megatron-core's ``(output, output_bias)``: the bias in the output, or returned apart with skip_bias_add."""
    if layer.skip_bias_add:
        return F.linear(input_, layer.weight), layer.bias
    return F.linear(input_, layer.weight, layer.bias), None


def make_forwards(column_forward: Callable, row_forward: Callable) -> Tuple[Callable, Callable]:
    """The replacements of ``ColumnParallelLinear.forward`` and ``RowParallelLinear.forward`` (megatron-core's
    own, passed in, serve every call that is not plain)."""

    def column_parallel_forward(self, input_, weight=None, runtime_gather_output=None):
        if weight is None and self.weight is not None and is_plain(self):
            return _plain(self, input_)
        return column_forward(self, input_, weight, runtime_gather_output)

    def row_parallel_forward(self, input_):
        if is_plain(self):
            return _plain(self, input_)
        return row_forward(self, input_)

    column_parallel_forward.__doc__ = column_forward.__doc__
    row_parallel_forward.__doc__ = row_forward.__doc__
    return column_parallel_forward, row_parallel_forward
