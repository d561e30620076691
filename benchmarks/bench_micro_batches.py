"""Ours vs the reference micro-batch by micro-batch, taking turns: the per-task ratio with the host's drift cancelled.

Builds exactly what ``bench_training.py`` times (same flags: ``--real-proportions``, ``--levers``, sizes), runs
``--warmup-steps`` optimizer steps of both, draws one micro-batch per task and then, ``--turns`` times, runs each
task's micro-batch forward and backward on both sides, alternating which side goes first (ours through
``training.step.forward_backward``, megatron-core's schedule and DDP's buffer; the reference with
``loss.backward()``). No optimizer step is timed: where ``bench_training.py`` times whole steps in blocks
(consecutive blocks of one process drift by up to ~17 % on a shared host; alternating turns cancel that), this
isolates forward and backward; unlike ``bench_puffin.py`` (the bare models), ours runs the training path, with
the levers, the DDP gradient buffer and the weight-gradient accumulation the Trainer sets up. Prints per task the
median seconds of each side, reference / ours (> 1: ours faster) and the minor page faults and system seconds per
micro-batch (``getrusage``). Both sides run as a micro-batch in the middle of a training step does: their gradient
buffers exist and are zeroed before the timing, so both backwards accumulate (``profile_training.py``).

Each turn gives one paired ratio (the two sides ran back to back; ``paired`` is their median, where ``ref/ours`` is
the ratio of each side's median over the turns, which the host's drift between turns moves), then a 95 % bootstrap
interval of that median (``--bootstrap`` resamples, seeded) and its verdict: an interval that contains 1.0 says this
host cannot tell the two sides apart on that task with this many turns.

``--host-bound`` (tiny widths, the layers of ``--full-size``) makes every kernel negligible, so the table is each
side's host cost per micro-batch: what an eager step on a GPU pays when its kernels are shorter than their launch
path (docs/performance.md, round 13).

Usage:
    python benchmarks/bench_micro_batches.py --real-proportions --levers none --micro-batch-size 2 [--turns 4]
    python benchmarks/bench_micro_batches.py --real-proportions --levers none --tasks image2text,text2text --turns 40
    python benchmarks/bench_micro_batches.py --host-bound --depth-divisor 2 --levers host-malloc-cache --clock cpu
"""
from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import torch

import bench_training  # noqa: E402  (puts tests/ on sys.path through puffin_bench_common)
import profile_training  # noqa: E402
from puffin_bench_common import PAIRED_HEADER, paired_columns  # noqa: E402
from megatron_puffin.platform import setup  # noqa: E402
from bench_flags import positive_int, run_main  # noqa: E402

SIDES = (("ours", profile_training._our_micro_batch), ("reference", profile_training._reference_micro_batch))


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("turns")
    group.add_argument("--turns", type=positive_int, default=6, help="turns per task and side (median reported)")
    group.add_argument("--bootstrap", type=positive_int, default=2000,
                       help="resamples of the paired ratios for the 95 %% interval of their median")
    group.add_argument("--tasks", type=profile_training.task_list, default=[],
                       help="comma list of tasks to time (default: all six): more turns of a few tasks in the same "
                            "time")
    return bench_training._parse_args(parser, description=__doc__.split("\n\n")[0])


def _timed(prepare_and_run, clock) -> Tuple[float, int, float]:
    prepare, run = prepare_and_run
    prepare()  # untimed: the gradient buffers are zeroed once per optimizer step in training
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = clock()
    run()
    elapsed = clock() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return elapsed, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime


def main() -> None:
    args = _parse_args()
    setup()
    torch.set_num_threads(args.threads)
    clock = bench_training.CLOCKS[args.clock]
    import megatron_puffin.distributed as mpd

    with tempfile.TemporaryDirectory(prefix="bench_micro_batches_") as tmp:
        variants = bench_training.build_variants(args, Path(tmp))
        for cycle in variants.draw(args.warmup_steps):
            variants.our_step(cycle)
            variants.reference_step(cycle)
        batches = [batch for batch in variants.draw(1)[0] if not args.tasks or batch["task"] in args.tasks]
        results: Dict[Tuple[str, str], List[Tuple[float, int, float]]] = {}
        for turn in range(args.turns):
            for batch in batches:
                for side, make in (SIDES if turn % 2 == 0 else SIDES[::-1]):
                    results.setdefault((batch["task"], side), []).append(_timed(make(variants, batch), clock))
        mpd.destroy()
    bench_training.print_turns_header(
        args, f"forward+backward of one micro-batch per task, median of {args.turns} alternating turns")
    print(f"{'task':24s} {'ours s':>8s} {'ref s':>8s} {'ref/ours':>9s} {PAIRED_HEADER} {'faults ours':>12s} {'faults ref':>11s} {'sys ours':>9s} {'sys ref':>8s}")
    ratios = []
    for batch in batches:
        ours, ref = (results[(batch["task"], side)] for side, _ in SIDES)
        median = [statistics.median(column) for column in (*zip(*ours), *zip(*ref))]
        ratios.append(median[3] / median[0])
        paired = [r[0] / o[0] for o, r in zip(ours, ref)]
        print(f"{batch['task']:24s} {median[0]:8.3f} {median[3]:8.3f} {ratios[-1]:9.3f} "
              f"{paired_columns(paired, args.bootstrap)} {median[1]:12.0f} "
              f"{median[4]:11.0f} {median[2]:9.3f} {median[5]:8.3f}")
    print(f"geometric mean reference/ours: {statistics.geometric_mean(ratios):.3f}")


if __name__ == "__main__":
    run_main(main)
