#!/usr/bin/env python
"""Convert a Puffin-4M-layout folder into megatron_puffin indexed shards.

    python tools/preprocess_data.py --input /data/Puffin-4M/training_data --output-prefix /data/puffin_indexed \
        --workers 16 [--shard-size 10000] [--max-image-size 1024] [--strict] [--limit N]

Writes <output-prefix>/<subset>/shard-NNNNN/ (main, cross_view, photography) and <output-prefix>/dataset.json;
--heldout-records N puts the last N records of each subset into <output-prefix>/heldout/<subset>/ instead.
Re-running with the same flags resumes: finished shards are skipped (a shard whose summary records changed is an
error naming it; one that holds no sample is made again). The input is only read. Bad samples are skipped and
counted per reason (report and shard manifests); --strict stops at the first one with its path; a subset whose
records all are bad ends the run with exit 1, naming a bad file.
"""
import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_puffin.process_lifetime import exit_quietly_while_starting  # noqa: E402

exit_quietly_while_starting(__name__, "preprocess_data.py")  # Ctrl-C while the libraries below load: one line

from megatron_puffin.data.preprocess import (  # noqa: E402
    PreprocessOptions,
    StrictModeError,
    empty_subset_problems,
    preprocess,
)


def build_parser() -> argparse.ArgumentParser:
    """The flag groups: input, output, processing, runtime."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input")
    group.add_argument("--input", required=True, type=Path, help="Puffin-4M training_data root (read only).")
    group.add_argument("--limit", type=int, default=None, help="Use only the first N summary records of each subset.")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True, type=Path, help="Output directory for shards and report.")
    group.add_argument("--shard-size", type=int, default=10000, help="Summary records per shard (default 10000).")
    group.add_argument("--heldout-records", type=int, default=0,
                       help="Hold out the last N summary records of each subset: written to "
                       "<output-prefix>/heldout/<subset> (for --valid-task-stream) instead of the training shards "
                       "(default 0: none).")
    group = parser.add_argument_group("processing")
    group.add_argument(
        "--max-image-size", type=int, default=None,
        help="Downscale (bicubic) and re-encode as JPEG images whose longest side exceeds this; default keeps bytes.",
    )
    group.add_argument("--strict", action="store_true", help="Stop at the first bad sample, naming file and reason.")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="Worker processes (default 1).")
    group.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    group.add_argument("--log-level", default="WARNING", type=str.upper,
                       choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                       help="Python logging level (default WARNING).")
    return parser


def _print_report(report: dict) -> None:
    print(f"preprocessed {report['input']} -> {report['output_prefix']}")
    for name, stats in report["subsets"].items():
        print(
            f"  {name:12s} records {stats['records']:>9d}  samples {stats['samples']:>9d}  shards {stats['shards']} "
            f"new + {stats['shards_skipped']} already done  bad {sum(stats['bad_samples'].values())}"
        )
    for reason, count in report["bad_samples"].items():
        print(f"  bad samples: {reason:24s} {count}")
    rate = report["records_per_s"]
    print(f"  {report['records_processed']} records in {report['elapsed_s']} s ({rate} samples/s)")
    print(json.dumps({"samples": report["samples"], "bad_samples": report["bad_samples"]}))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_puffin.process_lifetime import WorkerLost, one_process_problem

    problem = one_process_problem("preprocess_data.py")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = PreprocessOptions(
        input=args.input,
        output_prefix=args.output_prefix,
        workers=args.workers,
        shard_size=args.shard_size,
        max_image_size=args.max_image_size,
        strict=args.strict,
        limit=args.limit,
        progress=not args.no_progress,
        heldout_records=args.heldout_records,
    )
    try:
        report = preprocess(options)
    except StrictModeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except WorkerLost as error:
        print(f"error: {error}; the finished shards are kept and the half-written one removed: run the same command "
              "again (with fewer --workers if the machine ran out of memory), it writes only the unfinished shards",
              file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a lost mount: the finished shards stay, the unfinished one is removed
        print(f"error: writing under --output-prefix {args.output_prefix} failed ({error.strerror or error}"
              f"{': ' + str(error.filename) if error.filename else ''}); the finished shards are kept: fix that and "
              "run the same command again, it redoes only the unfinished shards", file=sys.stderr)
        return 1
    _print_report(report)
    problems = empty_subset_problems(report)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    from megatron_puffin.process_lifetime import exit_on_ctrl_c, exit_process

    exit_process(exit_on_ctrl_c("preprocess_data.py", main, "the finished shards are kept and the half-written one "
                            "removed: run the same command again, it writes only the unfinished shards"))
