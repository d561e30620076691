#!/usr/bin/env python
"""Generate images for cameras (and captions) with a trained Puffin; world exploration from an initial view.

    python tools/generate.py --checkpoint runs/stage2_sft --output-dir gen/ \\
        --caption "A kitchen with a wooden table." --roll 0.1 --pitch -0.2 --vfov 1.0
    python tools/generate.py --checkpoint CKPT --output-dir gen/ --prompts requests.json --evaluate-cameras
    python tools/generate.py --checkpoint runs/stage4 --output-dir views/ --init-image room.jpg --num-views 3

Requests: --prompts FILE (.json list of objects or .csv with a header) with the fields caption, roll, pitch, vfov
(radians; vfov defaults to 1.48 with an initial view), optional yaw (world exploration: deviation from the initial
view, positive turns left), seed, id and init_image (a path; default --init-image); or one request from --caption,
--roll, --pitch, --vfov, --yaw; or --num-views N demo cameras around --init-image (multi-view sweep).
Writes DIR/<id>.png, DIR/contact_sheet.png (a grid labelled with the cameras) and DIR/generations.json (settings and,
per image, prompt, camera, seed, thinking reasoning and, with --evaluate-cameras, the camera the model's own
understanding path estimates). --evaluate-cameras also writes DIR/camera_faithfulness/ (metrics.json with median
errors and AUC@1/5/10 deg against the requested cameras, errors.csv, errors.png). PNGs are written batch by batch;
a stopped run resumes (the same command again generates only the missing images). See docs/inference.md.
"""
import argparse
import csv
import io
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_puffin.process_lifetime import exit_quietly_while_starting  # noqa: E402

exit_quietly_while_starting(__name__, "generate.py")  # Ctrl-C while the libraries below load: one line

from megatron_puffin.inference.cli import (  # noqa: E402
    Progress,
    ReplicaRounds,
    UsageError,
    build_tool_parser,
    first_problems,
    is_output_rank,
    output_lock,
    parse_tool_args,
    prepare_output_dir,
    run_tool,
    setup_logging,
)
from megatron_puffin.files import read_text  # noqa: E402
from megatron_puffin.platform import setup  # noqa: E402

logger = logging.getLogger("generate")
TRAINED_RANGES = {"roll": (-0.7854, 0.7854), "pitch": (-0.7854, 0.7854), "vfov": (0.3491, 1.8326)}
"""Camera ranges of Puffin's training data (docs/puffin.md §3.3); outside them the model extrapolates (a warning)."""
CROSS_VIEW_VFOV = 1.48
CONTACT_SHEET = "contact_sheet"
"""Stem of the grid image written beside the generated PNGs (no request may take it as its id)."""
CONTACT_SHEET_MAX = 100
"""Images on the contact sheet (the first ones): 10,000 requests at 512² made a 2.8-gigapixel PNG (8 GB of memory,
and no viewer opens it)."""
LOCK_FILE = ".generate.lock"
"""Held in --output-dir while a run writes there (removed at its end): a second run into the folder stops."""
REQUEST_FIELDS = ("id", "caption", "roll", "pitch", "vfov", "yaw", "seed", "init_image")


def build_parser():
    parser = build_tool_parser("generate.py", __doc__)
    parser.add_argument("--output-dir", required=True, help="folder for the PNGs, contact sheet and JSON (created)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of a run with other settings or another checkpoint in --output-dir "
                             "(its PNGs, contact sheet, generations.json, camera_faithfulness/ and resume journal); "
                             "without it such a folder is an error")
    parser.add_argument("--prompts", default=None, help="requests: a .json list or a .csv file (see above)")
    parser.add_argument("--caption", default="", help="scene text of a single request (may be empty)")
    for name in ("roll", "pitch", "vfov", "yaw"):
        parser.add_argument(f"--{name}", type=float, default=None, help=f"{name} of a single request, radians")
    parser.add_argument("--init-image", default=None, help="initial view: world exploration (image2image)")
    parser.add_argument("--num-views", type=int, default=None,
                        help="multi-view sweep: N target cameras drawn as Puffin's demo does around --init-image")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="CFG scale; <= 1 disables (default: the checkpoint's --flow-guidance-scale, 4.5 as "
                             "Puffin)")
    parser.add_argument("--steps", type=int, default=None,
                        help="Euler steps (default: the checkpoint's --flow-num-inference-steps, 50 as Puffin)")
    parser.add_argument("--seed", type=int, default=42, help="base seed: request i uses seed + i (default: 42)")
    parser.add_argument("--image-size", type=int, default=None, help="output side (default: the model's image size)")
    parser.add_argument("--negative-caption", default="", help="negative prompt text (default: empty, as Puffin)")
    parser.add_argument("--thinking", action="store_true", help="write spatial reasoning first (stage-3 checkpoints)")
    parser.add_argument("--max-reasoning-tokens", type=int, default=512, help="reasoning length limit (default: 512)")
    parser.add_argument("--evaluate-cameras", action="store_true",
                        help="estimate each image's camera with the model's understanding path and score it")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="decoding limit of --evaluate-cameras")
    return parser


