#!/usr/bin/env python
"""Describe images and estimate their cameras with a trained Puffin (greedy decoding with a KV cache).

    python tools/understand.py --checkpoint runs/stage2_sft --images photos/ --output predictions.json
    python tools/understand.py --checkpoint runs/stage3_thinking --images list.txt --thinking --output p.json
    torchrun --nproc-per-node 2 tools/understand.py --checkpoint CKPT --images photos/ --output p.json \\
        --tensor-model-parallel-size 2

--images: image files, folders (their images, sub-folders included, sorted by path) or .txt files listing one
image path per line.
Writes a JSON list in Puffin's evaluation format plus our parsed camera, one entry per image:
{"id": file name, "output_text": answer, "camera": {"roll", "pitch", "vfov"} in radians or null, "reasoning":
thinking text or null, "finished": answer ended within --max-new-tokens}. Score it with tools/evaluate_camera.py.
Tasks: understanding (the base caption prompt, or the thinking prompt with --thinking), spatial-imagination
(describe the view at --yaw from each image as the initial view) and photography (camera + suggested yaw/pitch).
A stopped run resumes: finished batches are kept in OUTPUT.partial.jsonl and the same command again decodes only
the rest. See docs/inference.md.
"""
import argparse
import collections
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import List

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_puffin.process_lifetime import exit_quietly_while_starting  # noqa: E402

exit_quietly_while_starting(__name__, "understand.py")  # Ctrl-C while the libraries below load: one line

from megatron_puffin.inference.cli import (  # noqa: E402
    Progress,
    ReplicaRounds,
    UsageError,
    build_tool_parser,
    first_problems,
    is_output_rank,
    output_lock,
    parse_tool_args,
    prepare_output_file,
    run_tool,
    setup_logging,
)
from megatron_puffin.files import read_text  # noqa: E402
from megatron_puffin.platform import setup  # noqa: E402

logger = logging.getLogger("understand")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TASKS = ("understanding", "spatial-imagination", "photography")
RECORD_FIELDS = ("id", "output_text", "camera", "reasoning", "finished")


def build_parser():
    parser = build_tool_parser("understand.py", __doc__)
    parser.add_argument("--images", nargs="+", required=True,
                        help="image files, folders of images, or .txt lists of image paths")
    parser.add_argument("--output", required=True, help="predictions JSON to write")
    parser.add_argument("--task", choices=TASKS, default="understanding", help="what to ask (default: understanding)")
    parser.add_argument("--thinking", action="store_true",
                        help="the stage-3 thinking prompt: <think> reasoning </think> <answer>R, P, F</answer>")
    parser.add_argument("--prompt", default=None, help="a custom instruction instead of the task's prompt")
    parser.add_argument("--yaw", type=float, default=1.5710,
                        help="spatial-imagination yaw deviation in radians, positive turns left (default: 1.5710)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="decoding limit (default: 512)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave out images that cannot be read (named in a warning and counted in the summary) "
                             "instead of stopping before the model loads")
    parser.add_argument("--image-mode", choices=["center_crop", "resize"], default=None,
                        help="centre square crop then resize (understanding default) or straight resize (default of "
                             "the cross-view tasks)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output file and discard the resume journal of an interrupted run "
                             "with other settings beside it (without it, either is an error)")
    return parser


def collect_images(sources: List[str]) -> List[Path]:
    """Image paths from files, folders and .txt lists, in order; raises UsageError naming a bad source."""
    paths: List[Path] = []
    for source in map(Path, sources):
        if source.is_dir():  # sub-folders too: Puffin-4M keeps images in numbered folders (local_folder/000000/)
            files = [p for p in source.rglob("*") if p.is_file()]
            images = sorted(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES)
            if len(images) < len(files):  # said, not silently dropped (a .gif or .tif is not read)
                other = sorted(p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES)
                logger.warning("--images %s: %d file(s) without an image suffix (%s) skipped, e.g. %s", source,
                               len(other), ", ".join(IMAGE_SUFFIXES), other[0])
            paths += images
        elif source.suffix.lower() == ".txt" and source.is_file():
            lines = [line.strip() for line in read_text(source).splitlines()]
            paths += [Path(line) if os.path.isabs(line) else source.parent / line for line in lines if line]
        elif source.is_file():
            paths.append(source)
        else:
            raise UsageError(f"--images {source}: no such file or folder")
    if not paths:
        raise UsageError(f"--images {' '.join(sources)}: no images found (suffixes {', '.join(IMAGE_SUFFIXES)})")
    counts = collections.Counter(p.name for p in paths)  # linear: folders hold hundreds of thousands of images
    duplicates = sorted(name for name, count in counts.items() if count > 1)
    if duplicates:
        raise UsageError(f"--images: several images are named {duplicates[0]} (ids are file names); rename them")
    return paths


