"""Where the time of one training micro-batch goes, ours vs the reference, per task (torch.profiler).

Builds exactly what ``bench_training.py`` times (same flags: ``--real-proportions``, ``--levers``, sizes), runs
``--warmup-steps`` untimed optimizer steps of both, then profiles one forward+backward of each task's micro-batch:
ours through ``training.step.forward_backward`` (megatron-core's schedule, DDP gradient buffer), the reference as
its training step runs it (``loss.backward()``). Prints, per task, both wall times and the ``--top`` operators by
self CPU time of each side, and at the end the operators summed over all tasks.

Usage:
    python benchmarks/profile_training.py --real-proportions --levers none --micro-batch-size 1 [--tasks text2text]
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

import bench_training  # noqa: E402  (puts tests/ on sys.path through puffin_bench_common)
from megatron_puffin.platform import setup  # noqa: E402
from bench_flags import choice_list, positive_int, run_main  # noqa: E402
from helpers.puffin import TASK_STREAMS  # noqa: E402


#: ``--tasks``: a comma list of the six tasks (also bench_micro_batches.py's)
task_list = choice_list(tuple(TASK_STREAMS))


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("profile")
    group.add_argument("--top", type=positive_int, default=15, help="operators listed per side and task")
    group.add_argument("--tasks", type=task_list, default=[],
                       help="comma list of tasks to profile (default: all six)")
    return bench_training._parse_args(parser, description=__doc__.split("\n\n")[0])


def _profiled(prepare: Callable[[], Any], fn: Callable[[], Any]) -> Tuple[float, Dict[str, float]]:
    """Wall seconds of ``fn`` and the self CPU seconds per operator under the profiler (``prepare`` runs before,
    unprofiled)."""
    prepare()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
    return elapsed, {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}


# Both sides are profiled as a micro-batch in the middle of a step runs: gradients accumulate into buffers that
# already exist (ours: DDP's ``main_grad`` buffer; the reference: each parameter's ``.grad``, zeroed in place, not
# set to None, which would make its backward assign instead of add). Zeroing them happens once per optimizer step
# in training and is left out of the profile on both sides.
def _our_micro_batch(variants, batch) -> Tuple[Callable[[], Any], Callable[[], Any]]:
    from megatron_puffin.training.step import forward_backward

    def run():
        forward_backward(variants.trainer.ddp, [batch])
        variants.timer.marks.clear()
    return variants.trainer.ddp.zero_grad_buffer, run


def _reference_micro_batch(variants, batch) -> Tuple[Callable[[], Any], Callable[[], Any]]:
    def prepare():
        for parameter in variants.reference.parameters():
            if parameter.requires_grad and parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        variants.reference.zero_grad(set_to_none=False)

    def run():
        variants.reference(bench_training._without_moments(batch))["loss"].backward()
    return prepare, run


def _print_side_by_side(title: str, ours: Dict[str, float], ref: Dict[str, float], top: int) -> None:
    print(title)
    rows_ours = sorted(ours.items(), key=lambda kv: -kv[1])[:top]
    rows_ref = sorted(ref.items(), key=lambda kv: -kv[1])[:top]
    print(f"  {'ours: operator':44s} {'self s':>8s}   {'reference: operator':44s} {'self s':>8s}")
    for index in range(max(len(rows_ours), len(rows_ref))):
        left = rows_ours[index] if index < len(rows_ours) else ("", 0.0)
        right = rows_ref[index] if index < len(rows_ref) else ("", 0.0)
        print(f"  {left[0][:44]:44s} {left[1]:8.3f}   {right[0][:44]:44s} {right[1]:8.3f}")


def main() -> None:
    args = _parse_args()
    logging.basicConfig(level=logging.WARNING)
    setup()
    torch.set_num_threads(args.threads)
    import megatron_puffin.distributed as mpd

    totals: List[Dict[str, float]] = [{}, {}]
    with tempfile.TemporaryDirectory(prefix="profile_training_") as tmp:
        variants = bench_training.build_variants(args, Path(tmp))
        for cycle in variants.draw(args.warmup_steps):
            variants.our_step(cycle)
            variants.reference_step(cycle)
        for batch in variants.draw(1)[0]:
            if args.tasks and batch["task"] not in args.tasks:
                continue
            ours_s, ours = _profiled(*_our_micro_batch(variants, batch))
            ref_s, ref = _profiled(*_reference_micro_batch(variants, batch))
            for total, table in zip(totals, (ours, ref)):
                for key, value in table.items():
                    total[key] = total.get(key, 0.0) + value
            _print_side_by_side(f"== {batch['task']} (seq {batch['input_ids'].shape[1]}): ours {ours_s:.3f} s, "
                                f"reference {ref_s:.3f} s, ratio ref/ours {ref_s / ours_s:.3f}", ours, ref, args.top)
        mpd.destroy()
    _print_side_by_side("== all profiled tasks", totals[0], totals[1], args.top)


if __name__ == "__main__":
    run_main(main)