# -- requests --------------------------------------------------------------------------------------------------------
def _read_rows(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        raise UsageError(f"--prompts {path}: " + ("not a regular file" if path.exists() else "no such file"))
    try:
        if path.suffix.lower() == ".csv":
            rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
            for line, row in enumerate(rows, start=2):
                if None in row:  # DictReader puts the values beyond the header under None
                    raise UsageError(f"--prompts {path} line {line}: more values than the header has columns "
                                     "(quote captions that hold commas)")
            return [{k.strip(): v for k, v in row.items() if v not in (None, "")} for row in rows]
        rows = json.loads(read_text(path))
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as error:
        raise UsageError(f"--prompts {path}: not readable JSON/CSV ({error})") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise UsageError(f"--prompts {path}: a JSON file must hold a list of objects")
    return rows


def _number(row: Dict[str, Any], name: str, where: str, default: Optional[float] = None) -> Optional[float]:
    value = row.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool):  # JSON true / false: float() would take them for 1 and 0
        raise UsageError(f"{where}: {name} {value!r} is not a number of radians")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: {name} {value!r} is not a number of radians") from None
    if not math.isfinite(number):
        raise UsageError(f"{where}: {name} {value!r} must be finite")
    return number


def _seed(row: Dict[str, Any], where: str) -> Optional[int]:
    """A request's own seed: a whole number (a JSON integer, or a CSV cell of digits), or None."""
    value = row.get("seed")
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not text.lstrip("+-").isdigit():
        raise UsageError(f"{where}: seed {value!r} is not a whole number")  # 1.5 was taken for 1
    return int(text)


def _camera(row: Dict[str, Any], where: str, has_init: bool):
    from megatron_puffin.camera import Camera

    values = {name: _number(row, name, where) for name in ("roll", "pitch", "vfov", "yaw")}
    if values["vfov"] is None and has_init:
        values["vfov"] = CROSS_VIEW_VFOV
    missing = [name for name in ("roll", "pitch", "vfov") if values[name] is None]
    if missing:
        raise UsageError(f"{where}: give {', '.join(missing)} (radians)")
    try:
        camera = Camera(values["roll"], values["pitch"], values["vfov"], values["yaw"])
    except ValueError as error:
        raise UsageError(f"{where}: {error}") from None
    for name, (low, high) in TRAINED_RANGES.items():
        if not low <= getattr(camera, name) <= high:
            logger.warning("%s: %s %.4f is outside Puffin's training range [%.4f, %.4f]; expect extrapolation",
                           where, name, getattr(camera, name), low, high)
    return camera


