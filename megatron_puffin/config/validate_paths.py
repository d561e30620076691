"""Checks of the files the flags name, run in the same single validation pass (before any process group exists):
datasets are finished shards with the fields their task needs, the tokenizer loads and fits, the VAE config is
readable and fits the MMDiT, the tower checkpoints are directories a converter wrote, output paths can be created.
What the checkpoints hold (kind, shapes, tokenizer, resume decisions) is checked by
:mod:`megatron_puffin.training.preflight`. Skipped with --dry-run, which describes a cluster configuration from
another machine."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, List, Optional, Tuple, TYPE_CHECKING

from megatron_puffin.files import folder_problem, read_json_object
from megatron_puffin.models.vae_config import load_vae_config, vae_downsample_factor
from megatron_puffin.config.validate_values import check_sequence_limits

if TYPE_CHECKING:  # for annotations only
    from megatron_puffin.config.arguments import PuffinArguments
    from megatron_puffin.data.config import TaskStreamSpec
    from megatron_puffin.data.tokenizer import PuffinTokenizer


def _not_a_file(flag: str, path: Optional[str], what: str = "a directory") -> List[str]:
    if path and Path(path).exists() and not Path(path).is_dir():
        return [f"{flag} ({path}) is a file, but must be {what}; give a directory path"]
    return []


def _creatable(flag: str, path: Optional[str], folder: Optional[Path] = None) -> List[str]:
    """The folder ``path`` needs (``folder``, default ``path`` itself) can be made; otherwise the run would train
    until its first save or log line and fail there."""
    problem = folder_problem(folder or path) if path else None
    return [f"{flag} ({path}): {problem}; give a path under a folder this job can write"] if problem else []


def check_output_paths(args: PuffinArguments) -> List[str]:
    """--save, --tensorboard-dir are directories; --metrics-file is a file; each can be created."""
    if args.dry_run:
        return []
    save, tensorboard = args.checkpoint.save, args.logging.tensorboard_dir
    problems = _not_a_file("--save", save) or _creatable("--save", save)
    problems += _not_a_file("--tensorboard-dir", tensorboard) or _creatable("--tensorboard-dir", tensorboard)
    metrics = args.logging.metrics_file
    if metrics and Path(metrics).is_dir():
        problems.append(f"--metrics-file ({metrics}) is a directory; give a file path (e.g. {metrics}/metrics.jsonl)")
    elif metrics:
        problems += _creatable("--metrics-file", metrics, Path(metrics).absolute().parent)
    return problems


def check_input_checkpoints(args: PuffinArguments) -> List[str]:
    """Tower and pretrained checkpoints must be existing distributed checkpoints (metadata.json inside)."""
    if args.dry_run:
        return []
    ckpt, problems = args.checkpoint, []
    for flag, path in ckpt.weight_sources():
        if not path:
            continue
        directory = Path(path)
        if not directory.exists():
            problems.append(f"{flag} ({path}) does not exist; check the path")
        elif not directory.is_dir():
            problems.append(f"{flag} ({path}) is a file; give the checkpoint directory")
        elif flag != "--pretrained-checkpoint" and not (directory / "metadata.json").is_file():
            run = any(directory.glob("iter_*")) or (directory / "puffin_meta.json").is_file()
            hint = f"; it is a pretrain_puffin.py run or checkpoint: start from it with --pretrained-checkpoint " \
                   f"{path}" if run else "; create it with tools/convert_checkpoint.py"
            problems.append(f"{flag} ({path}) is not a distributed checkpoint (no metadata.json){hint}")
    return problems


def check_vae_files(args: PuffinArguments) -> List[str]:
    """--vae-config is a readable JSON object; --vae-path a folder with config.json; the MMDiT's channels are the
    VAE's latent channels (else the first generation step was a conv2d traceback, after every tower was built)."""
    if args.dry_run:
        return []
    problems = vae_file_problems(args.model.vae_config, args.model.vae_path)
    source = args.model.vae_config or (args.model.vae_path and str(Path(args.model.vae_path) / "config.json"))
    if problems or not source:
        return problems
    try:
        config = load_vae_config(args.model)
        latent = int(config.get("latent_channels", 4))  # diffusers' AutoencoderKL default
        factor = vae_downsample_factor(config)
    except (OSError, ValueError, TypeError, AttributeError) as error:
        return [f"the VAE config {source} cannot be read ({error.__class__.__name__}: {error})"]
    for flag, value in (("--dit-in-channels", args.dit.in_channels), ("--dit-out-channels", args.dit.out_channels)):
        if value != latent:
            problems.append(f"{flag} ({value}) must equal the VAE's latent_channels ({latent}, {source}): the MMDiT "
                            "denoises the VAE's latents; give the VAE the MMDiT was trained with (SD3: 16 channels)")
    # the longest image side is --image-size (dynamic resize), so its latent grid is the largest the MMDiT sees
    dit, size = args.dit, args.data.image_size
    if dit.patch_size >= 1 and size // factor // dit.patch_size > dit.pos_embed_max_size:
        largest = dit.pos_embed_max_size * dit.patch_size * factor
        problems.append(f"--image-size ({size}) gives latent grids of {size // factor // dit.patch_size} MMDiT tokens "
                        f"per side (VAE factor {factor}, --dit-patch-size {dit.patch_size}), more than "
                        f"--dit-pos-embed-max-size ({dit.pos_embed_max_size}) holds; use --image-size <= {largest}")
    return problems


