"""Turn a Puffin-4M-layout folder into indexed shards (the library side of ``tools/preprocess_data.py``).

Output::

    <output_prefix>/dataset.json                 report: per subset counts, per-reason bad samples, flags, timing
    <output_prefix>/<subset>/shard-00000/...     one shard per ``shard_size`` consecutive summary records

Shard k of a subset holds the good samples among summary records [k * shard_size, (k + 1) * shard_size), so a
re-run skips every shard that already exists (resume) and recomputes only the missing ones. With
``heldout_records`` = N, the last N summary records of every subset form a held-out split, written in the same way
to ``<output_prefix>/heldout/<subset>/shard-NNNNN`` (for ``--valid-task-stream`` and evaluation) and left out of
the training shards. Work is spread over
``workers`` processes in chunks; results come back in order, so shards do not depend on the number of workers.
"""
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from megatron_puffin.data.format import DatasetFormatError, PuffinRecord, ShardWriter, read_manifest
from megatron_puffin.data.puffin4m import (
    RECORD_REASONS,
    BadSample,
    DuplicateRecord,
    SubsetLayout,
    build_record,
    discover_subsets,
    load_summary,
    mark_duplicates,
)
from megatron_puffin.files import folder_problem, locked, write_text_atomically
from megatron_puffin.process_lifetime import worker_pool

logger = logging.getLogger(__name__)

REPORT_NAME = "dataset.json"
LOCK_NAME = ".preprocess.lock"
"""Held in --output-prefix while a run writes there (removed at its end)."""


@dataclass
class PreprocessOptions:
    """What :func:`preprocess` does (mirrors the flags of ``tools/preprocess_data.py``).

    Attributes:
        input: Puffin-4M ``training_data`` root.
        output_prefix: Output directory (created); never inside ``input``.
        workers: Worker processes (1 = in-process).
        shard_size: Summary records per shard.
        max_image_size: Downscale and re-encode images whose longest side is larger (None keeps the bytes).
        strict: Stop at the first bad sample (raising :class:`StrictModeError`) instead of skipping it.
        limit: Use only the first ``limit`` records of each subset.
        progress: Show a progress bar on stderr.
        chunk_size: Records per unit of work sent to a worker.
        heldout_records: The last this many records of each subset go to ``heldout/<subset>`` instead (0: none).
    """

    input: Path
    output_prefix: Path
    workers: int = 1
    shard_size: int = 10000
    max_image_size: Optional[int] = None
    strict: bool = False
    limit: Optional[int] = None
    progress: bool = True
    chunk_size: int = 32
    heldout_records: int = 0


HELDOUT_FOLDER = "heldout"
"""Output sub-folder of the held-out split (``--heldout-records``)."""


class StrictModeError(RuntimeError):
    """Raised with ``strict``: the first bad sample, with its path and reason."""

    def __init__(self, bad: BadSample):
        super().__init__(f"bad sample {bad.path}: {bad.reason} ({bad.detail})")
        self.bad = bad


@dataclass
class _ShardPlan:
    key: str  # "main" or "heldout/main": the entry of the records, the output folder and the report
    layout: SubsetLayout
    index: int
    start: int
    stop: int
    directory: Path


def _check_options(options: PreprocessOptions) -> None:
    errors = []
    if not Path(options.input).is_dir():
        errors.append(f"--input ({options.input}) must be an existing directory")
    for name in ("workers", "shard_size", "chunk_size"):
        if getattr(options, name) < 1:
            errors.append(f"--{name.replace('_', '-')} ({getattr(options, name)}) must be >= 1")
    if options.max_image_size is not None and options.max_image_size < 96:
        errors.append(f"--max-image-size ({options.max_image_size}) must be >= 96 (images <= 80 px are rejected)")
    if options.limit is not None and options.limit < 0:
        errors.append(f"--limit ({options.limit}) must be >= 0")
    if options.heldout_records < 0:
        errors.append(f"--heldout-records ({options.heldout_records}) must be >= 0")
    output, source = Path(options.output_prefix).resolve(), Path(options.input).resolve()
    if output == source or source in output.parents:
        errors.append(f"--output-prefix ({output}) must not lie inside --input ({source}): the input is read-only")
    problem = folder_problem(output)  # the folder shards go under
    if problem:
        errors.append(f"--output-prefix ({options.output_prefix}): {problem}")
    if errors:
        raise ValueError("; ".join(errors))


