"""Range checks of single values (sizes, optimizer, schedule, run control): each problem names the flag, the value,
the rule and a fix. These validators never divide and never assume another check passed."""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, TYPE_CHECKING

from megatron_puffin.distributed.random import seed_problems

if TYPE_CHECKING:  # for annotations only
    from megatron_puffin.config.arguments import PuffinArguments


def _at_least(flag: str, value: Optional[float], minimum: float) -> List[str]:
    if value is None or value >= minimum:
        return []
    return [f"{flag} ({value}) must be at least {minimum}"]


def _finite(flag: str, value: float) -> List[str]:
    return [] if math.isfinite(value) else [f"{flag} ({value}) must be a finite number"]


def check_llm_sizes(args: PuffinArguments) -> List[str]:
    """LLM shape values that megatron-core would accept and fail on later."""
    llm = args.llm
    problems = _at_least("--ffn-hidden-size", llm.ffn_hidden_size, 1)
    problems += _at_least("--kv-channels", llm.kv_channels, 1)
    problems += _at_least("--vocab-size", llm.vocab_size, 1)
    problems += _at_least("--make-vocab-size-divisible-by", llm.make_vocab_size_divisible_by, 1)
    problems += _at_least("--max-position-embeddings", llm.max_position_embeddings, 1)
    for flag, value in (("--rotary-base", llm.rotary_base), ("--norm-epsilon", llm.norm_epsilon),
                        ("--init-method-std", llm.init_method_std)):
        problems += _finite(flag, value) or ([] if value > 0 else [f"{flag} ({value}) must be positive"])
    return problems


def check_optimizer(args: PuffinArguments) -> List[str]:
    """AdamW and learning-rate values (NaN, infinity and out-of-range values never reach the optimizer)."""
    training, problems = args.training, []
    for flag, value in (("--lr", training.lr), ("--min-lr", training.min_lr),
                        ("--lr-warmup-init", training.lr_warmup_init), ("--weight-decay", training.weight_decay),
                        ("--adam-eps", training.adam_eps), ("--clip-grad", training.clip_grad)):
        problems += _finite(flag, value) or _at_least(flag, value, 0.0)
    if math.isfinite(training.adam_eps) and training.adam_eps == 0:
        problems.append("--adam-eps (0.0) must be positive (e.g. 1e-8)")
    for flag, value in (("--adam-beta1", training.adam_beta1), ("--adam-beta2", training.adam_beta2)):
        if not 0.0 <= value < 1.0:
            problems.append(f"{flag} ({value}) must lie in [0, 1) (e.g. 0.9 / 0.95)")
    return problems


def check_schedule(args: PuffinArguments) -> List[str]:
    """Warm-up and decay lengths (megatron-core asserts decay steps > warm-up steps, on every rank, mid-start)."""
    training, problems = args.training, []
    problems += _at_least("--lr-warmup-iters", training.lr_warmup_iters, 0)
    problems += _at_least("--lr-decay-iters", training.lr_decay_iters, 1)
    decay = training.lr_decay_iters if training.lr_decay_iters is not None else training.train_iters
    decay_flag = "--lr-decay-iters" if training.lr_decay_iters is not None else "--train-iters"
    if training.lr_warmup_iters >= 0 and decay >= 1 and training.lr_warmup_iters >= decay:
        problems.append(
            f"--lr-warmup-iters ({training.lr_warmup_iters}) must be smaller than {decay_flag} ({decay}), the "
            f"decay length; use at most {decay - 1} warm-up steps"
        )
    return problems


def check_run_control(args: PuffinArguments) -> List[str]:
    """Intervals, timeouts, the seed and the exit duration (a negative one would stop, and requeue, every job at
    once)."""
    ckpt, training, problems = args.checkpoint, args.training, []
    problems += _at_least("--save-interval", ckpt.save_interval, 1)
    problems += _at_least("--distributed-timeout-minutes", args.parallel.distributed_timeout_minutes, 1)
    problems += seed_problems("--seed", training.seed)  # a traceback at start-up otherwise
    if training.exit_duration_in_mins is not None and not (
            math.isfinite(training.exit_duration_in_mins) and training.exit_duration_in_mins > 0):
        problems.append(f"--exit-duration-in-mins ({training.exit_duration_in_mins}) must be a positive number of "
                        "minutes (a little below the job's time limit)")
    return problems


