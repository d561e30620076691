"""What a run does with the checkpoints it is pointed at, decided before any work (part of the one validation pass).

* ``--load``: a path that does not exist is an error (a typo must not start a fresh run), except ``--load DIR
  --save DIR`` before DIR's first checkpoint (a job that always passes both). A run directory resumes from its
  newest usable checkpoint (damaged newer ones are skipped with a warning; see
  :func:`~megatron_puffin.checkpointing.resolve_checkpoint`).
* ``--save``: a run never writes over checkpoints it did not resume from. A ``--save`` directory holding another
  run's checkpoints, or checkpoints newer than the one resumed (``--load DIR/iter_6 --save DIR`` with ``iter_9``
  there), is refused unless ``--overwrite-checkpoints`` says to replace them: then each checkpoint this run saves
  replaces the old one of the same iteration only once the new one is complete, and the old run's later
  checkpoints are deleted when this run publishes its first one.
* Resume semantics: a learning-rate schedule that differs from the checkpoint's is refused, listing the
  differences, unless ``--override-opt-param-scheduler`` (then this run's flags apply from the checkpoint's step
  on); a different global batch (e.g. another data-parallel size) keeps the checkpoint's through
  ``--global-batch-size`` when that is a whole number of task-stream cycles, else is refused; toggling
  ``--use-distributed-optimizer`` or a ``--freeze-*`` flag is refused, naming the cause (also a
  ``--use-distributed-optimizer`` checkpoint resumed with ``--use-torch-fsdp2``, which cannot read its optimizer
  state, and an FSDP2 checkpoint saved at DP > 1 before FSDP2 checkpoints resharded); other task streams (by
  task and count; paths may change) or another data seed are refused, since the saved sample order cannot continue
  (a dataset whose sample count changed is found when the loader opens it, with the same one-line error).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, TYPE_CHECKING

from megatron_puffin import checkpointing as ckpt
from megatron_puffin.checkpoint_safety import CheckpointError
from megatron_puffin.config.arguments import micro_batches_per_step
from megatron_puffin.training.towers import TOWERS

if TYPE_CHECKING:  # for annotations only
    from megatron_puffin.config import PuffinArguments

FREEZE_FLAGS = tuple(spec.freeze_flag for spec in TOWERS if spec.freeze_flag)


def samples_per_step(args: PuffinArguments) -> int:
    """Samples of one optimizer step over all data-parallel ranks (the global batch)."""
    specs = args.data.streams()
    cycle = [spec for spec in specs for _ in range(spec.repeats)]
    return sum(cycle[i % len(cycle)].micro_batch_size for i in range(micro_batches_per_step(args))) \
        * args.data_parallel_size


FSDP2_RECORDS_KEY = "fsdp2_records"
"""Key of a checkpoint's ``puffin_meta.json`` saying its FSDP2 parameters were recorded by
:mod:`megatron_puffin.training.fsdp2_checkpoint` (value :data:`FSDP2_RECORDS_VERSION`), so they reshard. FSDP2
checkpoints without it were recorded megatron-core's way."""
FSDP2_RECORDS_VERSION = 2


def fsdp2_records_metadata(parallel) -> Dict[str, int]:
    """What a checkpoint's metadata gains with ``--use-torch-fsdp2`` (nothing otherwise)."""
    return {FSDP2_RECORDS_KEY: FSDP2_RECORDS_VERSION} if parallel.use_torch_fsdp2 else {}


def unreadable_fsdp2_records(meta: Dict[str, Any], directory: str, flag: str) -> List[str]:
    """A problem (one line, naming the fix) for an FSDP2 checkpoint saved at DP > 1 before its records were right:
    its uneven parameters have wrong global shapes and the LLM's fc1 rows are stored permuted, so no layout reads
    it correctly (a DP-1 FSDP2 checkpoint was recorded right: every slice is the whole parameter)."""
    parallel = (meta.get("args") or {}).get("parallel") or {}
    data_parallel = (meta.get("layout") or {}).get("dp", 1)
    if not parallel.get("use_torch_fsdp2") or meta.get(FSDP2_RECORDS_KEY) or data_parallel <= 1:
        return []
    return [f"{flag} {directory} was saved with --use-torch-fsdp2 at data-parallel size {data_parallel} by a version "
            "that recorded FSDP2 parameters megatron-core 0.16.1's way (uneven parameters with wrong shapes, the "
            "LLM's MLP rows permuted), which no layout reads correctly: train it again, or resume it only with the "
            f"version that saved it, with --use-torch-fsdp2 at data-parallel size {data_parallel}"]