def vae_file_problems(vae_config: Optional[str], vae_path: Optional[str]) -> List[str]:
    """The checks of :func:`check_vae_files` on the two flags' values (also used by ``tools/cache_latents.py``)."""
    problems = []
    if vae_config:
        problems += _json_object_problems(Path(vae_config), f"--vae-config ({vae_config})",
                                          "give an AutoencoderKL config file")
    if vae_path and not (Path(vae_path) / "config.json").is_file():
        problems.append(f"--vae-path ({vae_path}) has no config.json; give diffusers' AutoencoderKL folder "
                        "(SD3's vae/)")
    elif vae_path:
        problems += _json_object_problems(Path(vae_path) / "config.json", f"--vae-path ({vae_path}): config.json",
                                          "give diffusers' AutoencoderKL folder (SD3's vae/)")
    return problems


def _json_object_problems(path: Path, name: str, advice: str) -> List[str]:
    """[why the file ``path`` (``name`` in the message) is not a readable JSON object, and ``advice``], or []."""
    try:
        read_json_object(path, ValueError, f"; {advice}", name=name)
    except OSError as error:
        return [f"{name} cannot be read ({error.__class__.__name__}); check the path"]
    except ValueError as error:
        return [str(error)]
    return []


def check_stream_datasets(args: PuffinArguments) -> List[str]:
    """Every training and validation stream's paths open as finished shards (manifest, counts, .idx/.bin sizes)
    with its task's fields, and with --cached-latents every generation stream's shards hold latents at the training
    resolution."""
    from megatron_puffin.data.loader import stream_dataset_errors

    if args.dry_run:
        return []
    cached = (args.data.image_size, args.data.image_size_unit) if args.data.cached_latents else None
    return [problem for flag, spec in _present_streams(args)
            for problem in stream_dataset_errors(spec, flag, cached)]


def _present_streams(args: PuffinArguments) -> Iterator[Tuple[str, TaskStreamSpec]]:
    """(flag, spec) of every training and validation stream that parses and whose paths exist (the others are
    reported by check_data and the validation checks)."""
    from megatron_puffin.data.config import parse_task_stream

    for flag, specs in (("--task-stream", args.data.task_stream),
                        ("--valid-task-stream", args.validation.valid_task_stream)):
        for spec_text in specs:
            try:
                spec = parse_task_stream(spec_text)
            except ValueError:
                continue
            if all(Path(path).exists() for path in spec.paths):
                yield flag, spec


def check_tokenizer(args: PuffinArguments) -> List[str]:
    """--tokenizer loads, --vocab-size holds its vocabulary (else token ids overflow the embedding) and the fixed part
    of every stream's prompts. Whether the checkpoints this run continues were trained with it is
    :func:`megatron_puffin.training.preflight.check_checkpoint_contents`' question."""
    tokenizer, problems = flag_tokenizer(args)
    if tokenizer is None:
        return problems
    vocab = tokenizer.vocab_size
    if vocab > args.llm.vocab_size:
        return [f"--vocab-size ({args.llm.vocab_size}) is smaller than the vocabulary of --tokenizer "
                f"{args.data.tokenizer} ({vocab}); set --vocab-size {vocab} or more"]
    return _prompt_length_problems(args, tokenizer)


def flag_tokenizer(args: PuffinArguments) -> Tuple[Optional[PuffinTokenizer], List[str]]:
    """(the ``--tokenizer`` of ``args`` loaded, []), or (None, why it does not load). (None, []) when there is
    nothing to load here: no path, a missing one (check_data reports it) or a dry run."""
    from megatron_puffin.data.tokenizer import PuffinTokenizer, TokenizerError

    path = args.data.tokenizer
    if args.dry_run or not path or not Path(path).exists():
        return None, []
    try:
        return PuffinTokenizer(path), []
    except TokenizerError as error:
        return None, [f"--tokenizer: {error}"]


def _prompt_length_problems(args: PuffinArguments, tokenizer) -> List[str]:
    """--max-understanding-text-tokens / --max-generation-text-tokens hold the fixed part of every stream's prompts
    (checked on each stream's first sample with the training encoder; too small a limit would otherwise make every
    sample of the stream undecodable once training runs)."""
    from megatron_puffin.data.config import effective_data_seed
    from megatron_puffin.data.loader import stream_prompt_error, task_encoder_config

    if min(args.vision.patch_size, args.vision.fold_size, args.data.image_size, args.data.image_size_unit) < 1:
        return []  # reported by the vision and data checks
    if check_sequence_limits(args):
        return []  # reported there; assembling a prompt of that length would take minutes and gigabytes
    encoder_config = task_encoder_config(args.data, effective_data_seed(args.data.data_seed, args.training.seed),
                                         args.vision.patch_size, args.vision.fold_size, args.connector.num_queries)
    problems = (stream_prompt_error(spec, tokenizer, encoder_config, flag) for flag, spec in _present_streams(args))
    return [problem for problem in problems if problem]


PATH_VALIDATORS = [check_output_paths, check_input_checkpoints, check_vae_files, check_stream_datasets,
                   check_tokenizer]