def read_requests(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Rows {id, caption, camera, seed, init_image path} from --prompts, the single-request flags or --num-views."""
    from megatron_puffin.inference.tasks import sample_exploration_cameras

    if args.num_views is not None:
        if args.prompts or args.init_image is None or args.num_views < 1:
            raise UsageError("--num-views N (N >= 1) needs --init-image and no --prompts")
        cameras = sample_exploration_cameras(args.num_views, args.seed)
        return [{"id": f"view_{i:03d}", "caption": args.caption, "camera": camera, "seed": None,
                 "init_image": args.init_image} for i, camera in enumerate(cameras)]
    if args.prompts:
        rows, source = _read_rows(Path(args.prompts)), f"--prompts {args.prompts}"
    else:
        rows = [{"caption": args.caption, **{n: getattr(args, n) for n in ("roll", "pitch", "vfov", "yaw")}}]
        source = "flags"
    if not rows:
        raise UsageError(f"{source}: no requests")
    requests, ids, problems = [], set(), []
    for index, row in enumerate(rows):  # every row is checked: one message lists the problems of all of them
        where = f"{source} row {index}" if args.prompts else "--roll/--pitch/--vfov"
        try:
            request = _request(row, index, where, args.init_image)
            if request["id"] in ids or "/" in request["id"]:
                raise UsageError(f"{where}: id {request['id']!r} is repeated or holds '/'; ids name the PNG files")
            if request["id"] == CONTACT_SHEET:  # its PNG would be overwritten by the sheet at the end
                raise UsageError(f"{where}: id {request['id']!r} is the contact sheet's name ({CONTACT_SHEET}.png); "
                                 "choose another id")
        except UsageError as problem:
            problems.append(str(problem))
            continue
        ids.add(request["id"])
        requests.append(request)
    raise_all(problems, f"{len(problems)} of {len(rows)} requests are wrong")
    return requests


def _request(row: Dict[str, Any], index: int, where: str, init_image: Optional[str]) -> Dict[str, Any]:
    unknown = sorted(set(row) - set(REQUEST_FIELDS))
    if unknown:  # e.g. "Caption": silently ignored, it would have generated without the caption
        raise UsageError(f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(REQUEST_FIELDS)}")
    init = row.get("init_image") or init_image
    seed = _seed(row, where)
    identifier = row.get("id")
    if identifier is None or str(identifier).strip() == "":  # a CSV's empty id cell: a hidden ".png" otherwise
        identifier = f"{index:04d}"
    return {"id": str(identifier), "caption": str(row.get("caption", "") or ""),
            "camera": _camera(row, where, init is not None), "seed": seed,
            "init_image": init}


def raise_all(problems: List[str], summary: str) -> None:
    """One :class:`UsageError` for a list of problems: the problem itself when there is one, else the summary,
    the first three and how many more."""
    if len(problems) == 1:
        raise UsageError(problems[0])
    if problems:
        raise UsageError(f"{summary}: {first_problems(problems)}")


def check_args(args: argparse.Namespace) -> None:
    from megatron_puffin.diffusion.config import inference_steps_problem

    problems = []
    steps = None if args.steps is None else inference_steps_problem("--steps", args.steps)
    if steps:
        problems.append(steps)
    counts = (("--batch-size", args.batch_size), ("--max-reasoning-tokens", args.max_reasoning_tokens),
              ("--max-new-tokens", args.max_new_tokens))
    for flag, value in counts:
        if value < 1:
            problems.append(f"{flag} ({value}) must be at least 1")
    if args.image_size is not None and args.image_size < 1:
        problems.append(f"--image-size ({args.image_size}) must be positive")
    # before the model loads (check_generation checks the settings again against the checkpoint)
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        problems.append(f"--guidance-scale ({args.guidance_scale}) must be a finite number (<= 1 disables CFG)")
    if problems:
        raise UsageError("; ".join(problems))


def check_init_images(requests) -> None:
    from megatron_puffin.data.images import decode_image

    paths, problems = sorted({r["init_image"] for r in requests if r["init_image"]}), []
    for path in paths:
        if not os.path.isfile(path):
            problems.append(f"initial view {path}: " + ("not a regular file" if os.path.exists(path) else
                                                        "no such file"))
            continue
        try:
            decode_image(Path(path).read_bytes())
        except (OSError, ValueError) as error:
            problems.append(f"initial view {path} does not decode ({error}); give a JPEG/PNG image")
    raise_all(problems, f"{len(problems)} of {len(paths)} initial views cannot be read")


# -- outputs ---------------------------------------------------------------------------------------------------------
def camera_dict(camera) -> Dict[str, Optional[float]]:
    return {"roll": camera.roll, "pitch": camera.pitch, "vfov": camera.vfov, "yaw": camera.yaw}


def evaluate_cameras(loaded, results, requests, args: argparse.Namespace, output_dir: Path):
    """Estimate each generated image's camera with the model's understanding path; score against the request."""
    import torch

    from megatron_puffin.evaluation import GroundTruthCamera, format_table, score_prediction, summarize, write_report
    from megatron_puffin.inference import understand

    def estimate(chunk):
        images = [results[index].image.permute(2, 0, 1).float().mul(2 / 255).sub(1) for index in chunk]
        with torch.no_grad():
            return understand(loaded.model, loaded.tokenizer, images, thinking=args.thinking,
                              max_new_tokens=args.max_new_tokens, batch_size=len(chunk),
                              encoder_config=loaded.encoder_config)

    progress = Progress(len(results), "estimating cameras", not args.no_progress)
    outputs = [None] * len(results)
    # the data-parallel replicas take turns, as in the generation
    for finished in ReplicaRounds.batched(range(len(results)), args.batch_size).map(estimate):
        for index, output in finished:
            outputs[index] = output
        progress(len(finished))
    progress.close()
    scored = []
    for request, result, output in zip(requests, results, outputs):
        height, width = result.image.shape[:2]
        camera = request["camera"]
        truth = GroundTruthCamera(f"{request['id']}.png", camera.roll, camera.pitch, camera.vfov, width, height)
        scored.append(score_prediction(truth.fname, output.text, truth))
    metrics = summarize(scored)
    if is_output_rank():
        title = f"camera faithfulness of {len(scored)} generated images (estimated by the model itself)"
        write_report(metrics, scored, output_dir / "camera_faithfulness", title)
        print(format_table(metrics, title))
    return outputs, metrics


def image_record(request: Dict[str, Any], result) -> Dict[str, Any]:
    """generations.json's entry of one image (also its journal line while the run is going)."""
    return {"id": request["id"], "file": f"{request['id']}.png", "task": result.task, "caption": request["caption"],
            "prompt": result.prompt, "reasoning": result.reasoning, "camera": camera_dict(result.camera),
            "seed": result.seed, "init_image": request["init_image"], "prompt_cut": result.prompt_cut}


def earlier_outputs(output_dir: Path, key: Dict[str, Any], overwrite: bool) -> Dict[str, Dict[str, Any]]:
    """generations.json's records of the finished run already in ``output_dir`` when it had this run's key (the same
    command again, or more requests: only new or changed requests are generated).

    A folder holding images of a run with another key is an error (:class:`PreviousRunConflict`) unless
    ``overwrite``; then that run's files (the PNGs generations.json lists, the contact sheet, generations.json and
    camera_faithfulness/) are removed first, so the folder never mixes two runs.
    """
    import shutil

    from megatron_puffin.inference.journal import PreviousRunConflict, key_difference

    path = output_dir / "generations.json"
    if not path.is_file():
        return {}
    try:
        document = json.loads(read_text(path))
        records = {str(record["id"]): record for record in document["images"]}
    except (OSError, ValueError, KeyError, TypeError):
        document, records = {}, {}
    if document.get("key") == key:
        return records
    # only files named like this tool's outputs, directly in the folder (never a path a damaged file points to)
    files = [output_dir / f"{name}.png" for name in records if Path(f"{name}.png").name == f"{name}.png"]
    present = [file for file in files if file.is_file()]
    if not present and document:
        return {}
    what = (f"{len(present)} images of another generate.py run ({key_difference(document.get('key'), key)})"
            if document else "a generations.json that generate.py cannot read")
    if not overwrite:
        raise PreviousRunConflict(f"--output-dir {output_dir} holds {what}; choose another folder, or pass "
                                  "--overwrite to replace them")
    if is_output_rank():
        for file in present + [output_dir / f"{CONTACT_SHEET}.png", path]:
            file.unlink(missing_ok=True)
        shutil.rmtree(output_dir / "camera_faithfulness", ignore_errors=True)
    logger.warning("--overwrite: removed the outputs of another run from %s: %s", output_dir, what)
    return {}


def save_png(image, path: Path) -> None:
    """Writes a uint8 ``[H, W, 3]`` tensor or a PIL image in one rename (a kill never leaves half a PNG under the
    final name)."""
    from PIL import Image

    from megatron_puffin.files import atomic_path

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image.numpy())
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