def _same_path(a: str, b: Optional[str]) -> bool:
    return b is not None and os.path.realpath(a) == os.path.realpath(b)


def resolve_load(args: PuffinArguments) -> Optional[str]:
    """The checkpoint ``--load`` resumes from (None: nothing to resume). Raises :class:`CheckpointError`."""
    load, save = args.checkpoint.load, args.checkpoint.save
    if not load:
        return None
    if not os.path.exists(load):
        if _same_path(load, save):
            return None  # the first start of a job that always passes --load DIR --save DIR
        raise CheckpointError(f"--load {load}: no such directory; check the path (drop --load to start a new run)")
    if not os.path.isdir(load):
        raise CheckpointError(f"--load {load} is a file; give a run directory or one of its iter_* checkpoints")
    directory = ckpt.resolve_checkpoint(load)
    if directory is None:
        if _same_path(load, save):
            return None
        raise CheckpointError(f"--load {load} holds no checkpoint (no iter_* directory); check the path (drop "
                              "--load to start a new run)")
    problems = ckpt.checkpoint_problems(directory)
    if problems:
        raise CheckpointError(f"--load {directory}: {problems[0]}; the checkpoint is damaged, load an earlier one")
    return directory


def _iteration(directory: str) -> int:
    meta = ckpt.read_metadata(directory) or {}
    return int(meta.get("iteration", 0))


def save_problems(args: PuffinArguments, resumed: Optional[str]) -> List[str]:
    """Checkpoints in ``--save`` that this run would write over without having been asked."""
    save = args.checkpoint.save
    if not save or args.checkpoint.overwrite_checkpoints:
        return []
    if os.path.exists(save) and not os.path.isdir(save):
        return []  # reported by the flag validation of --save
    damaged = set(ckpt.damaged_checkpoints(save))
    existing = [(i, p) for i, p in ckpt.published_checkpoints(save) if p not in damaged]
    if resumed is not None and _same_path(os.path.dirname(os.path.normpath(resumed)), save):
        start = _iteration(resumed)
        later = [os.path.basename(p) for i, p in existing if i > start]
        if later:
            return [f"--save {save} holds checkpoints newer than --load {resumed} (iteration {start}): "
                    f"{', '.join(later)}; this run would write over them. Resume from the newest with --load {save}, "
                    "save elsewhere, or pass --overwrite-checkpoints to replace them"]
        return []
    if existing:
        names = ", ".join(os.path.basename(p) for _, p in existing[-3:])
        return [f"--save {save} already holds checkpoints of another run ({names}); resume it with --load {save}, "
                "choose a new --save directory, or pass --overwrite-checkpoints to replace them"]
    return []


def _schedule(training: Dict[str, Any]) -> Dict[str, Any]:
    """The values megatron-core's OptimizerParamScheduler keeps in its state (as the loop builds it)."""
    return {
        "--lr": training["lr"],
        "--min-lr": training["min_lr"],
        "--lr-warmup-iters": training["lr_warmup_iters"],
        "--lr-decay-style": training["lr_decay_style"],
        "decay iterations (--lr-decay-iters, else --train-iters)": training["lr_decay_iters"]
        or training["train_iters"],
        "--weight-decay": training["weight_decay"],
    }