def _shard_source(options: PreprocessOptions, plan: _ShardPlan, items: List[Any]) -> Dict[str, Any]:
    return {
        "input": str(Path(options.input).resolve()),
        "subset": plan.layout.name,
        "records": [plan.start, plan.stop],
        "subset_records": len(items),
        RECORDS_DIGEST_KEY: _records_digest(items[plan.start:plan.stop]),
    }


RECORDS_DIGEST_KEY = "records_sha256"
"""Key of a shard manifest's ``source``: a SHA-256 of the summary records the shard was built from, so a re-run
after the summary changed (paths corrected, records added in the middle) does not take the old shard for finished.
Shards written before it existed resume without the check."""


def _records_digest(items: List[Any]) -> str:
    canonical = [["duplicate", item.first_index, item.record] if isinstance(item, DuplicateRecord) else item
                 for item in items]
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def _shard_flags(options: PreprocessOptions) -> Dict[str, Any]:
    flags = {"shard_size": options.shard_size, "max_image_size": options.max_image_size}
    if options.heldout_records:  # only then, so outputs written before the flag existed still resume
        flags["heldout_records"] = options.heldout_records
    return flags


def _split_heldout(records: Dict[str, Tuple[SubsetLayout, List[Any]]], count: int):
    """Moves the last ``count`` records of every subset to the entry ``heldout/<subset>``."""
    if not count:
        return records
    split = {}
    for name, (layout, items) in records.items():
        keep = max(0, len(items) - count)
        split[name] = (layout, items[:keep])
        split[f"{HELDOUT_FOLDER}/{name}"] = (layout, items[keep:])
    return split


def _is_finished(plan: _ShardPlan, source: Dict[str, Any], flags: Dict[str, Any]) -> bool:
    """True when the shard exists from an identical run; raises when it exists from a different one. A shard whose
    records all were bad samples is removed and made again (False): its input may have been fixed since (files
    added, a caption folder renamed), and it holds nothing to lose."""
    if not plan.directory.exists():
        return False
    try:
        manifest = read_manifest(plan.directory)
    except DatasetFormatError as error:
        raise ValueError(f"{plan.directory} exists but is not a valid shard ({error}); delete it to rebuild") from error
    written = dict(manifest.get("source") or {})
    written_digest = written.pop(RECORDS_DIGEST_KEY, None)
    expected = {key: value for key, value in source.items() if key != RECORDS_DIGEST_KEY}
    if written != expected or manifest.get("flags") != flags:
        raise ValueError(
            f"{plan.directory} was written from another input or with other flags (source {manifest.get('source')}, "
            f"flags {manifest.get('flags')}); use a new --output-prefix or delete the old output"
        )
    if manifest.get("num_samples") == 0 and plan.stop > plan.start:
        logger.info("%s holds no sample of its %d records: reading them again", plan.directory, plan.stop - plan.start)
        shutil.rmtree(plan.directory)
        return False
    if written_digest is not None and written_digest != source[RECORDS_DIGEST_KEY]:
        raise ValueError(
            f"{plan.directory} was built from summary records {plan.start}-{plan.stop - 1} of {plan.key} as they "
            f"were before: the summary has changed since; delete {plan.directory} to rebuild it from the input as it "
            "is, or use a new --output-prefix"
        )
    return True


def _plan(options: PreprocessOptions, records: Dict[str, Tuple[SubsetLayout, List[Any]]]) -> List[_ShardPlan]:
    plans = []
    for name, (layout, items) in records.items():
        for index, start in enumerate(range(0, len(items), options.shard_size)):
            stop = min(start + options.shard_size, len(items))
            directory = Path(options.output_prefix) / name / f"shard-{index:05d}"
            plans.append(_ShardPlan(name, layout, index, start, stop, directory))
    return plans


