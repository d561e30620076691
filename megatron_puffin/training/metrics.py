"""What the training log reports: one fixed-field line per interval, the same numbers in TensorBoard and (optionally)
a JSON-lines file at full precision.

The line (STYLE 13; fields always in this order, tasks in stream order)::

    iter 40/200 | consumed image2text 640 cam2image 640 | lr 9.51E-05 | loss image2text 2.4312 cam2image 0.9120 |
    grad norm 1.203 | skipped 0 | samples/s image2text 21.3 cam2image 21.3 all 42.6 |
    tokens/s image2text 5120 cam2image 4480 | TFLOP/s 0.081 (MFU 14.2%) | data wait 2.1% | mem 3.12 GiB

Per-task losses are averages over the interval's steps weighted by the steps' token/sample counts (so they are the
mean over every supervised token or sample seen in the interval); throughput is global (all data-parallel ranks)
over the interval's wall time; TFLOP/s is model FLOPs per device (see :mod:`~.flops`); data wait is the share of
the interval spent waiting for the next micro-batch; memory is the peak since the start (CUDA allocated, or the
process's peak resident set on CPU).
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from megatron_puffin.files import atomic_path

logger = logging.getLogger(__name__)


def peak_memory_gib() -> float:
    """Peak CUDA memory allocated by this process, or its peak resident set size without CUDA."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


