"""One optimizer step over a cycle of task micro-batches, through megatron-core's pipeline schedules."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_puffin.models.batch import PuffinBatch
from megatron_puffin.training.losses import global_mean_loss
from megatron_puffin.training.objectives import ObjectiveResult, PuffinObjective


@dataclass
class StepResult:
    """What one step produced (per-task values are global means over data-parallel ranks)."""

    task_losses: Dict[str, List[float]] = field(default_factory=dict)
    """Each micro-batch's global mean loss, per task, in schedule order (last pipeline stage only)."""
    task_counts: Dict[str, float] = field(default_factory=dict)
    """Global supervised tokens (understanding) or samples (generation) per task over the step."""
    micro_batch_counts: Dict[str, List[float]] = field(default_factory=dict)
    """The global count behind each entry of ``task_losses``."""
    grad_norm: Optional[float] = None
    skipped: bool = False
    """True when the loss or the gradient norm was not finite and the optimizer did not step."""

    def task_loss(self, task: str) -> float:
        """The step's loss of ``task``: its micro-batches' global means weighted by their counts."""
        losses, counts = self.task_losses[task], self.micro_batch_counts[task]
        return sum(l * c for l, c in zip(losses, counts)) / max(sum(counts), 1.0)

    @property
    def loss_is_finite(self) -> bool:
        return all(math.isfinite(l) for losses in self.task_losses.values() for l in losses)


def stream_task(batch: Dict[str, Any]) -> Optional[str]:
    """The task of the stream a loader batch came from (``image2text_photography`` for the stream
    ``image2text_photography#0``), which logs and plots name; None for a batch built without the loader."""
    stream = batch.get("stream")
    return stream.split("#", 1)[0] if stream else None


def _loss_func(data_parallel_group, name: Optional[str], objective: PuffinObjective, batch: PuffinBatch,
               velocity_target, output):
    result: ObjectiveResult = objective.loss(batch, velocity_target, output)
    backward_loss, mean, count = global_mean_loss(result, data_parallel_group)
    return backward_loss, {"task": name or result.task, "loss": mean, "count": count}


def _forward_step(data_parallel_group, objective: Optional[PuffinObjective], data_iterator: Iterator, model):
    collated = next(data_iterator)
    batch = PuffinBatch.from_collated(collated)
    if objective is None:  # an intermediate stage: hidden states for the next one, no loss here
        return model(batch), None
    batch, velocity_target = objective.prepare(batch)
    # The schedule calls the loss function on the last stage only.
    return model(batch), functools.partial(_loss_func, data_parallel_group, stream_task(collated), objective, batch,
                                           velocity_target)


def model_process_groups(model):
    """The ``ProcessGroupCollection`` a (possibly DDP-wrapped) Puffin model was built with."""
    return getattr(model, "module", model).pg_collection


def forward_backward(model, batches: List[Dict[str, Any]], forward_only: bool = False,
                     objective: Optional[PuffinObjective] = None) -> StepResult:
    """Forward and backward over ``batches`` (one task each) with the schedule of the current layout; ``objective``
    defaults to :meth:`PuffinObjective.for_model` (None on stages without the loss).

    The schedule divides each micro-batch's loss by the number of micro-batches, so the step's gradient is the mean
    over the cycle of each task's global-mean-loss gradient (the reference's per-task micro-batches with GAS).
    """
    group = model_process_groups(model).dp
    objective = objective or PuffinObjective.for_model(model)
    schedule = get_forward_backward_func()
    seq_length = max(int(batch["input_ids"].shape[1]) for batch in batches)
    micro_batch_size = max(int(batch["input_ids"].shape[0]) for batch in batches)
    logs = schedule(
        forward_step_func=functools.partial(_forward_step, group, objective),
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
        result.micro_batch_counts.setdefault(entry["task"], []).append(float(entry["count"]))
        result.task_counts[entry["task"]] = result.task_counts.get(entry["task"], 0.0) + float(entry["count"])
    return result


def _all_ranks_agree(flag: bool) -> bool:
    """True only if ``flag`` is true on every rank (the loss is known on the last pipeline stage only)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([0.0 if flag else 1.0], device=_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item() == 0.0


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _optimizers(optimizer) -> List[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def guarded_optimizer_step(optimizer, loss_is_finite: bool) -> Tuple[bool, Optional[float]]:
    """Step megatron-core's optimizer unless the loss (any rank) or the gradient norm is not finite.

    megatron-core's ``optimizer.step()`` computes the norm and clips with it in one call, so a NaN gradient would
    already be applied; here the norm is computed first (``prepare_grads`` + ``get_grad_norm``, the same calls
    ``step()`` makes), and clipping and ``step_with_ready_grads`` run only when everything is finite.

    Returns:
        (stepped, gradient norm before clipping or None if it was not computed).
    """
    from megatron.core.optimizer import optimizer as megatron_optimizer

    found_inf = bool(optimizer.prepare_grads())
    if not _all_ranks_agree(loss_is_finite) or found_inf:
        return False, None
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    for sub in _optimizers(optimizer):
        params = sub.get_parameters()
        if params and sub.config.clip_grad > 0.0:
            # Looked up at call time: the CPU compatibility layer wraps this function (see distributed.cpu_compat).
            megatron_optimizer.clip_grad_by_total_norm_fp32(
                params, sub.config.clip_grad, grad_norm, sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            )
    return bool(optimizer.step_with_ready_grads()), grad_norm


def train_step(model, optimizer, batches: List[Dict[str, Any]]) -> StepResult:
    """Zero gradients, run :func:`forward_backward` (the schedule reduces gradients across ranks), and step the
    optimizer unless the loss or gradient norm is not finite (then ``skipped`` is set and nothing changes)."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    result = forward_backward(model, batches)
    stepped, grad_norm = guarded_optimizer_step(optimizer, result.loss_is_finite)
    result.grad_norm = grad_norm
    result.skipped = not stepped
    return result
