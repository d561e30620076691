"""A synthetic Puffin-4M: procedural scenes with known cameras, written in the real folder layout (docs/puffin.md §3.1).

Output (everything the real dataset has, so it goes through the same ``tools/preprocess_data.py`` path)::

    <out>/summary.json  local_folder/  cap_folder/  cap_folder_cot/  [cam_folder/]  cameras.csv
    <out>/cross_view/{summary.json, local_folder, local_folder_init, cap_folder, cap_folder_scene, cap_folder_cam,
                      [cam_folder], cameras.csv}
    <out>/photography/{summary.json, local_folder, cap_folder, cameras.csv}
    <tokenizer_out>                       SentencePiece model trained on all captions and prompts

With ``num_heldout`` > 0 a held-out split is written beside it, in the same layout under ``<out>/heldout/``
(``num_heldout`` main samples, a quarter as many cross-view pairs and an eighth as many photography samples), drawn
from other random streams, so no held-out scene, camera or image appears in the training split; it is for
validation (``--valid-task-stream``) and camera evaluation (its ``cameras.csv`` is the ground truth). The training
split and the tokenizer (trained on training captions only) do not depend on it.

Main samples: roll, pitch ~ U[-pi/4, pi/4], vfov ~ U[0.3491, 1.8326] (the ranges of §3.3); base caption
``{description} {camera sentence}``, thinking caption with photographic-terms reasoning. Cross-view pairs (§3.10):
initial view and target view of the same scene; target roll, pitch ~ U[-pi/8, pi/8], vfov 1.48, yaw ~ U[0, 2*pi).
Photography samples: an image plus an answer giving its camera and the yaw/pitch deviation that would centre the
main object on the horizon. Every sample draws from its own generator seeded by (seed, subset, index), so the
output does not depend on the number of workers.
"""
import csv
import io
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from megatron_puffin.camera import Camera, camera_text, format_caption, format_thinking_caption, thinking_reasoning
from megatron_puffin.data import templates
from megatron_puffin.data.synthetic_scene import describe_view, render, sample_scene, visible_objects
from megatron_puffin.data.tokenizer import train_sentencepiece_tokenizer
from megatron_puffin.distributed.random import derive_seed
from megatron_puffin.files import folder_problem
from megatron_puffin.process_lifetime import worker_pool

logger = logging.getLogger(__name__)

ROLL_PITCH_RANGE = (-0.7854, 0.7854)
VFOV_RANGE = (0.3491, 1.8326)
CROSS_VIEW_ROLL_PITCH_RANGE = (-0.3927, 0.3927)
CROSS_VIEW_VFOV = 1.48
SAMPLES_PER_FOLDER = 1000
CROSS_VIEW_DIVISOR = 4
"""Cross-view pairs rendered by default: ``num_samples // CROSS_VIEW_DIVISOR``."""
JPEG_QUALITY = 95
CSV_COLUMNS = ("fname", "roll", "pitch", "vfov", "yaw", "width", "height")


@dataclass(frozen=True)
class SyntheticOptions:
    """What :func:`make_synthetic_dataset` writes.

    Attributes:
        output: Output root (the ``training_data`` folder).
        num_samples: Main (single-view) samples.
        image_size: Square image side in pixels.
        seed: Seed of everything.
        num_cross_view: Cross-view pairs (default num_samples // CROSS_VIEW_DIVISOR).
        num_photography: Photography samples (default num_samples // 8).
        workers: Processes used for rendering.
        tokenizer_out: Where to write the SentencePiece model (None: no tokenizer).
        tokenizer_vocab_size: Target vocabulary size of that model.
        camera_map_size: Also write reference-style ``cam_folder/*.pt`` maps of this size (None: none).
        supersample: Rays per pixel side.
        num_heldout: Main samples of the held-out split written to ``<output>/heldout`` (0: none).
        split: Which split this is ("train" or "heldout"); selects the random streams.
    """

    output: Path
    num_samples: int
    image_size: int = 128
    seed: int = 0
    num_cross_view: Optional[int] = None
    num_photography: Optional[int] = None
    workers: int = 1
    tokenizer_out: Optional[Path] = None
    tokenizer_vocab_size: int = 1024
    camera_map_size: Optional[int] = None
    supersample: int = 2
    num_heldout: int = 0
    split: str = "train"


