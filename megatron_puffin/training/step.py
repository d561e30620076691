"""One optimizer step over a cycle of task micro-batches, through megatron-core's pipeline schedules."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_puffin.training.losses import global_mean_loss


@dataclass
class StepResult:
    """What one step produced (per-task values are global means over data-parallel ranks)."""

    task_losses: Dict[str, List[float]] = field(default_factory=dict)
    task_counts: Dict[str, float] = field(default_factory=dict)
    grad_norm: Optional[float] = None
    skipped: bool = False


def _loss_func(data_parallel_group, output: Dict[str, torch.Tensor]):
    backward_loss, mean, count = global_mean_loss(output, data_parallel_group)
    task = next(key[len("loss_"):] for key in output if key.startswith("loss_") and key != "loss_sum")
    return backward_loss, {"task": task, "loss": mean, "count": count}


def _forward_step(data_parallel_group, data_iterator: Iterator, model):
    batch = next(data_iterator)
    # Intermediate stages return hidden states; the schedule calls the loss function on the last stage only.
    return model(batch), functools.partial(_loss_func, data_parallel_group)


def forward_backward(model, batches: List[Dict[str, Any]], forward_only: bool = False) -> StepResult:
    """Forward and backward over ``batches`` (one task each) with the schedule of the current layout.

    The schedule divides each micro-batch's loss by the number of micro-batches, so the step's gradient is the mean
    over the cycle of each task's global-mean-loss gradient (the reference's per-task micro-batches with GAS).
    """
    group = parallel_state.get_data_parallel_group()
    schedule = get_forward_backward_func()
    seq_length = max(int(batch["input_ids"].shape[1]) for batch in batches)
    micro_batch_size = max(int(batch["input_ids"].shape[0]) for batch in batches)
    logs = schedule(
        forward_step_func=functools.partial(_forward_step, group),
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    result = StepResult()
    for entry in logs or []:
        result.task_losses.setdefault(entry["task"], []).append(float(entry["loss"]))
        result.task_counts[entry["task"]] = result.task_counts.get(entry["task"], 0.0) + float(entry["count"])
    return result


def train_step(model, optimizer, batches: List[Dict[str, Any]]) -> StepResult:
    """Zero gradients, run :func:`forward_backward`, reduce gradients across ranks and step the optimizer."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    result = forward_backward(model, batches)
    success, grad_norm, _ = optimizer.step()
    result.grad_norm = None if grad_norm is None else float(grad_norm)
    result.skipped = not success
    return result