def _process_chunk(task: Tuple[SubsetLayout, List[Any], Optional[int]]) -> List[Tuple[Optional[PuffinRecord], Optional[BadSample]]]:
    """Worker: builds the records of one chunk; bad samples are returned, not raised."""
    layout, items, max_image_size = task
    results: List[Tuple[Optional[PuffinRecord], Optional[BadSample]]] = []
    for item in items:
        try:
            results.append((build_record(layout, item, max_image_size), None))
        except BadSample as bad:
            results.append((None, bad))
    return results


def _map_chunks(tasks: List[Any], workers: int) -> Iterator[List[Tuple[Optional[PuffinRecord], Optional[BadSample]]]]:
    if workers <= 1:
        yield from map(_process_chunk, tasks)
        return
    with worker_pool(workers) as pool:
        yield from pool.imap(_process_chunk, tasks)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="samples", desc="preprocess", disable=not enabled, mininterval=1.0, smoothing=0.1)


class _Tally:
    """Per-subset sample and bad-sample counts plus a few example paths per reason."""

    def __init__(self):
        self.subsets: Dict[str, Dict[str, Any]] = {}
        self.examples: Dict[str, List[str]] = {}

    def subset(self, name: str) -> Dict[str, Any]:
        return self.subsets.setdefault(
            name, {"records": 0, "samples": 0, "shards": 0, "shards_skipped": 0, "bad_samples": {}}
        )

    def add_bad(self, name: str, counts: Dict[str, int]) -> None:
        bad = self.subset(name)["bad_samples"]
        for reason, count in counts.items():
            bad[reason] = bad.get(reason, 0) + count

    def note_example(self, name: str, bad: BadSample) -> None:
        example = f"{bad.path}: {bad.detail}" if bad.reason in RECORD_REASONS else bad.path
        examples = self.examples.setdefault(bad.reason, [])
        if len(examples) < 5:  # a bad summary record has no file of its own: its detail names the record
            examples.append(example)
        self.subset(name).setdefault("first_bad_sample", f"{example} ({bad.reason})")


def _write_shard(plan, source, flags, results, tally, options, bar) -> None:
    """Consumes one shard's chunk results in order and publishes the shard."""
    bad_counts: Dict[str, int] = {}
    try:
        writer = ShardWriter(plan.directory, plan.layout.name, source, flags)
        for chunk in results:
            for record, bad in chunk:
                if bad is not None:
                    if options.strict:
                        raise StrictModeError(bad)
                    logger.debug("skipping %s", bad)
                    bad_counts[bad.reason] = bad_counts.get(bad.reason, 0) + 1
                    tally.note_example(plan.key, bad)
                else:
                    writer.add(record)
            bar.update(len(chunk))
        writer.finalize(bad_counts)
    except BaseException:  # a full disk, strict mode, Ctrl-C: the half-written shard goes (a re-run redoes it)
        shutil.rmtree(ShardWriter.staging_dir(plan.directory), ignore_errors=True)
        raise
    stats = tally.subset(plan.key)
    stats["samples"] += writer.num_samples
    stats["shards"] += 1
    tally.add_bad(plan.key, bad_counts)


def _chunk_tasks(plan: _ShardPlan, items: List[Any], options: PreprocessOptions) -> List[Any]:
    return [
        (plan.layout, items[start : min(start + options.chunk_size, plan.stop)], options.max_image_size)
        for start in range(plan.start, plan.stop, options.chunk_size)
    ]


def _run_plans(todo, records, options, tally) -> int:
    """Processes the unfinished shards; returns the number of records processed."""
    tasks, owners = [], []
    for plan, _ in todo:
        chunks = _chunk_tasks(plan, records[plan.key][1], options)
        tasks.extend(chunks)
        owners.append(len(chunks))
    total = sum(plan.stop - plan.start for plan, _ in todo)
    results = _map_chunks(tasks, options.workers)
    try:
        with _progress_bar(total, options.progress) as bar:
            for (plan, source), num_chunks in zip(todo, owners):
                shard_results = (next(results) for _ in range(num_chunks))
                _write_shard(plan, source, _shard_flags(options), shard_results, tally, options, bar)
    finally:
        results.close()  # stops the worker pool, also when strict mode raised
    return total