def schedule_problems(args: PuffinArguments, stored: Dict[str, Any], directory: str) -> List[str]:
    """A learning-rate schedule that differs from the checkpoint's, unless ``--override-opt-param-scheduler``."""
    if args.checkpoint.override_opt_param_scheduler or "training" not in stored:
        return []
    now = _schedule(vars(args.training))
    try:
        then = _schedule(stored["training"])
    except KeyError:  # flags of another version: nothing to compare
        return []
    changed = [f"{name} {then[name]} (checkpoint) vs {now[name]} (now)" for name in now if now[name] != then[name]]
    if not changed:
        return []
    return [f"--load {directory} was trained with another learning-rate schedule: {'; '.join(changed)}. The "
            "checkpoint's schedule would win; pass --override-opt-param-scheduler to apply this run's flags from "
            "the checkpoint's step on, or give the checkpoint's values"]


def layout_problems(args: PuffinArguments, stored: Dict[str, Any], directory: str) -> List[str]:
    """Optimizer-state form and trained towers must match the checkpoint's."""
    problems = []
    old = stored.get("parallel", {}).get("use_distributed_optimizer")
    if old and args.parallel.use_torch_fsdp2:
        problems.append(
            f"--load {directory} was trained with --use-distributed-optimizer, whose optimizer state --use-torch-fsdp2 "
            "cannot read; resume it without --use-torch-fsdp2 (with --use-distributed-optimizer), or start FSDP2 from "
            f"its weights with a fresh optimizer: --pretrained-checkpoint {directory}")
    elif old is not None and old != args.parallel.use_distributed_optimizer:
        said = "with" if old else "without"
        problems.append(
            f"--load {directory} was trained {said} --use-distributed-optimizer, which stores the optimizer state in "
            f"another form; {'add' if old else 'drop'} --use-distributed-optimizer to resume it, or start from its "
            f"weights with a fresh optimizer: --pretrained-checkpoint {directory}")
    for flag in FREEZE_FLAGS:
        old = stored.get("model", {}).get(flag)
        if old is not None and old != getattr(args.model, flag):
            name = "--" + flag.replace("_", "-")
            cause = "holds no optimizer state for that tower" if old else \
                "holds that tower's optimizer state, which this run would drop"
            problems.append(
                f"--load {directory} was trained {'with' if old else 'without'} {name}: the checkpoint {cause}; to "
                f"change what trains, start a new stage from its weights: --pretrained-checkpoint {directory}")
    return problems


def batch_problems(args: PuffinArguments, meta: Dict[str, Any], directory: str) -> List[str]:
    """Keep the checkpoint's global batch when this run's flags do not set one, or refuse."""
    stored = meta.get("samples_per_step")
    training = args.training
    if stored is None or training.global_batch_size is not None or training.micro_batches_per_step is not None:
        return []
    try:
        now = samples_per_step(args)
        specs = args.data.streams()
    except (ValueError, ZeroDivisionError):
        return []  # reported by the data and step validators
    if now == stored:
        return []
    cycle_samples = sum(spec.repeats * spec.micro_batch_size for spec in specs) * args.data_parallel_size
    if stored % cycle_samples == 0:
        training.global_batch_size = stored  # the checkpoint's global batch, at this run's data-parallel size
        return []
    return [f"--load {directory} was trained with {stored} samples per optimizer step; this run's flags give {now} "
            f"(data-parallel size {args.data_parallel_size}, one task-stream cycle is {cycle_samples} samples, which "
            f"does not divide {stored}): to keep the checkpoint's batch, "
            f"{_smaller_cycle_hint(specs, stored, args.data_parallel_size)}; to change it deliberately, set "
            f"--global-batch-size {now}"]