def reusable_result(record: Optional[Dict[str, Any]], request: Dict[str, Any], seed: int, size: int, output_dir: Path):
    """The finished image of an interrupted run with the same settings, when it is this very request (caption,
    camera, seed, initial view) and its PNG reads back at the output size; else None."""
    import numpy as np
    import torch
    from PIL import Image

    from megatron_puffin.inference import GeneratedImage

    wanted = {"caption": request["caption"], "camera": camera_dict(request["camera"]), "seed": seed,
              "init_image": request["init_image"]}
    if record is None or any(record.get(name) != value for name, value in wanted.items()):
        return None
    try:
        with Image.open(output_dir / f"{request['id']}.png") as png:
            image = torch.from_numpy(np.asarray(png.convert("RGB")).copy())
    except (OSError, ValueError):
        return None
    if tuple(image.shape) != (size, size, 3):
        return None
    return GeneratedImage(image=image, prompt=record.get("prompt", ""), reasoning=record.get("reasoning"),
                          camera=request["camera"], seed=seed, task=record.get("task", ""),
                          prompt_cut=bool(record.get("prompt_cut", False)))


def write_outputs(loaded, args: argparse.Namespace, requests, results, estimates, output_dir: Path,
                  key: Dict[str, Any]) -> None:
    """The contact sheet and generations.json (the PNGs were written batch by batch)."""
    from megatron_puffin.inference.contact_sheet import contact_sheet
    from megatron_puffin.files import write_text_atomically

    records = []
    for index, (request, result) in enumerate(zip(requests, results)):
        record = image_record(request, result)
        if estimates is not None:
            estimate = estimates[index]
            record["estimated_camera"] = None if estimate.camera is None else dict(estimate.camera._asdict())
            record["estimate_text"] = estimate.text
        records.append(record)
    shown = min(len(results), CONTACT_SHEET_MAX)
    sheet = contact_sheet([r.image for r in results[:shown]], [r["id"] for r in requests[:shown]],
                          [r.camera for r in results[:shown]])
    save_png(sheet, output_dir / f"{CONTACT_SHEET}.png")
    if shown < len(results):
        logger.warning("%s.png shows the first %d of the %d images", CONTACT_SHEET, shown, len(results))
    settings = {name: getattr(args, name) for name in ("guidance_scale", "steps", "seed", "negative_caption",
                                                       "thinking", "image_size")}
    settings["image_size"] = int(results[0].image.shape[0])
    document = {"checkpoint": loaded.checkpoint, "settings": settings, "images": records, "key": key}
    write_text_atomically(output_dir / "generations.json", json.dumps(document, indent=2) + "\n")
    count = f"{len(records)} image{'' if len(records) == 1 else 's'}"
    print(f"wrote {count}, {output_dir / f'{CONTACT_SHEET}.png'} and {output_dir / 'generations.json'}")