def check_images(paths: List[Path], skip_bad: bool = False) -> List[Path]:
    """The images that decode, checked before the model is loaded. Every image is tried, so one message lists all
    the bad ones (a folder of thousands should not need a re-run per bad file); without ``skip_bad`` any bad image
    is an error, with it the bad ones are left out with a warning naming them."""
    from megatron_puffin.data.images import decode_image

    good, bad = [], []
    for path in paths:
        try:
            decode_image(path.read_bytes())
            good.append(path)
        except FileNotFoundError:
            bad.append(f"{path}: no such file")
        except (OSError, ValueError) as error:
            bad.append(f"{path} does not decode ({error})")
    if bad:
        listed = first_problems(bad)
        if not skip_bad:
            raise UsageError(f"{len(bad)} of {len(paths)} images cannot be read: {listed}; remove or replace them, "
                             "or pass --skip-bad-images to describe the others")
        logger.warning("--skip-bad-images: %d of %d images left out: %s", len(bad), len(paths), "; ".join(bad))
        if not good:
            raise UsageError(f"none of the {len(paths)} images can be read: {listed}")
    return good


def check_args(args: argparse.Namespace) -> None:
    problems = []
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens ({args.max_new_tokens}) must be at least 1")
    if args.batch_size < 1:
        problems.append(f"--batch-size ({args.batch_size}) must be at least 1")
    if not math.isfinite(args.yaw):
        problems.append(f"--yaw ({args.yaw}) must be a finite number of radians")
    if args.thinking and args.task != "understanding":
        problems.append(f"--thinking applies to --task understanding, not {args.task}")
    if problems:
        raise UsageError("; ".join(problems))


def run(args: argparse.Namespace, model_flags: List[str]) -> int:
    check_args(args)
    listed = collect_images(args.images)
    paths = check_images(listed, args.skip_bad_images)
    output = prepare_output_file(args.output, "--output")
    # held while this run writes OUTPUT and its journal (removed at the end): a second run into them stops
    with output_lock(output.with_name(f".{output.name}.lock"), f"--output {output}", "understand.py"):
        return understand_into(args, model_flags, paths, output, unreadable=len(listed) - len(paths))