def check_world_size_flag(args: PuffinArguments) -> List[str]:
    """--world-size describes a launch for --dry-run; in a real launch torchrun's WORLD_SIZE is the truth."""
    given, launched = args.parallel.world_size, os.environ.get("WORLD_SIZE")
    problems = _at_least("--world-size", given, 1)
    if given is not None and launched is not None and not args.dry_run and str(given) != launched.strip():
        problems.append(f"--world-size ({given}) contradicts the launch (WORLD_SIZE={launched}); drop --world-size "
                        "(it is for --dry-run) or launch that many processes")
    return problems


def check_fp16_device(args: PuffinArguments) -> List[str]:
    """fp16 needs a GPU (megatron-core's loss scaler keeps its state on CUDA)."""
    import torch

    if args.precision.fp16 and not torch.cuda.is_available() and not args.dry_run:
        return ["--fp16 needs a CUDA GPU (megatron-core's loss scaler runs on the GPU); train in fp32 on CPU "
                "(drop --fp16) or use --bf16 on a GPU"]
    return []


def well_formed_stream_tasks(specs: Sequence[str]) -> List[str]:
    """The task of every well-formed ``--task-stream`` spec (a malformed one is check_data's problem)."""
    from megatron_puffin.data.config import parse_task_stream

    tasks = []
    for spec in specs:
        try:
            tasks.append(parse_task_stream(spec).task)
        except ValueError:
            continue
    return tasks


def llm_sequence_parts(args: PuffinArguments, task: str) -> Dict[str, int]:
    """The parts of the longest LLM sequence a sample of ``task`` (a stream task) can have, by what sets them: the
    input image's tokens, the text-token limit, and the queries of a generation prompt."""
    from megatron_puffin.tasks import GENERATION_TASKS, IMAGE_INPUT_TASKS, TASK_VARIANTS

    data = args.data
    kind = TASK_VARIANTS.get(task, task)
    parts = {"image tokens (--image-size)": args.vision.num_tokens(data.image_size, data.image_size)} \
        if kind in IMAGE_INPUT_TASKS else {}
    if kind in GENERATION_TASKS:
        return {**parts, "--max-generation-text-tokens": data.max_generation_text_tokens,
                "--connector-num-queries": args.connector.num_queries}
    return {**parts, "--max-understanding-text-tokens": data.max_understanding_text_tokens}


def check_sequence_limits(args: PuffinArguments) -> List[str]:
    """The longest LLM sequence a stream's samples can have (training and validation streams) must fit the LLM's
    positions (:func:`llm_sequence_parts`). Checked on the flags, before any data is read: a mistyped
    --connector-num-queries (1e9) was caught only by the memory check, after the path checks had spent 200 s and
    16 GB assembling one prompt of that length."""
    llm, data, vision = args.llm, args.data, args.vision
    if min(llm.max_position_embeddings, data.image_size, vision.image_size_multiple) < 1:
        return []  # the single-value checks name these
    problems = []
    for task in dict.fromkeys(well_formed_stream_tasks([*args.data.task_stream, *args.validation.valid_task_stream])):
        parts = {name: count for name, count in llm_sequence_parts(args, task).items() if count}
        length = sum(parts.values())
        if length > llm.max_position_embeddings:
            terms = " + ".join(f"{count} {name}" for name, count in parts.items())
            problems.append(f"{task} samples can hold {length} LLM tokens ({terms}), more than the LLM's "
                            f"--max-position-embeddings ({llm.max_position_embeddings}); lower those flags or raise "
                            "--max-position-embeddings")
    return problems


VALUE_VALIDATORS = [check_llm_sizes, check_optimizer, check_schedule, check_run_control, check_world_size_flag,
                    check_fp16_device, check_sequence_limits]
