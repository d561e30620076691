"""Data flags: the task streams, tokenizer, loader and task-encoder settings (one dataclass, one validator).

A task stream is given as ``--task-stream TASK:PATH[,PATH...]:MICRO_BATCH_SIZE[:REPEATS]`` (repeatable); e.g. stage 4
of the reference (docs/puffin.md §5.4)::

    --task-stream image2text_cross_view:/data/puffin/cross_view:16:8
    --task-stream image2image:/data/puffin/cross_view:16:8
    --task-stream image2text_photography:/data/puffin/photography:16:1
"""
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from megatron_puffin.tasks import TASK_VARIANTS

logger = logging.getLogger(__name__)

TASK_STREAM_FORMAT = "TASK:PATH[,PATH...]:MICRO_BATCH_SIZE[:REPEATS]"


@dataclass(frozen=True)
class TaskStreamSpec:
    """One parsed ``--task-stream``.

    Attributes:
        task: Stream task (a key of :data:`~.task_encoders.TASK_VARIANTS`).
        paths: Dataset paths read as one dataset.
        micro_batch_size: Samples per micro-batch per data-parallel rank.
        repeats: Consecutive micro-batches of this stream per schedule cycle.
    """

    task: str
    paths: Tuple[str, ...]
    micro_batch_size: int
    repeats: int = 1


def _positive_int(text: str, what: str, spec: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--task-stream {spec!r}: {what} ({text!r}) must be an integer; format {TASK_STREAM_FORMAT}") from None
    if value < 1:
        raise ValueError(f"--task-stream {spec!r}: {what} ({value}) must be >= 1")
    return value


def _is_int(text: str) -> bool:
    """A (possibly negative) integer: a negative count is a mistake to report, not part of a path."""
    return text.lstrip("+-").isdigit()


def effective_data_seed(data_seed: Optional[int], run_seed: Optional[int]) -> Optional[int]:
    """The seed of the sample order, prompt choice and CFG dropout: ``--data-seed``, else the run's ``--seed``."""
    return run_seed if data_seed is None else data_seed


def stream_tasks(specs: Sequence[TaskStreamSpec]) -> List[str]:
    """The tasks of ``specs``, in stream order without repeats, as logs, metrics and plots name them: the stream's
    task (e.g. ``image2text_photography``, ``image2text_thinking``), not the loss it trains under (``image2text``).
    Training and validation losses are keyed the same way."""
    tasks: List[str] = []
    for spec in specs:
        if spec.task not in tasks:
            tasks.append(spec.task)
    return tasks


def parse_task_stream(spec: str) -> TaskStreamSpec:
    """Parses ``TASK:PATH[,PATH...]:MICRO_BATCH_SIZE[:REPEATS]`` (paths may contain ':'; numbers are read from the end).

    Raises:
        ValueError: Naming the flag value, the rule and the accepted tasks.
    """
    task, separator, rest = spec.partition(":")
    if not separator or task not in TASK_VARIANTS:
        raise ValueError(
            f"--task-stream {spec!r}: unknown or missing task {task!r}; format {TASK_STREAM_FORMAT} with TASK one of "
            f"{', '.join(sorted(TASK_VARIANTS))}"
        )
    parts = rest.split(":")
    if len(parts) >= 3 and _is_int(parts[-1]) and _is_int(parts[-2]):
        path_text, batch_text, repeats_text = ":".join(parts[:-2]), parts[-2], parts[-1]
    elif len(parts) >= 2:
        path_text, batch_text, repeats_text = ":".join(parts[:-1]), parts[-1], "1"
    else:
        raise ValueError(f"--task-stream {spec!r}: missing MICRO_BATCH_SIZE; format {TASK_STREAM_FORMAT}")
    paths = tuple(path for path in path_text.split(",") if path)
    if not paths:
        raise ValueError(f"--task-stream {spec!r}: no dataset path; format {TASK_STREAM_FORMAT}")
    return TaskStreamSpec(task, paths, _positive_int(batch_text, "MICRO_BATCH_SIZE", spec),
                          _positive_int(repeats_text, "REPEATS", spec))


@dataclass
class DataConfig:
    """Data pipeline settings (flags ``--task-stream``, ``--tokenizer``, ...)."""

    task_stream: List[str] = field(default_factory=list)
    """Repeatable. A task stream TASK:PATH[,PATH...]:MICRO_BATCH_SIZE[:REPEATS]; micro-batches cycle through the
    streams in flag order, REPEATS consecutive micro-batches each (docs/puffin.md §3.9). TASK: image2text,
    image2text_thinking, image2text_photography, image2text_cross_view, text2text, text2image, cam2image,
    cam2image_thinking, image2image."""

    tokenizer: Optional[str] = None
    """HF tokenizer directory (Qwen2.5) or SentencePiece .model file."""

    data_seed: Optional[int] = None
    """Seed of the sample order, prompt choice, CFG dropout and mixed-motion trimming (default: the run seed)."""

    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the training process)."""

    prefetch_factor: int = 2
    """Micro-batches each worker prepares ahead (only with --num-workers > 0)."""

    pin_memory: bool = True
    """Pin batch tensors in page-locked memory (takes effect only when CUDA is available)."""

    image_size: int = 512
    """Longest image side after the 'dynamic' resize (docs/puffin.md §3.5)."""

    image_size_unit: int = 32
    """Image sides are rounded up to multiples of this; must be a multiple of vision patch size x fold."""

    max_understanding_text_tokens: int = 1024
    """Text tokens of an understanding sample (prompt + answer, image placeholders excluded); answers are cut on the
    right beyond it and counted."""

    max_generation_text_tokens: int = 256
    """Text tokens of a generation prompt (vision pads and queries excluded); captions are cut on the right."""

    cfg_text_dropout_prob: float = 0.1
    """Probability of replacing a text2image / cam2image caption by "" for classifier-free guidance (docs/puffin.md §2.2)."""

    mixed_motion_prob: float = 0.5
    """Probability of keeping only the camera text of an image2image caption (docs/puffin.md §3.10)."""

    max_bad_samples: int = 100
    """Samples per rank that may fail to decode at training time (garbled image, bad UTF-8, bad index pointer,
    non-finite camera): each is logged with its shard, index and reason, counted in the metrics, and replaced by
    the next sample of its dataset that decodes. One more stops the run with an error; 0 stops at the first."""

    max_worker_restarts: int = 3
    """Times a rank restarts its data-loader workers after one died (the out-of-memory killer, a crash in an image
    decoder): the new workers start at the next micro-batch not yet handed out, so training goes on with exactly
    the batches it would have had. One more death stops the run with an error."""

    camera_maps_in_loader: bool = True
    """Compute normalised camera maps in the loader; off: batches carry only the camera values [B, 3]."""

    cached_latents: bool = False
    """Read the VAE posterior moments of targets, initial views and camera maps from the shards (written by
    tools/cache_latents.py with the training VAE and resolution) instead of running the VAE encoder; the posterior
    is still sampled per step with the same per-sample noise. Every generation stream's shards must hold matching
    latents."""

    length_grouped: bool = False
    """Order each task stream by token length inside windows of its global order (less padding per micro-batch;
    still deterministic and exactly resumable at any data-parallel size). Off: the reference's random order."""

    length_group_window: int = 64
    """With --length-grouped: window of the stream's order sorted by length, in micro-batches of the stream
    (this x its micro-batch size samples; independent of the data-parallel size, so resuming at another DP size
    continues the same order)."""

    def streams(self) -> List[TaskStreamSpec]:
        """The parsed task streams (raises ValueError on a malformed one)."""
        return [parse_task_stream(spec) for spec in self.task_stream]


