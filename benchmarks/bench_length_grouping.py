"""Padding of the LLM's micro-batches: the reference's random order vs --length-grouped, same data, same run.

Both loaders read the same synthetic Puffin-4M dataset (rendered into a temporary directory) with the six task
streams; each draws ``--steps`` cycles of micro-batches. Reported per task and overall: the share of the LLM's
positions (batch x padded length) that are padding, and ratio = grouped / random padded positions.

Usage:
    python benchmarks/bench_length_grouping.py [--num-samples 256] [--micro-batch-size 4] [--steps 32]
        [--window 8] [--image-size 96]
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Dict

warnings.filterwarnings("ignore")

# puffin_bench_common (next to this script) comes first: importing it puts tests/ on sys.path for helpers.
import puffin_bench_common  # noqa: E402,F401
from helpers.puffin import TASK_STREAMS, make_tiny_dataset  # noqa: E402
from bench_flags import positive_int, run_main, synthetic_num_samples  # noqa: E402


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=synthetic_num_samples, default=256,
                        help="synthetic main samples (cross-view: N / 4)")
    parser.add_argument("--micro-batch-size", type=positive_int, default=4)
    parser.add_argument("--steps", type=positive_int, default=32, help="cycles of the six task streams drawn per order")
    parser.add_argument("--window", type=positive_int, default=8, help="--length-group-window (micro-batches)")
    parser.add_argument("--image-size", type=positive_int, default=96, help="image size (only the texts matter here)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def _padding(paths: Dict[str, str], args, grouped: bool) -> Dict[str, list]:
    from megatron_puffin.data import DataConfig, build_data_loader

    streams = [f"{stream}:{paths['data']}/{subset}:{args.micro_batch_size}"
               for stream, subset in TASK_STREAMS.values()]
    config = DataConfig(task_stream=streams, tokenizer=paths["tokenizer"], num_workers=0,
                        image_size=args.image_size, pin_memory=False, length_grouped=grouped,
                        length_group_window=args.window)
    iterator = iter(build_data_loader(config, seed=args.seed))
    counts: Dict[str, list] = {task: [0, 0] for task in TASK_STREAMS}
    for _ in range(args.steps * len(TASK_STREAMS)):
        batch = next(iterator)
        mask = batch["attention_mask"]
        counts[batch["task"]][0] += int(mask.numel() - mask.sum())
        counts[batch["task"]][1] += int(mask.numel())
    return counts


def main() -> None:
    args = _parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_length_grouping_") as tmp:
        paths = make_tiny_dataset(Path(tmp), num_samples=args.num_samples, seed=args.seed, image_size=args.image_size)
        results = {"random": _padding(paths, args, False), "grouped": _padding(paths, args, True)}
    print(f"LLM padding, {args.steps} cycles of six task micro-batches of {args.micro_batch_size}, "
          f"{args.num_samples} synthetic samples, --length-group-window {args.window}")
    print(f"{'task':22s} {'random pad %':>13s} {'grouped pad %':>14s} {'padded positions grouped/random':>32s}")
    totals = {name: [0, 0] for name in results}
    for task in TASK_STREAMS:
        random_pad, random_all = results["random"][task]
        grouped_pad, grouped_all = results["grouped"][task]
        for name in results:
            totals[name][0] += results[name][task][0]
            totals[name][1] += results[name][task][1]
        ratio = grouped_pad / random_pad if random_pad else float("nan")
        print(f"{task:22s} {100 * random_pad / random_all:13.1f} {100 * grouped_pad / grouped_all:14.1f} "
              f"{ratio:32.2f}")
    (rp, ra), (gp, ga) = totals["random"], totals["grouped"]
    print(f"{'all':22s} {100 * rp / ra:13.1f} {100 * gp / ga:14.1f} {gp / rp:32.2f}")
    print(f"LLM positions grouped/random: {ga / ra:.3f} (the work the LLM does on this data, padding included)")


if __name__ == "__main__":
    run_main(main)