HELDOUT_FOLDER = "heldout"
"""Sub-folder of the output holding the held-out split."""


def _rng(options: SyntheticOptions, subset: str, index: int) -> np.random.Generator:
    """The sample's own generator; the training split keeps the streams it always had."""
    stream = subset if options.split == "train" else f"{options.split}/{subset}"
    return np.random.default_rng(derive_seed(options.seed, stream, index))


def _relative(index: int, suffix: str) -> str:
    return f"{index // SAMPLES_PER_FOLDER:06d}/{index:08d}{suffix}"


def _write_jpeg(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    path.write_bytes(buffer.getvalue())


def _write_caption(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"caption": text}))


def _write_camera_map(path: Path, camera: Camera, size: Optional[int]) -> None:
    if size is None:
        return
    import torch

    from megatron_puffin.camera import camera_map

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(camera_map(camera.roll, camera.pitch, camera.vfov, size, size), path)


def _uniform(rng: np.random.Generator, bounds: Tuple[float, float]) -> float:
    return round(float(rng.uniform(*bounds)), 4)  # captions carry 4 decimals: keep values exactly representable


def _main_sample(options: SyntheticOptions, index: int) -> Tuple[List[str], tuple]:
    rng = _rng(options, "main", index)
    heading = float(rng.uniform(0, 2 * math.pi))
    scene = sample_scene(rng, heading)
    camera = Camera(_uniform(rng, ROLL_PITCH_RANGE), _uniform(rng, ROLL_PITCH_RANGE), _uniform(rng, VFOV_RANGE))
    size = options.image_size
    description = describe_view(scene, visible_objects(scene, camera, heading, size, size))
    caption = format_caption(description, camera)
    thinking = format_thinking_caption(thinking_reasoning(camera, description), camera)
    root = options.output
    _write_jpeg(root / "local_folder" / _relative(index, ".jpg"), render(scene, camera, heading, size, size, options.supersample))
    _write_caption(root / "cap_folder" / _relative(index, ".json"), caption)
    _write_caption(root / "cap_folder_cot" / _relative(index, ".json"), thinking)
    _write_camera_map(root / "cam_folder" / _relative(index, ".pt"), camera, options.camera_map_size)
    row = (_relative(index, ".jpg"), camera.roll, camera.pitch, camera.vfov, "", size, size)
    return [caption, thinking], row


def _cross_view_sample(options: SyntheticOptions, index: int) -> Tuple[List[str], tuple]:
    rng = _rng(options, "cross_view", index)
    heading = float(rng.uniform(0, 2 * math.pi))
    scene = sample_scene(rng, heading, num_objects=int(rng.integers(3, 7)))
    init = Camera(_uniform(rng, CROSS_VIEW_ROLL_PITCH_RANGE), _uniform(rng, CROSS_VIEW_ROLL_PITCH_RANGE), CROSS_VIEW_VFOV)
    yaw = _uniform(rng, (0.0, 2 * math.pi))
    target = Camera(
        _uniform(rng, CROSS_VIEW_ROLL_PITCH_RANGE), _uniform(rng, CROSS_VIEW_ROLL_PITCH_RANGE), CROSS_VIEW_VFOV,
        yaw=yaw if yaw < 2 * math.pi else 0.0,
    )
    size, root = options.image_size, options.output / "cross_view"
    target_heading = heading + target.yaw  # positive yaw turns left (counter-clockwise)
    description = describe_view(scene, visible_objects(scene, target, target_heading, size, size))
    caption, camera_sentence = format_caption(description, target), camera_text(target)
    _write_jpeg(root / "local_folder_init" / _relative(index, ".jpg"), render(scene, init, heading, size, size, options.supersample))
    _write_jpeg(root / "local_folder" / _relative(index, ".jpg"), render(scene, target, target_heading, size, size, options.supersample))
    _write_caption(root / "cap_folder" / _relative(index, ".json"), caption)
    _write_caption(root / "cap_folder_scene" / _relative(index, ".json"), description)
    _write_caption(root / "cap_folder_cam" / _relative(index, ".json"), camera_sentence)
    _write_camera_map(root / "cam_folder" / _relative(index, ".pt"), target, options.camera_map_size)
    row = (_relative(index, ".jpg"), target.roll, target.pitch, target.vfov, target.yaw, size, size)
    return [caption, description, camera_sentence], row