def sampling_settings(args: argparse.Namespace, loaded, size: int):
    """The generation settings, checked against the loaded model before the progress bar starts and before any
    initial view is resized. --steps / --guidance-scale not given: the sampling settings the checkpoint was trained
    with (its --flow-num-inference-steps / --flow-guidance-scale); ``args`` records the values used."""
    from megatron_puffin.inference import GenerationSettings
    from megatron_puffin.inference.generation import check_generation

    flow = loaded.config.flow
    args.steps = flow.num_inference_steps if args.steps is None else args.steps
    args.guidance_scale = flow.guidance_scale if args.guidance_scale is None else args.guidance_scale
    settings = GenerationSettings(guidance_scale=args.guidance_scale, num_inference_steps=args.steps, seed=args.seed,
                                  image_size=size, negative_caption=args.negative_caption, thinking=args.thinking,
                                  max_reasoning_tokens=args.max_reasoning_tokens, batch_size=args.batch_size)
    try:
        check_generation(loaded.model, settings, loaded.encoder_config)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return settings


def run(args: argparse.Namespace, model_flags: List[str]) -> int:
    check_args(args)
    requests = read_requests(args)
    check_init_images(requests)
    output_dir = prepare_output_dir(args.output_dir, "--output-dir")
    with output_lock(output_dir / LOCK_FILE, f"--output-dir {output_dir}", "generate.py"):
        return generate_into(args, model_flags, requests, output_dir)