def _smaller_cycle_hint(specs, stored: int, dp_size: int) -> str:
    """How to make one task-stream cycle divide the checkpoint's batch: the streams' micro-batch sizes scaled by
    one factor where that gives whole sizes (named per stream), else the general rule."""
    from fractions import Fraction

    per_rank = sum(spec.repeats * spec.micro_batch_size for spec in specs)
    if stored % dp_size == 0:
        scale = Fraction(stored // dp_size, per_rank)
        sizes = [spec.micro_batch_size * scale for spec in specs]
        if scale < 1 and all(size.denominator == 1 and size >= 1 for size in sizes):
            named = ", ".join(f"{spec.task}:{','.join(spec.paths)}:{int(size)}" for spec, size in zip(specs, sizes))
            return f"give the task streams MICRO_BATCH_SIZE x {scale} where they are set ({named})"
    return "give the task streams smaller MICRO_BATCH_SIZEs where they are set (or use fewer data-parallel ranks) " \
           f"until one cycle divides {stored}"


def data_problems(args: PuffinArguments, stored: Dict[str, Any], directory: str) -> List[str]:
    """The saved sample order continues only with the checkpoint's task streams (by task and position, not path:
    moved data resumes) and data seed."""
    from megatron_puffin.data.config import effective_data_seed, parse_task_stream
    from megatron_puffin.data.loader import stream_names

    data, training = stored.get("data") or {}, stored.get("training") or {}
    try:
        then_specs = [parse_task_stream(spec) for spec in data["task_stream"]]
        now_specs = args.data.streams()
    except (KeyError, TypeError, ValueError):
        return []  # flags of another version, or a malformed --task-stream (reported by the data validator)
    problems = []
    fresh = f"or start from its weights with a new data order and optimizer: --pretrained-checkpoint {directory}"
    then, now = stream_names(then_specs), stream_names(now_specs)
    if sorted(then) != sorted(now):
        problems.append(
            f"--load {directory} was trained on the task streams {', '.join(then)} ({' '.join(data['task_stream'])}); "
            f"this run's --task-stream flags give {', '.join(now)}, whose saved order cannot continue. Resume with "
            f"streams of the same tasks in the same number (the paths may change), {fresh}")
    seed_then = effective_data_seed(data.get("data_seed"), training.get("seed"))
    seed_now = effective_data_seed(args.data.data_seed, args.training.seed)
    if seed_then is not None and seed_then != seed_now:
        problems.append(
            f"--load {directory} drew its sample order with data seed {seed_then} (--data-seed, else --seed); this run "
            f"gives {seed_now}. Resume with --data-seed {seed_then}, {fresh}")
    return problems


def source_problems(args: PuffinArguments) -> List[str]:
    """--pretrained-checkpoint and the per-tower base checkpoints exist and are undamaged (cheap checks)."""
    ckpt_args, problems = args.checkpoint, []
    for flag, path in ckpt_args.weight_sources():
        if not path:
            continue
        if not os.path.isdir(path):  # a missing path or a file: config.validate_paths names it (once)
            continue
        try:
            directory = ckpt.resolve_checkpoint(path)
        except CheckpointError as error:
            problems.append(f"{flag} {error}")
            continue
        if directory is None:
            problems.append(f"{flag} {path} holds no checkpoint")
            continue
        damage = ckpt.checkpoint_problems(directory)
        if damage:
            problems.append(f"{flag} {directory}: {damage[0]}; the checkpoint is damaged")
        elif flag == "--pretrained-checkpoint":
            problems += unreadable_fsdp2_records(ckpt.read_metadata(directory) or {}, directory, flag)
    return problems


def startup_problems(args: PuffinArguments) -> List[str]:
    """Every checkpoint decision of this run (see the module docstring), as problems naming flag and fix.
    Skipped with ``--dry-run`` (paths may belong to another machine)."""
    if args.dry_run:
        return []
    problems = source_problems(args)
    try:
        resumed = resolve_load(args)
    except CheckpointError as error:
        return problems + [str(error)]
    problems += save_problems(args, resumed)
    if resumed is None:
        return problems
    try:
        meta = ckpt.read_metadata(resumed) or {}
    except CheckpointError as error:
        return problems + [str(error)]
    if meta.get("kind") not in (None, "puffin"):  # a converted tower: check_checkpoint_contents names it
        return problems
    if "imported" in meta:  # puffin-to-mcore output: weights only, nothing of a run to resume
        return problems + [f"--load {resumed} was imported from {meta['imported'].get('source')} (puffin-to-mcore): "
                           "it holds weights only, no optimizer, schedule or data position to resume; start from "
                           f"it with --pretrained-checkpoint {resumed}"]
    stored = meta.get("args") or {}
    return (problems + schedule_problems(args, stored, resumed) + layout_problems(args, stored, resumed)
            + unreadable_fsdp2_records(meta, resumed, "--load") + batch_problems(args, meta, resumed)
            + data_problems(args, stored, resumed))
