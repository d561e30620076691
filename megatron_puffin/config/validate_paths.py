"""Checks that need the file system, run in the same single validation pass (before any process group exists):
datasets are finished shards with the fields their task needs, the VAE and tower checkpoints are there, output
paths are not files. Skipped with --dry-run, which describes a cluster configuration from another machine."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional


def _not_a_file(flag: str, path: Optional[str], what: str = "a directory") -> List[str]:
    if path and Path(path).exists() and not Path(path).is_dir():
        return [f"{flag} ({path}) is a file, but must be {what}; give a directory path"]
    return []


def check_output_paths(args) -> List[str]:
    """--save, --tensorboard-dir are directories; --metrics-file is a file."""
    if args.dry_run:
        return []
    problems = _not_a_file("--save", args.checkpoint.save)
    problems += _not_a_file("--tensorboard-dir", args.logging.tensorboard_dir)
    metrics = args.logging.metrics_file
    if metrics and Path(metrics).is_dir():
        problems.append(f"--metrics-file ({metrics}) is a directory; give a file path (e.g. {metrics}/metrics.jsonl)")
    return problems


def check_input_checkpoints(args) -> List[str]:
    """Tower and pretrained checkpoints must be existing distributed checkpoints (metadata.json inside)."""
    if args.dry_run:
        return []
    ckpt, problems = args.checkpoint, []
    for flag, path in (("--llm-checkpoint", ckpt.llm_checkpoint), ("--vision-checkpoint", ckpt.vision_checkpoint),
                       ("--dit-checkpoint", ckpt.dit_checkpoint), ("--pretrained-checkpoint",
                                                                   ckpt.pretrained_checkpoint)):
        if not path:
            continue
        directory = Path(path)
        if not directory.exists():
            problems.append(f"{flag} ({path}) does not exist; check the path")
        elif not directory.is_dir():
            problems.append(f"{flag} ({path}) is a file; give the checkpoint directory")
        elif flag != "--pretrained-checkpoint" and not (directory / "metadata.json").is_file():
            problems.append(f"{flag} ({path}) is not a distributed checkpoint (no metadata.json); create it with "
                            "tools/convert_checkpoint.py")
    return problems


def check_vae_files(args) -> List[str]:
    """--vae-config is a readable JSON object; --vae-path a folder with config.json."""
    if args.dry_run:
        return []
    model, problems = args.model, []
    if model.vae_config:
        path = Path(model.vae_config)
        try:
            config = json.loads(path.read_text())
            if not isinstance(config, dict):
                problems.append(f"--vae-config ({path}) must hold a JSON object (an AutoencoderKL config)")
        except (OSError, UnicodeDecodeError) as error:
            problems.append(f"--vae-config ({path}) cannot be read ({error.__class__.__name__}); check the path")
        except json.JSONDecodeError as error:
            problems.append(f"--vae-config ({path}) is not valid JSON ({error}); give an AutoencoderKL config file")
    if model.vae_path and not (Path(model.vae_path) / "config.json").is_file():
        problems.append(f"--vae-path ({model.vae_path}) has no config.json; give diffusers' AutoencoderKL folder "
                        "(SD3's vae/)")
    return problems


def check_stream_datasets(args) -> List[str]:
    """Every stream's paths open as finished shards (manifest, counts, .idx/.bin sizes) with its task's fields."""
    from megatron_puffin.data.config import parse_task_stream
    from megatron_puffin.data.loader import stream_dataset_errors

    if args.dry_run:
        return []
    problems: List[str] = []
    for spec_text in args.data.task_stream:
        try:
            spec = parse_task_stream(spec_text)
        except ValueError:
            continue  # reported by check_data
        if all(Path(path).exists() for path in spec.paths):  # missing paths: reported by check_data
            problems += stream_dataset_errors(spec)
    return problems


def check_tokenizer(args) -> List[str]:
    """--tokenizer loads, and --vocab-size holds its vocabulary (else token ids overflow the embedding)."""
    from megatron_puffin.data.tokenizer import PuffinTokenizer

    path = args.data.tokenizer
    if args.dry_run or not path or not Path(path).exists():
        return []  # a missing one is reported by check_data
    try:
        vocab = PuffinTokenizer(path).vocab_size
    except Exception as error:  # noqa: BLE001 - SentencePiece/transformers raise many types for a broken file
        return [f"--tokenizer ({path}) cannot be loaded ({type(error).__name__}: {str(error)[:200]}); give an HF "
                "tokenizer directory or a SentencePiece .model"]
    if vocab > args.llm.vocab_size:
        return [f"--vocab-size ({args.llm.vocab_size}) is smaller than the vocabulary of --tokenizer {path} "
                f"({vocab}); set --vocab-size {vocab} or more"]
    return []


PATH_VALIDATORS = [check_output_paths, check_input_checkpoints, check_vae_files, check_stream_datasets,
                   check_tokenizer]