def generate_into(args: argparse.Namespace, model_flags: List[str], requests, output_dir: Path) -> int:
    """The run itself, holding ``output_dir``'s lock."""
    from megatron_puffin.inference import GenerationRequest, generate_batches, load_image, load_puffin
    from megatron_puffin.inference.generation import plan_batches
    from megatron_puffin.inference.journal import BatchJournal, checkpoint_fingerprint
    from megatron_puffin.inference.loading import resolve_inference_checkpoint

    # What an image depends on besides its request (not --batch-size: an image depends on its request and seed
    # only); a re-run with the same key keeps the finished images of an interrupted run.
    checkpoint = os.path.abspath(resolve_inference_checkpoint(args.checkpoint))
    key = {"tool": "generate", "checkpoint": checkpoint, "fingerprint": checkpoint_fingerprint(checkpoint),
           "model_flags": model_flags, **{name: getattr(args, name) for name in (
               "guidance_scale", "steps", "negative_caption", "thinking", "max_reasoning_tokens", "image_size")}}
    journal = BatchJournal(output_dir / "generations.partial.jsonl", key, writer=is_output_rank(),
                           overwrite=args.overwrite)
    if not args.overwrite:  # a conflict with an earlier run is found before the model loads
        earlier_outputs(output_dir, key, overwrite=False)
    seeds = [args.seed + index if r["seed"] is None else r["seed"] for index, r in enumerate(requests)]
    loaded = load_puffin(args.checkpoint, model_flags, need_vae=True)
    size = args.image_size or loaded.encoder_config.image_max_size
    settings = sampling_settings(args, loaded, size)
    # --overwrite removes an earlier run's outputs only now, when the model has loaded and the settings are valid
    finished = {**earlier_outputs(output_dir, key, args.overwrite), **journal.finished}
    results = [reusable_result(finished.get(r["id"]), r, seed, size, output_dir) for r, seed in zip(requests, seeds)]
    done = [index for index, result in enumerate(results) if result is not None]
    views = {path: load_image(path, size, mode="resize")
             for path in {r["init_image"] for i, r in enumerate(requests) if i not in done} if path}
    jobs = [GenerationRequest(camera=r["camera"], caption=r["caption"], seed=seed, init_image=views.get(r["init_image"]))
            for r, seed in zip(requests, seeds)]
    progress = Progress(len(jobs), "generating", not args.no_progress)
    progress(len(done))
    try:
        # With more processes than the TP size, the replicas take turns: one batch each per round.
        def draw(chunk):  # generate_batches keeps every request's own seed whatever else is skipped
            others = set(range(len(jobs))) - set(chunk)
            drawn = {index: image for indices, batch in generate_batches(loaded.model, loaded.tokenizer, jobs, settings,
                                                                         loaded.encoder_config, skip=others)
                     for index, image in zip(indices, batch)}
            return [drawn[index] for index in chunk]

        for finished in ReplicaRounds(plan_batches(jobs, args.batch_size, skip=done)).map(draw):
            for index, result in finished:
                results[index] = result
                if is_output_rank():
                    save_png(result.image, output_dir / f"{requests[index]['id']}.png")
            journal.append(image_record(requests[index], results[index]) for index, _ in finished)
            progress(len(finished))
    except ValueError as error:  # a request the batch checks refuse (a seed out of range)
        raise UsageError(str(error)) from None
    progress.close()
    if done:
        logger.warning("kept %d finished images of an earlier run with the same settings", len(done))
    estimates = evaluate_cameras(loaded, results, requests, args, output_dir)[0] if args.evaluate_cameras else None
    if is_output_rank():
        write_outputs(loaded, args, requests, results, estimates, output_dir, key)
        journal.remove()
    return 0


def main(argv=None) -> int:
    from megatron_puffin.inference import InferenceSetupError

    parser = build_parser()
    args, model_flags = parse_tool_args(parser, argv)
    setup_logging(args.log_level)
    setup()
    from megatron_puffin.inference.journal import PreviousRunConflict

    return run_tool("generate.py", lambda: run(args, model_flags),
                    (InferenceSetupError, UsageError, PreviousRunConflict))


if __name__ == "__main__":
    from megatron_puffin.process_lifetime import exit_process

    exit_process(main())
