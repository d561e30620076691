"""Averaging task losses correctly over data-parallel ranks.

A micro-batch holds one task. Understanding losses are token means and generation losses per-sample means over the
*global* micro-batch (all data-parallel ranks together, docs/puffin.md §8). Data-parallel gradient reduction averages
gradients over ranks, so each rank back-propagates ``local_sum * dp_size / global_count``: the averaged gradient is
then exactly the gradient of the global mean, however unevenly tokens fall on the ranks.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megatron_puffin.training.objectives import ObjectiveResult


def global_mean_loss(
    result: ObjectiveResult, data_parallel_group: Optional[dist.ProcessGroup] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, global mean loss (detached), global count) for one task micro-batch.

    Args:
        result: the objective's result for the micro-batch (mean loss, its numerator and denominator).
        data_parallel_group: the group over which gradients are averaged; None for a single replica.
    """
    loss_sum = result.loss_sum.detach().to(torch.float64)
    count = result.count.detach().to(torch.float64).to(loss_sum.device)
    totals = torch.stack([loss_sum, count])
    dp_size = 1
    if data_parallel_group is not None and dist.is_initialized():
        dp_size = dist.get_world_size(data_parallel_group)
        if dp_size > 1:
            dist.all_reduce(totals, group=data_parallel_group)
    global_sum, global_count = totals[0], totals[1].clamp(min=1)
    scale = (count * dp_size / global_count).to(result.loss.dtype)
    return result.loss * scale, (global_sum / global_count).float(), global_count
