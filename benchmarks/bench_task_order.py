"""Whether a task's micro-batch costs each side more or less as the first of its optimizer step than as the third.

``bench_training.py`` charges each task the forward+backward time of its micro-batch inside whole optimizer steps,
always in the same cycle order (its ``--task-stream`` order, image2text first). The two sides do not accumulate
gradients alike: the reference's first backward of a step *assigns* each parameter's ``.grad`` (the optimizer
step set them to None) and later ones add to it, while ours adds every micro-batch's gradients into DDP's zeroed
buffer. So the first task's per-task ratio may carry a cost or a saving that belongs to its place in the step,
not to the task; the overall (whole-step) ratio does not depend on the order.

This builds exactly what ``bench_training.py`` times (same flags), runs ``--warmup-steps`` steps of both, then,
``--turns`` times, draws one cycle and trains it twice per side: once with ``--task`` moved to the front and once
with it third, the two orders alternating which goes first. Each turn gives per side one paired ratio of the
task's time, first / third (< 1: cheaper first), with the median over the turns, its 95 % bootstrap interval and a
verdict. The last line is how much that moves ``bench_training.py``'s ours / reference ratio for the task when it
runs first: ours' first / third over the reference's (< 1: the whole-step table reads the task low for ours).

Usage:
    python benchmarks/bench_task_order.py --real-proportions --levers none --micro-batch-size 2 --threads 1 \\
        --clock cpu --turns 12 [--task image2text]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List

import torch

import bench_training  # noqa: E402  (puts tests/ on sys.path through puffin_bench_common)
from puffin_bench_common import median_interval  # noqa: E402
from megatron_puffin.platform import setup  # noqa: E402
from bench_flags import positive_int, run_main  # noqa: E402
from helpers.puffin import TASK_STREAMS  # noqa: E402

SIDES = ("ours", "reference")
POSITION = 2
"""Where the task runs in the other order: third (the cycle has six micro-batches)."""


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("task order")
    group.add_argument("--task", choices=tuple(TASK_STREAMS), default="image2text",
                       help="the task moved between the front of the step and third place (default image2text)")
    group.add_argument("--turns", type=positive_int, default=8, help="turns: one cycle in both orders per side")
    group.add_argument("--bootstrap", type=positive_int, default=2000,
                       help="resamples of the paired ratios for the 95 %% interval of their median")
    return bench_training._parse_args(parser, description=__doc__.split("\n\n")[0])


def orders(cycle: List[Dict], task: str) -> Dict[str, List[Dict]]:
    """The cycle with ``task``'s micro-batch first, and with it at :data:`POSITION`; the others keep their order."""
    moved = [batch for batch in cycle if batch["task"] == task]
    if len(moved) != 1:
        raise ValueError(f"the cycle holds {len(moved)} micro-batches of {task}, not one")
    others = [batch for batch in cycle if batch["task"] != task]
    return {"first": moved + others, "third": others[:POSITION] + moved + others[POSITION:]}


def verdict(low: float, high: float) -> str:
    """What a 95 % interval of first / third time ratios says."""
    if high < 1.0:
        return "cheaper first"
    if low > 1.0:
        return "dearer first"
    return "cannot tell apart"


def main() -> None:
    args = _parse_args()
    setup()
    torch.set_num_threads(args.threads)
    import megatron_puffin.distributed as mpd

    ratios: Dict[str, List[float]] = {side: [] for side in SIDES}
    times: Dict[str, Dict[str, List[float]]] = {side: {"first": [], "third": []} for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="bench_task_order_") as tmp:
        variants = bench_training.build_variants(args, Path(tmp))
        for cycle in variants.draw(args.warmup_steps):
            variants.our_step(cycle)
            variants.reference_step(cycle)
        for turn in range(args.turns):
            arranged = orders(variants.draw(1)[0], args.task)
            names = ["first", "third"] if turn % 2 == 0 else ["third", "first"]
            for side in SIDES:
                step = variants.our_step if side == "ours" else variants.reference_step
                for name in names:
                    times[side][name].append(step(arranged[name])["micro"][0 if name == "first" else POSITION])
                ratios[side].append(times[side]["first"][-1] / times[side]["third"][-1])
        mpd.destroy()
    bench_training.print_turns_header(
        args, f"{args.task}'s forward+backward first in the optimizer step vs third, {args.turns} turns per side")
    print(f"{'side':10s} {'first s':>8s} {'third s':>8s} {'first/third':>12s} {'95% interval':>13s} {'verdict':>17s}")
    for side in SIDES:
        low, high = median_interval(ratios[side], args.bootstrap)
        print(f"{side:10s} {statistics.median(times[side]['first']):8.3f} {statistics.median(times[side]['third']):8.3f} "
              f"{statistics.median(ratios[side]):12.3f} {f'{low:.3f}-{high:.3f}':>13s} {verdict(low, high):>17s}")
    shift = statistics.median(ratios["ours"]) / statistics.median(ratios["reference"])
    print(f"{args.task} first moves bench_training's ours/reference ratio by {1 / shift:.3f}x "
          "(ours' first/third over the reference's, inverted: < 1, the whole-step table reads it low for ours)")


if __name__ == "__main__":
    run_main(main)