def preprocess(options: PreprocessOptions) -> Dict[str, Any]:
    """Runs the whole conversion and writes ``<output_prefix>/dataset.json``.

    Returns:
        The report: per-subset records/samples/shards and per-reason bad-sample counts, totals, timing.

    Raises:
        ValueError: On bad options, an input without any subset, or an output written from something else.
        StrictModeError: With ``strict``, at the first bad sample.
    """
    _check_options(options)
    Path(options.output_prefix).mkdir(parents=True, exist_ok=True)
    # Two runs into one output (a job submitted twice) used to remove each other's staging folders mid-write.
    with locked(Path(options.output_prefix) / LOCK_NAME, f"--output-prefix {options.output_prefix} is being written "
                "by another preprocess_data.py run ({holder}); wait for it to end"):
        return _preprocess(options)


def _preprocess(options: PreprocessOptions) -> Dict[str, Any]:
    started = time.perf_counter()
    subsets = discover_subsets(Path(options.input))
    if not subsets:
        raise ValueError(f"--input {options.input} holds no Puffin-4M subset (no summary.json / summary/ found)")
    records = {}
    for layout in subsets:
        items = load_summary(layout)
        items, duplicates = mark_duplicates(items[: options.limit] if options.limit is not None else items)
        if duplicates:
            logger.warning("%s subset: %d summary records repeat an earlier record's annotation; they are skipped "
                           "(bad sample reason duplicate_record)", layout.name, duplicates)
        records[layout.name] = (layout, items)
    records = _split_heldout(records, options.heldout_records)
    tally, todo = _Tally(), []
    for plan in _plan(options, records):
        source = _shard_source(options, plan, records[plan.key][1])
        if plan.key != plan.layout.name:
            source["split"] = HELDOUT_FOLDER
        stats = tally.subset(plan.key)
        if _is_finished(plan, source, _shard_flags(options)):
            manifest = read_manifest(plan.directory)
            stats["samples"] += manifest["num_samples"]
            stats["shards_skipped"] += 1
            tally.add_bad(plan.key, manifest.get("bad_samples", {}))
        else:
            todo.append((plan, source))
    for name, (_, items) in records.items():
        tally.subset(name)["records"] = len(items)
    processed = _run_plans(todo, records, options, tally) if todo else 0
    return _write_report(options, tally, processed, time.perf_counter() - started)


def empty_subset_problems(report: Dict[str, Any]) -> List[str]:
    """One line per subset (or held-out split) whose summary records gave no sample at all: a systematic problem
    (paths written with '\\', a caption folder under another name), never a few bad files, so the tool fails."""
    problems = []
    for name, stats in report["subsets"].items():
        if not stats["records"] or stats["samples"]:
            continue
        reasons = ", ".join(f"{count} {reason}" for reason, count in
                            sorted(stats["bad_samples"].items(), key=lambda item: -item[1]))
        example = stats.get("first_bad_sample")
        hint = f"; e.g. {example}" if example else ""
        if example and "\\" in example:
            hint += "; the summary's paths hold '\\': separate folders with '/'"
        problems.append(f"{name}: none of its {stats['records']} summary records gave a sample ({reasons}{hint}); "
                        "fix the input and run the same command again (shards without a sample are made again)")
    return problems


def _write_report(options: PreprocessOptions, tally: _Tally, processed: int, elapsed: float) -> Dict[str, Any]:
    totals: Dict[str, int] = {}
    for stats in tally.subsets.values():
        stats["bad_samples"] = dict(sorted(stats["bad_samples"].items()))
        for reason, count in stats["bad_samples"].items():
            totals[reason] = totals.get(reason, 0) + count
    report = {
        "input": str(Path(options.input).resolve()),
        "output_prefix": str(Path(options.output_prefix).resolve()),
        "flags": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(options).items()},
        "subsets": tally.subsets,
        "samples": sum(stats["samples"] for stats in tally.subsets.values()),
        "bad_samples": dict(sorted(totals.items())),
        "bad_sample_examples": tally.examples,
        "records_processed": processed,
        "elapsed_s": round(elapsed, 3),
        "records_per_s": round(processed / elapsed, 1) if elapsed > 0 else None,
    }
    output = Path(options.output_prefix)
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output / REPORT_NAME, json.dumps(report, indent=2, sort_keys=True))
    return report