def understand_into(args: argparse.Namespace, model_flags: List[str], paths: List[Path], output: Path,
                    unreadable: int) -> int:
    """The run itself, holding ``output``'s lock (``unreadable``: images --skip-bad-images left out)."""
    from megatron_puffin.inference import load_image, load_puffin, understand
    from megatron_puffin.files import write_text_atomically
    from megatron_puffin.inference.journal import BatchJournal, checkpoint_fingerprint
    from megatron_puffin.inference.loading import resolve_inference_checkpoint
    from megatron_puffin.inference.tasks import imagination_prompt
    from megatron_puffin.data import templates
    from megatron_puffin.data.task_encoders import TextTooLong

    if output.exists() and not args.overwrite:
        raise UsageError(f"--output {output} already exists (the answers of an earlier run); choose another file, or "
                         "pass --overwrite to replace it")
    mode = args.image_mode or ("center_crop" if args.task == "understanding" else "resize")
    prompt = args.prompt or {"understanding": None, "photography": templates.PHOTOGRAPHY_PROMPT,
                             "spatial-imagination": imagination_prompt(args.yaw)}[args.task]
    # What an answer depends on (not --batch-size: answers are the same in any batch); a re-run with the same key
    # keeps the finished images of an interrupted run (megatron_puffin/inference/journal.py).
    checkpoint = os.path.abspath(resolve_inference_checkpoint(args.checkpoint))
    key = {"tool": "understand", "checkpoint": checkpoint, "fingerprint": checkpoint_fingerprint(checkpoint),
           "model_flags": model_flags, "prompt": prompt, "thinking": args.thinking, "image_mode": mode,
           "max_new_tokens": args.max_new_tokens}
    journal = BatchJournal(output.with_name(output.name + ".partial.jsonl"), key, writer=is_output_rank(),
                           overwrite=args.overwrite)
    records = [_reusable(journal.finished.get(path.name), path) for path in paths]
    todo = [index for index, record in enumerate(records) if record is None]
    loaded = load_puffin(args.checkpoint, model_flags, need_vae=False)
    size = loaded.encoder_config.image_max_size
    progress = Progress(len(paths), "understanding", not args.no_progress)
    progress(len(paths) - len(todo))
    def answer(chunk):
        images = [load_image(paths[index], size, mode) for index in chunk]
        try:
            outputs = understand(loaded.model, loaded.tokenizer, images, prompt=prompt, thinking=args.thinking,
                                 max_new_tokens=args.max_new_tokens, batch_size=len(chunk),
                                 encoder_config=loaded.encoder_config)
        except TextTooLong as error:  # only a --prompt can be that long; the tool has no limit flag to raise
            raise UsageError(f"--prompt: with the task's template it has {error.tokens} text tokens, more than the "
                             f"{error.limit} this checkpoint's prompts hold (set by its training's "
                             "--max-understanding-text-tokens); shorten --prompt") from None
        return [{"id": paths[index].name, "output_text": output.text,
                 "camera": None if output.camera is None else dict(output.camera._asdict()),
                 "reasoning": output.reasoning, "finished": output.finished} for index, output in zip(chunk, outputs)]

    # With more processes than the TP size, the replicas take turns: one batch each per round (cli.ReplicaRounds).
    for finished in ReplicaRounds.batched(todo, args.batch_size).map(answer):
        for index, record in finished:
            records[index] = record
        journal.append({**record, "source": _source(paths[index])} for index, record in finished)
        progress(len(finished))
    progress.close()
    if is_output_rank():
        write_text_atomically(output, json.dumps(records, indent=2) + "\n")
        journal.remove()
        unparsed = sum(record["camera"] is None for record in records)
        reused = f", {len(paths) - len(todo)} kept from an interrupted run" if len(todo) < len(paths) else ""
        skipped = f", {unreadable} unreadable left out" if unreadable else ""
        count = f"{len(records)} image{'' if len(records) == 1 else 's'}"
        print(f"wrote {output}: {count} ({unparsed} without a camera in the answer{reused}{skipped}) "
              f"from {loaded.checkpoint}")
    return 0


def _source(path: Path) -> str:
    """Which file an answer was for: its resolved path, size and modification time (an image replaced in place
    between an interrupted run and its re-run is decoded again)."""
    stat = path.stat()
    return f"{path.resolve()} {stat.st_size} {stat.st_mtime_ns}"


def _reusable(record, path: Path):
    """A journal record of this image (same file), without the journal's own fields; else None."""
    if record is None or record.get("source") != _source(path) or not set(RECORD_FIELDS) <= set(record):
        return None
    return {name: record[name] for name in RECORD_FIELDS}


def main(argv=None) -> int:
    from megatron_puffin.data.images import ImageError
    from megatron_puffin.inference import InferenceSetupError

    parser = build_parser()
    args, model_flags = parse_tool_args(parser, argv)
    setup_logging(args.log_level)
    setup()
    from megatron_puffin.inference.journal import PreviousRunConflict

    return run_tool("understand.py", lambda: run(args, model_flags),
                    (InferenceSetupError, ImageError, UsageError, PreviousRunConflict))


if __name__ == "__main__":
    from megatron_puffin.process_lifetime import exit_process

    exit_process(main())