@dataclass
class Interval:
    """Sums over the steps of one logging interval (local to this rank until :meth:`reduce`)."""

    tasks: List[str]
    steps: int = 0
    skipped: int = 0
    loss_weighted: Dict[str, float] = field(default_factory=dict)
    loss_count: Dict[str, float] = field(default_factory=dict)
    samples: Dict[str, float] = field(default_factory=dict)
    tokens: Dict[str, float] = field(default_factory=dict)
    flops: float = 0.0
    data_wait: float = 0.0
    grad_norms: List[float] = field(default_factory=list)
    padding_tokens: float = 0.0
    """Padded LLM positions of the interval's micro-batches."""
    sequence_slots: float = 0.0
    """LLM positions of the interval's micro-batches (batch x padded length), for the padding fraction."""

    def add_padding(self, real_tokens: int, slots: int) -> None:
        """One micro-batch's real LLM tokens and its batch x padded-length positions."""
        self.sequence_slots += slots
        self.padding_tokens += slots - real_tokens

    def padding_percent(self) -> Optional[float]:
        """Share of the LLM's positions that were padding (None before any micro-batch)."""
        return 100.0 * self.padding_tokens / self.sequence_slots if self.sequence_slots else None

    def add_batch(self, task: str, samples: int, tokens: int, flops: float) -> None:
        self.samples[task] = self.samples.get(task, 0.0) + samples
        self.tokens[task] = self.tokens.get(task, 0.0) + tokens
        self.flops += flops

    def add_step(self, result) -> None:
        """A :class:`~.step.StepResult` (losses are already global means on the last pipeline stage)."""
        self.steps += 1
        self.skipped += int(result.skipped)
        if result.grad_norm is not None and math.isfinite(result.grad_norm) and not result.skipped:
            self.grad_norms.append(result.grad_norm)
        if result.skipped:
            return
        for task in result.task_losses:
            count = sum(result.micro_batch_counts[task])
            self.loss_weighted[task] = self.loss_weighted.get(task, 0.0) + result.task_loss(task) * count
            self.loss_count[task] = self.loss_count.get(task, 0.0) + count

    def reduce(self, data_parallel_group) -> None:
        """Sum samples, tokens and FLOPs over the data-parallel replicas (each rank counted only its own batches)."""
        if data_parallel_group is None or not torch.distributed.is_initialized():
            return
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        values = [self.samples.get(t, 0.0) for t in self.tasks] + [self.tokens.get(t, 0.0) for t in self.tasks]
        values += [self.padding_tokens, self.sequence_slots]
        totals = torch.tensor(values + [self.flops], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(totals, group=data_parallel_group)
        n = len(self.tasks)
        totals = totals.tolist()
        self.samples = dict(zip(self.tasks, totals[:n]))
        self.tokens = dict(zip(self.tasks, totals[n:2 * n]))
        self.padding_tokens, self.sequence_slots = totals[2 * n], totals[2 * n + 1]
        self.flops = totals[-1]

    def losses(self) -> Dict[str, float]:
        return {t: self.loss_weighted[t] / self.loss_count[t] for t in self.tasks if self.loss_count.get(t)}


@dataclass
class Report:
    """The numbers of one log line."""

    iteration: int
    train_iters: int
    consumed: Dict[str, int]
    lr: float
    losses: Dict[str, float]
    grad_norm: Optional[float]
    skipped_total: int
    samples_per_second: Dict[str, float]
    tokens_per_second: Dict[str, float]
    tflops_per_device: float
    mfu: Optional[float]
    data_wait_percent: float
    peak_memory_gib: Optional[float]
    bad_samples_total: int = 0
    """Samples of the logging rank that failed to decode and were replaced (since the start of the run)."""
    new_bad_samples: List[Dict[str, Any]] = field(default_factory=list)
    """Those met during this interval: stream, shard, index, reason."""
    padding_percent: Optional[float] = None

    def line(self, tasks: List[str]) -> str:
        def per_task(values: Dict[str, float], fmt: str) -> str:
            return " ".join(f"{t} {format(values[t], fmt)}" if t in values else f"{t} -" for t in tasks)

        samples_all = sum(self.samples_per_second.values())
        grad = "-" if self.grad_norm is None else f"{self.grad_norm:.3f}"
        mfu = "" if self.mfu is None else f" (MFU {100 * self.mfu:.1f}%)"
        mem = "-" if self.peak_memory_gib is None else f"{self.peak_memory_gib:.2f} GiB"
        return (
            f"iter {self.iteration}/{self.train_iters} | consumed {per_task(self.consumed, 'd')} | lr {self.lr:.3E} | "
            f"loss {per_task(self.losses, '.4f')} | grad norm {grad} | skipped {self.skipped_total} | "
            f"samples/s {per_task(self.samples_per_second, '.1f')} all {samples_all:.1f} | "
            f"tokens/s {per_task(self.tokens_per_second, '.0f')} | TFLOP/s {self.tflops_per_device:.3f}{mfu} | "
            f"data wait {self.data_wait_percent:.1f}% | mem {mem}"
            + (f" | bad samples {self.bad_samples_total}" if self.bad_samples_total else "")
            + ("" if self.padding_percent is None else f" | padding {self.padding_percent:.1f}%")
        )

    def scalars(self) -> Dict[str, float]:
        """TensorBoard tags (``tools/plot_metrics.py`` reads ``loss/<task>``, ``learning_rate``, ``grad_norm``)."""
        values: Dict[str, float] = {"learning_rate": self.lr, "skipped_steps": float(self.skipped_total),
                                    "tflops": self.tflops_per_device, "data_wait_percent": self.data_wait_percent,
                                    "samples_per_second/all": sum(self.samples_per_second.values())}
        if self.grad_norm is not None:
            values["grad_norm"] = self.grad_norm
        if self.peak_memory_gib is not None:
            values["peak_memory_gib"] = self.peak_memory_gib
        if self.bad_samples_total:
            values["bad_samples"] = float(self.bad_samples_total)
        if self.padding_percent is not None:
            values["padding_percent"] = self.padding_percent
        for task, value in self.losses.items():
            values[f"loss/{task}"] = value
        for task, value in self.consumed.items():
            values[f"consumed_samples/{task}"] = float(value)
        for task, value in self.samples_per_second.items():
            values[f"samples_per_second/{task}"] = value
        for task, value in self.tokens_per_second.items():
            values[f"tokens_per_second/{task}"] = value
        return values


def _quiet_tensorboard_write_errors() -> None:
    """TensorBoard writes its events from a thread: a failed write (a full disk) ends that thread with a traceback
    printed by Python, before the next ``add_scalar`` re-raises it where MetricsWriter logs it as one warning. Only
    that thread's OSError is made one log line; every other thread error keeps Python's handling."""
    previous = threading.excepthook
    if getattr(previous, "puffin_tensorboard", False):
        return

    def hook(args):
        if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
            logger.warning("TensorBoard's writer thread stopped: %s", args.exc_value)
            return
        previous(args)

    hook.puffin_tensorboard = True
    threading.excepthook = hook


def supersede_metrics_lines(path: str, start_iteration: int) -> int:
    """Moves the lines of the metrics file ``path`` that a run starting after ``start_iteration`` computes again
    (``"iteration"`` greater than it) and lines that are not a JSON record (the torn last line of a killed process)
    to ``<path>.superseded`` (appended, so earlier moves are kept too), byte for byte, and rewrites ``path`` with
    the other lines in one rename. Returns how many lines moved. Nothing is dropped: a kill between the two writes
    leaves a line in both files, never in neither; a failed write is logged and the file is left as it was (the
    run goes on, as for every metrics write)."""
    if not os.path.isfile(path):  # none yet, or not a regular file (--metrics-file /dev/stdout): nothing to move
        return 0
    try:
        with open(path, "rb") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        logger.warning("--metrics-file %s: not read (%s); lines of iterations after %d are not moved aside",
                       path, error, start_iteration)
        return 0
    kept, moved, torn = [], [], 0
    for line in lines:
        if not line.strip():
            continue
        iteration = _record_iteration(line)
        torn += iteration is None
        (kept if iteration is not None and iteration <= start_iteration else moved).append(line)
    if not moved:
        return 0
    superseded = path + ".superseded"
    try:
        with open(superseded, "ab") as handle:
            handle.write(b"".join(line + b"\n" for line in moved))
            handle.flush()
            os.fsync(handle.fileno())
        with atomic_path(path) as temporary:
            temporary.write_bytes(b"".join(line + b"\n" for line in kept))
    except OSError as error:
        logger.warning("--metrics-file %s: %d line(s) after iteration %d not moved aside (%s); this run's lines "
                       "for those iterations follow them", path, len(moved), start_iteration, error)
        return 0
    reason = f"{len(moved) - torn} of iterations after {start_iteration}, which this run computes again"
    if torn:
        reason += f"; {torn} not a JSON record (a line cut short by a kill)"
    logger.warning("--metrics-file %s: %d line(s) moved to %s (%s)", path, len(moved), superseded, reason)
    return len(moved)


def _record_iteration(line: bytes) -> Optional[int]:
    """The ``"iteration"`` of one metrics-file line, None when the line is not such a record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    iteration = record.get("iteration") if isinstance(record, dict) else None
    return iteration if isinstance(iteration, int) and not isinstance(iteration, bool) else None


class MetricsWriter:
    """Writes reports to the log, TensorBoard and a JSON-lines file (on the rank that owns the losses)."""

    def __init__(self, tasks: List[str], tensorboard_dir: Optional[str] = None, metrics_file: Optional[str] = None,
                 active: bool = True, start_iteration: int = 0) -> None:
        """``start_iteration``: the iteration the run starts after (the loaded checkpoint's, 0 for a new run).
        Records of later iterations, left by a run that went further than its last checkpoint, describe steps that
        are computed again: TensorBoard hides them (``purge_step``) and the metrics file moves them to
        ``<file>.superseded`` (:func:`supersede_metrics_lines`), so neither shows two values for one iteration."""
        self.tasks, self.active = tasks, active
        self.tensorboard = None
        self.metrics_file = metrics_file if active else None
        if self.metrics_file and os.path.dirname(self.metrics_file):
            os.makedirs(os.path.dirname(self.metrics_file), exist_ok=True)
        if self.metrics_file:
            supersede_metrics_lines(self.metrics_file, start_iteration)
        if active and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=tensorboard_dir, purge_step=start_iteration + 1)
            _quiet_tensorboard_write_errors()
        self.lost_lines = 0  # metrics-file lines not written since the last one that was
        self.lost_events = 0  # TensorBoard writes (one per log line) that failed since the last one that did not

    def write(self, report: Report) -> None:
        if not self.active:
            return
        logger.info("%s", report.line(self.tasks))
        self._tensorboard(report.iteration, report.scalars())
        if self.metrics_file:
            record = {"iteration": report.iteration, **report.scalars()}
            if report.new_bad_samples:
                record["bad_sample_list"] = report.new_bad_samples
            self._append(record)

    def write_scalars(self, iteration: int, scalars: Dict[str, float], line: str) -> None:
        """Another record of the same iteration (e.g. validation): ``line`` to the log, ``scalars`` to TensorBoard
        and as one JSON line (``{"iteration": ..., **scalars}``) to the metrics file."""
        if not self.active:
            return
        logger.info("%s", line)
        self._tensorboard(iteration, scalars)
        if self.metrics_file:
            self._append({"iteration": iteration, **scalars})

    def _tensorboard(self, iteration: int, scalars: Dict[str, float]) -> None:
        if self.tensorboard is None:
            return
        try:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, iteration)
            self.tensorboard.flush()
        except OSError as error:  # a full disk or a lost mount must not end the training run
            if not self.lost_events:  # once, not at every log line: the next success says how many went
                logger.warning("TensorBoard events of iteration %d not written (%s); training goes on (TensorBoard "
                               "stops writing for the rest of the run; the log and --metrics-file keep every "
                               "number)", iteration, error)
            self.lost_events += 1
            return
        if self.lost_events:
            logger.warning("TensorBoard events written again; those of %d log line(s) before were lost",
                           self.lost_events)
        self.lost_events = 0

    def _append(self, record: Dict) -> None:
        """One JSON line to the metrics file. A failed write (disk full, the directory removed, a lost mount) is
        logged and counted, and training goes on: the run's work is in its checkpoints, not in this file; the next
        line is tried again, and the first one written after a failure says how many were lost."""
        if self.lost_lines:
            record = {**record, "lost_metrics_lines": self.lost_lines}
        try:
            with open(self.metrics_file, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:
            if not self.lost_lines:
                logger.warning("--metrics-file %s: line of iteration %s not written (%s); training goes on, later "
                               "lines are tried again", self.metrics_file, record.get("iteration"), error)
            self.lost_lines += 1
            return
        if self.lost_lines:
            logger.warning("--metrics-file %s written again; %d line(s) before this one were lost",
                           self.metrics_file, self.lost_lines)
        self.lost_lines = 0

    def close(self) -> None:
        if self.tensorboard is not None:
            try:
                self.tensorboard.close()  # flushes what is still buffered
            except OSError as error:  # as in _tensorboard: the run's work is in its checkpoints, not in these events
                logger.warning("TensorBoard events not all written at the end of the run (%s)", error)
            self.tensorboard = None
