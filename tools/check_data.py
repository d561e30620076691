#!/usr/bin/env python
"""Read every sample of a dataset's shards as training reads them, and name each damaged one, before a run.

    python tools/check_data.py --data /data/puffin4m/main /data/puffin4m/cross_view [--workers 8]

For each shard under the ``--data`` paths: every sample's fields against their stored per-sample CRC-32, texts as
UTF-8, cameras finite, images decoded completely, and cached VAE latents (tools/cache_latents.py) against their
checksums and shapes. Prints one line per damaged sample (``shard DIR index I: REASON``) and per shard that cannot
be read at all, then a summary. Exit status 0 when nothing is damaged, 1 when something is, 2 for a flag mistake.
It writes nothing. Training skips and counts damaged samples on its own (--max-bad-samples); this finds them
before the GPUs do, e.g. after copying a dataset to a cluster. Shards written before the checksums existed are
only decoded (the summary counts them): tools/preprocess_data.py writes new shards with checksums.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_puffin.process_lifetime import exit_quietly_while_starting  # noqa: E402

exit_quietly_while_starting(__name__, "check_data.py")  # Ctrl-C while the libraries below load: one line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="Dataset directories (shards at any depth).")
    parser.add_argument("--workers", type=int, default=1, help="Worker processes, one shard each at a time.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    parser.add_argument("--log-level", default="ERROR", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="Python logging level.")
    return parser


def _shards(paths):
    """(shard directories, one line per --data path that holds no readable set of shards)."""
    from megatron_puffin.data.format import DatasetFormatError, find_shards

    shards, problems = {}, []
    for path in paths:
        try:  # a shard named by two paths (one inside the other) is read once
            shards.update((os.path.realpath(shard), str(shard)) for shard in find_shards(path)
                          if os.path.realpath(shard) not in shards)
        except DatasetFormatError as error:
            problems.append(f"--data {path}: {' '.join(str(error).split())}")
    return list(shards.values()), problems


def _reports(shards, workers):
    from megatron_puffin.data.scrub import check_shard
    from megatron_puffin.process_lifetime import worker_pool

    if workers <= 1 or len(shards) <= 1:
        yield from map(check_shard, shards)
        return
    with worker_pool(min(workers, len(shards))) as pool:
        yield from pool.imap(check_shard, shards)


def _summary(reports, unreadable_paths) -> str:
    samples = sum(report.samples for report in reports)
    damaged = sum(len(report.bad) for report in reports)
    broken = sum(report.error is not None for report in reports) + unreadable_paths
    unchecked = sum(not report.checksums for report in reports if report.error is None)
    latents = [report.latents for report in reports if report.latents is not None]
    notes = [f"{unchecked} without checksums, decoded only"] if unchecked else []
    if latents:
        notes.append(f"{len(latents)} with cached latents"
                     + (f", {latents.count(False)} of them without checksums" if False in latents else ""))
    line = (f"checked {samples} samples in {len(reports)} shard(s){' (' + '; '.join(notes) + ')' if notes else ''}: "
            f"{damaged} damaged sample(s), {broken} unreadable shard(s) or path(s)")
    if damaged or broken:
        line += ("; training skips and counts damaged samples (--max-bad-samples) and stops at start-up on an "
                 "unreadable shard: copy the shards named above again, or re-create them with "
                 "tools/preprocess_data.py (latents: tools/cache_latents.py --overwrite)")
    return line


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_puffin.process_lifetime import WorkerLost, one_process_problem

    errors = [problem for problem in [one_process_problem("check_data.py")] if problem]
    if args.workers < 1:
        errors.append(f"--workers ({args.workers}) must be >= 1")
    errors += [f"--data {path} does not exist" for path in args.data if not os.path.exists(path)]
    if errors:
        print("error: " + "; ".join(errors), file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    shards, problems = _shards(args.data)
    for problem in problems:
        print(problem)
    reports = []
    try:
        with tqdm(total=len(shards), unit="shard", desc="check", disable=args.no_progress, file=sys.stderr) as bar:
            for report in _reports(shards, args.workers):
                for line in report.bad:
                    bar.write(f"shard {report.shard} {line}", file=sys.stdout)
                if report.error is not None:
                    bar.write(f"shard {report.shard}: cannot be read ({report.error})", file=sys.stdout)
                reports.append(report)
                bar.update(1)
    except WorkerLost as error:
        print(f"error: {error}; nothing was written: run it again (with fewer --workers if the machine ran out of "
              "memory)", file=sys.stderr)
        return 1
    print(_summary(reports, len(problems)))
    return 1 if problems or any(report.bad or report.error for report in reports) else 0


if __name__ == "__main__":
    from megatron_puffin.process_lifetime import exit_on_ctrl_c, exit_process

    exit_process(exit_on_ctrl_c("check_data.py", main, "nothing was written"))
