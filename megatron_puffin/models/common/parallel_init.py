"""Reference initialisations (PyTorch default, xavier-uniform...) for megatron-core tensor-parallel layers.

megatron-core initialises every linear with one ``init_method`` per config, which cannot express per-layer rules
such as "xavier-uniform over each of q, k, v" (§1.6) or "PyTorch default" (§1.4, §1.7). These helpers
initialise a parameter as *this rank's slice of a full tensor* drawn from the default CPU generator, which the
project seeds identically on every rank (:func:`megatron_puffin.distributed.seed_everything`): the result is the
same model at every tensor-parallel size, as megatron-core's own CPU initialisation.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from megatron.core.utils import get_pg_rank, get_pg_size

FullInit = Callable[[torch.Tensor], None]


def partition_dim(param: torch.Tensor) -> int:
    """The dimension megatron-core split ``param`` along over tensor-parallel ranks, or -1 if replicated."""
    if getattr(param, "tensor_model_parallel", False):
        return int(getattr(param, "partition_dim", -1))
    return -1


@torch.no_grad()
def init_slice_(param: torch.Tensor, full_init: FullInit, tp_group: Optional[torch.distributed.ProcessGroup]) -> None:
    """Fill ``param`` with this rank's slice (over ``tp_group``, None = no tensor parallelism) of a full fp32 CPU
    tensor initialised by ``full_init``."""
    world, rank = get_pg_size(tp_group), get_pg_rank(tp_group)
    dim = partition_dim(param)
    shape = list(param.shape)
    if dim >= 0:
        shape[dim] *= world
    full = torch.empty(shape, dtype=torch.float32)
    full_init(full)
    piece = full.chunk(world, dim)[rank] if dim >= 0 else full
    param.copy_(piece.to(device=param.device, dtype=param.dtype))


def uniform_init(bound: float) -> FullInit:
    """``U(-bound, bound)``."""
    return lambda tensor: tensor.uniform_(-bound, bound)


def normal_init(std: float) -> FullInit:
    """``N(0, std^2)``."""
    return lambda tensor: tensor.normal_(0.0, std)


def zeros_init() -> FullInit:
    return lambda tensor: tensor.zero_()


def xavier_bound(fan_in: int, fan_out: int) -> float:
    """Bound of xavier-uniform (gain 1) for a ``fan_out x fan_in`` matrix."""
    return math.sqrt(6.0 / (fan_in + fan_out))


@torch.no_grad()
def init_linear_like_torch_(
    weight: torch.Tensor, bias: Optional[torch.Tensor], fan_in: int, tp_group: Optional[torch.distributed.ProcessGroup]
) -> None:
    """PyTorch's ``nn.Linear`` default: weight and bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (kaiming-uniform
    with a = sqrt(5) reduces to this bound), sliced over ``tp_group``."""
    bound = 1.0 / math.sqrt(fan_in)
    init_slice_(weight, uniform_init(bound), tp_group)
    if bias is not None:
        init_slice_(bias, uniform_init(bound), tp_group)