def photography_answer(camera: Camera, yaw_deviation: float, pitch_deviation: float) -> str:
    """The synthetic photography answer: the image's camera sentence, then the suggested deviations (radians)."""
    return (
        f"{camera_text(camera)} The suggested deviation of the camera yaw angle is "
        f"{yaw_deviation % (2 * math.pi):.4f} and the deviation of the camera pitch angle is {pitch_deviation:.4f}."
    )


def _photography_sample(options: SyntheticOptions, index: int) -> Tuple[List[str], tuple]:
    rng = _rng(options, "photography", index)
    heading = float(rng.uniform(0, 2 * math.pi))
    scene = sample_scene(rng, heading)
    camera = Camera(_uniform(rng, ROLL_PITCH_RANGE), _uniform(rng, ROLL_PITCH_RANGE), _uniform(rng, VFOV_RANGE))
    subject = scene.objects[0]
    dx, dy, dz = subject.center[0], subject.center[1], subject.center[2] - scene.camera_height
    yaw_deviation = math.atan2(dy, dx) - heading
    pitch_deviation = math.atan2(dz, math.hypot(dx, dy)) - camera.pitch
    answer = photography_answer(camera, yaw_deviation, pitch_deviation)
    size, root = options.image_size, options.output / "photography"
    _write_jpeg(root / "local_folder" / _relative(index, ".jpg"), render(scene, camera, heading, size, size, options.supersample))
    _write_caption(root / "cap_folder" / _relative(index, ".json"), answer)
    row = (_relative(index, ".jpg"), camera.roll, camera.pitch, camera.vfov, "", size, size)
    return [answer], row


_MAKERS = {"main": _main_sample, "cross_view": _cross_view_sample, "photography": _photography_sample}


def _run_chunk(task: Tuple[SyntheticOptions, str, int, int]) -> List[Tuple[List[str], tuple]]:
    options, subset, start, stop = task
    return [_MAKERS[subset](options, index) for index in range(start, stop)]


def _subset_sizes(options: SyntheticOptions) -> Dict[str, int]:
    cross = options.num_samples // CROSS_VIEW_DIVISOR if options.num_cross_view is None else options.num_cross_view
    photo = options.num_samples // 8 if options.num_photography is None else options.num_photography
    return {"main": options.num_samples, "cross_view": cross, "photography": photo}


def _subset_root(options: SyntheticOptions, subset: str) -> Path:
    return options.output if subset == "main" else options.output / subset