def data_config_errors(config: DataConfig, check_paths: bool = True, vision_patch_size: Optional[int] = None,
                       vision_fold: Optional[int] = None) -> List[str]:
    """Every problem with a :class:`DataConfig`, as flag-naming messages (empty when valid).

    Args:
        config: The data flags.
        check_paths: Also require dataset and tokenizer paths to exist.
        vision_patch_size: With ``vision_fold``, also check that --image-size-unit is a multiple of patch x fold.
        vision_fold: See ``vision_patch_size``.
    """
    errors: List[str] = []
    if vision_patch_size and vision_fold and config.image_size_unit % (vision_patch_size * vision_fold):
        errors.append(f"--image-size-unit ({config.image_size_unit}) must be a multiple of the vision patch size x "
                      f"fold ({vision_patch_size} x {vision_fold} = {vision_patch_size * vision_fold})")
    if not config.task_stream:
        errors.append(f"--task-stream is required at least once ({TASK_STREAM_FORMAT})")
    for spec in config.task_stream:
        try:
            stream = parse_task_stream(spec)
        except ValueError as error:
            errors.append(str(error))
            continue
        missing = [path for path in stream.paths if check_paths and not Path(path).exists()]
        if missing:
            errors.append(f"--task-stream {spec!r}: dataset paths {missing} do not exist")
    if config.tokenizer is None:
        errors.append("--tokenizer is required (an HF tokenizer directory or a SentencePiece .model)")
    elif check_paths and not Path(config.tokenizer).exists():
        errors.append(f"--tokenizer ({config.tokenizer}) does not exist")
    for name in ("num_workers", "max_bad_samples", "max_worker_restarts"):
        if getattr(config, name) < 0:
            errors.append(f"--{name.replace('_', '-')} ({getattr(config, name)}) must be >= 0")
    for name in ("prefetch_factor", "length_group_window", "image_size", "image_size_unit",
                 "max_understanding_text_tokens",
                 "max_generation_text_tokens"):
        if getattr(config, name) < 1:
            errors.append(f"--{name.replace('_', '-')} ({getattr(config, name)}) must be >= 1")
    if config.image_size_unit >= 1 and config.image_size % config.image_size_unit:
        errors.append(f"--image-size ({config.image_size}) must be a multiple of --image-size-unit "
                      f"({config.image_size_unit})")
    for name in ("cfg_text_dropout_prob", "mixed_motion_prob"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            errors.append(f"--{name.replace('_', '-')} ({getattr(config, name)}) must lie in [0, 1]")
    return errors


def validate_data_config(config: DataConfig, check_paths: bool = True, vision_patch_size: Optional[int] = None,
                         vision_fold: Optional[int] = None) -> None:
    """Raises one ValueError listing every problem of :func:`data_config_errors`."""
    errors = data_config_errors(config, check_paths, vision_patch_size, vision_fold)
    if errors:
        raise ValueError("invalid data flags:\n  " + "\n  ".join(errors))
