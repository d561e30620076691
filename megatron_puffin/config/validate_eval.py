"""Checks of the validation-while-training flags (``--valid-task-stream``, ``--eval-interval``, ...; their dataclass
is :class:`~megatron_puffin.config.schema.ValidationConfig`, the run itself :mod:`megatron_puffin.training.validation`).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, TYPE_CHECKING

from megatron_puffin.data.config import TASK_STREAM_FORMAT, parse_task_stream
from megatron_puffin.tasks import GENERATION_TASKS, TASK_VARIANTS

if TYPE_CHECKING:  # for annotations only
    from megatron_puffin.config.arguments import PuffinArguments
    from megatron_puffin.config.schema import ValidationConfig


def validation_errors(args: PuffinArguments) -> List[str]:
    """Every problem with the validation flags, as flag-naming messages (empty when valid)."""
    config: ValidationConfig = args.validation
    problems: List[str] = []
    if config.eval_interval is not None and config.eval_interval < 1:
        problems.append(f"--eval-interval ({config.eval_interval}) must be at least 1")
    if config.eval_iters < 1:
        problems.append(f"--eval-iters ({config.eval_iters}) must be at least 1")
    if config.eval_camera_samples < 0:
        problems.append(f"--eval-camera-samples ({config.eval_camera_samples}) must be >= 0 (0 disables)")
    if config.eval_max_new_tokens < 1:
        problems.append(f"--eval-max-new-tokens ({config.eval_max_new_tokens}) must be at least 1")
    if config.valid_task_stream and config.eval_interval is None:
        problems.append("--valid-task-stream has no effect without --eval-interval N; add it (e.g. --eval-interval "
                        "100) or drop the validation streams")
    if config.eval_interval is not None and not config.valid_task_stream:
        problems.append(f"--eval-interval ({config.eval_interval}) needs at least one --valid-task-stream "
                        f"({TASK_STREAM_FORMAT}) on held-out data")
    generation = []
    for spec in config.valid_task_stream:
        try:
            stream = parse_task_stream(spec)
        except ValueError as error:
            problems.append(str(error).replace("--task-stream", "--valid-task-stream", 1))
            continue
        missing = [path for path in stream.paths if not args.dry_run and not Path(path).exists()]
        if missing:
            problems.append(f"--valid-task-stream {spec!r}: dataset paths {missing} do not exist")
        if TASK_VARIANTS[stream.task] in GENERATION_TASKS:
            generation.append(stream.task)
    if generation and not (args.model.vae_path or args.model.vae_config):
        problems.append(f"--valid-task-stream {', '.join(generation)} (generation) needs the VAE: add --vae-path DIR "
                        "or --vae-config FILE")
    return problems