def _write_index(root: Path, subset: str, rows: List[tuple]) -> None:
    records = []
    for row in rows:
        record = {"image": row[0], "annotation": row[0][: -len(".jpg")] + ".json"}
        if subset == "cross_view":
            record["image_init"] = row[0]
        records.append(record)
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps(records))
    with open(root / "cameras.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)


MIN_IMAGE_SIZE = 96
"""Smallest --image-size: preprocessing rejects images with a side of 80 pixels or less."""
MAX_IMAGE_SIZE = 4096
"""Largest --image-size (and --camera-map-size): rendering holds a few float64 arrays of (size * supersample)^2."""
MIN_TOKENIZER_VOCAB = 400
"""Smallest --tokenizer-vocab-size that holds the byte-fallback pieces, special tokens and the corpus' characters."""


def _option_problems(options: SyntheticOptions) -> List[str]:
    """Each bad option, naming its flag and the allowed values."""
    problems = []
    for flag, value, low in (("--num-samples", options.num_samples, 1), ("--workers", options.workers, 1),
                             ("--supersample", options.supersample, 1), ("--num-heldout", options.num_heldout, 0),
                             ("--num-cross-view", options.num_cross_view, 0),
                             ("--num-photography", options.num_photography, 0),
                             ("--camera-map-size", options.camera_map_size, 1)):
        if value is not None and value < low:
            problems.append(f"{flag} ({value}) must be >= {low}")
    if not MIN_IMAGE_SIZE <= options.image_size <= MAX_IMAGE_SIZE:
        problems.append(f"--image-size ({options.image_size}) must lie in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] "
                        "(smaller images are rejected by preprocessing, docs/puffin.md §3.5)")
    if options.camera_map_size is not None and options.camera_map_size > MAX_IMAGE_SIZE:
        problems.append(f"--camera-map-size ({options.camera_map_size}) must be <= {MAX_IMAGE_SIZE}")
    if options.supersample > 8:
        problems.append(f"--supersample ({options.supersample}) must be <= 8 (rays per pixel side)")
    if options.tokenizer_out is not None and options.tokenizer_vocab_size < MIN_TOKENIZER_VOCAB:
        problems.append(f"--tokenizer-vocab-size ({options.tokenizer_vocab_size}) must be >= {MIN_TOKENIZER_VOCAB} "
                        "(256 byte pieces, the special tokens and every character of the captions)")
    outputs = [("--output", Path(options.output))]
    if options.tokenizer_out is not None:
        outputs.append(("--tokenizer-out", Path(options.tokenizer_out).parent))
    for flag, folder in outputs:
        problem = folder_problem(folder)
        if problem:
            problems.append(f"{flag} ({folder.absolute()}): {problem}")
    return problems


def make_synthetic_dataset(options: SyntheticOptions) -> Dict[str, int]:
    """Renders and writes the dataset (and the tokenizer); returns the number of samples per subset.

    Raises:
        ValueError: On non-positive sizes or counts.
    """
    problems = _option_problems(options)
    if problems:
        raise ValueError("; ".join(problems))
    sizes = _subset_sizes(options)
    chunk = 64
    tasks = [(options, subset, start, min(start + chunk, count))
             for subset, count in sizes.items() for start in range(0, count, chunk)]
    if options.workers > 1:
        with worker_pool(options.workers) as pool:
            chunks = list(pool.imap(_run_chunk, tasks))
    else:
        chunks = [_run_chunk(task) for task in tasks]
    texts, rows = [], {subset: [] for subset in sizes}
    for (_, subset, _, _), results in zip(tasks, chunks):
        for sample_texts, row in results:
            texts.extend(sample_texts)
            rows[subset].append(row)
    for subset, subset_rows in rows.items():
        if subset_rows:
            _write_index(_subset_root(options, subset), subset, subset_rows)
    if options.tokenizer_out is not None:
        train_sentencepiece_tokenizer(texts + list(templates.all_prompt_texts()), options.tokenizer_out,
                                      options.tokenizer_vocab_size)
    logger.info("wrote synthetic dataset %s: %s", options.output, sizes)
    if options.num_heldout and options.split == "train":
        heldout = make_synthetic_dataset(replace(
            options, output=options.output / HELDOUT_FOLDER, num_samples=options.num_heldout, num_heldout=0,
            split=HELDOUT_FOLDER, tokenizer_out=None, num_cross_view=max(1, options.num_heldout // 4),
            num_photography=max(1, options.num_heldout // 8),
        ))
        sizes.update({f"{HELDOUT_FOLDER}/{subset}": count for subset, count in heldout.items()})
    return sizes
