"""Checks that need the file system, run in the same single validation pass (before any process group exists):
datasets are finished shards with the fields their task needs, the VAE and tower checkpoints are there and hold a
model of the shape the flags describe (read from their JSON sidecar only), output paths are not files. Skipped with --dry-run, which describes a cluster configuration from another machine."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, TYPE_CHECKING

from megatron_puffin.config.dataclass_args import flag_name
from megatron_puffin.files import folder_problem, read_json_object

if TYPE_CHECKING:  # for annotations only (megatron_puffin.config imports much of the package)
    from megatron_puffin.config.arguments import PuffinArguments
    from megatron_puffin.data.config import TaskStreamSpec


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
    from megatron_puffin.training.flops import load_vae_config, vae_downsample_factor

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
    """--tokenizer loads, --vocab-size holds its vocabulary (else token ids overflow the embedding), and a checkpoint
    whose LLM this run continues (--load, --pretrained-checkpoint) was trained with this vocabulary (the record its
    ``puffin_meta.json`` holds, :meth:`PuffinTokenizer.identity`): the same sizes with another vocabulary pass every
    shape check and train the embedding rows of one word as another's."""
    from megatron_puffin.data.tokenizer import PuffinTokenizer, TokenizerError, identity_difference

    path = args.data.tokenizer
    if args.dry_run or not path or not Path(path).exists():
        return []  # a missing one is reported by check_data
    try:
        tokenizer = PuffinTokenizer(path)
    except TokenizerError as error:
        return [f"--tokenizer: {error}"]
    vocab = tokenizer.vocab_size
    if vocab > args.llm.vocab_size:
        return [f"--vocab-size ({args.llm.vocab_size}) is smaller than the vocabulary of --tokenizer {path} "
                f"({vocab}); set --vocab-size {vocab} or more"]
    problems: List[str] = []
    current = None
    for flag, directory, _, meta in _checkpoint_metadata(args):
        record = meta.get("tokenizer")
        if flag not in ("--load", "--pretrained-checkpoint") or "llm" not in meta.get("towers", []) or \
                not isinstance(record, dict):
            continue
        current = current or tokenizer.identity()  # hashed only when a checkpoint holds a record
        difference = identity_difference(record, current)
        if difference:
            problems.append(f"{flag} {directory}: {difference}; give --tokenizer {record.get('path')} (or a copy of "
                            "it)")
    return problems + _prompt_length_problems(args, tokenizer)


def _prompt_length_problems(args: PuffinArguments, tokenizer) -> List[str]:
    """--max-understanding-text-tokens / --max-generation-text-tokens hold the fixed part of every stream's prompts
    (checked on each stream's first sample with the training encoder; too small a limit would otherwise make every
    sample of the stream undecodable once training runs)."""
    from megatron_puffin.data.config import effective_data_seed
    from megatron_puffin.data.loader import stream_prompt_error, task_encoder_config

    if min(args.vision.patch_size, args.vision.fold_size, args.data.image_size, args.data.image_size_unit) < 1:
        return []  # reported by the vision and data checks
    encoder_config = task_encoder_config(args.data, effective_data_seed(args.data.data_seed, args.training.seed),
                                         args.vision.patch_size, args.vision.fold_size, args.connector.num_queries)
    problems = (stream_prompt_error(spec, tokenizer, encoder_config, flag) for flag, spec in _present_streams(args))
    return [problem for problem in problems if problem]


# The flags that give a tower's tensors their shapes, by config group: a checkpoint trained with other values does
# not load (or, for head counts at equal sizes, loads into another computation).
SHAPE_FIELDS: Dict[str, Tuple[str, ...]] = {
    "llm": ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
            "vocab_size", "add_qkv_bias", "tie_word_embeddings"),
    "vision": ("patch_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "max_image_size",
               "class_token_len", "final_norm", "feature_normalizer", "fold_size"),
    "connector": ("num_queries", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                  "pooled_projection_dim", "joint_attention_dim"),
    "dit": ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "pos_embed_max_size"),
}
# A training checkpoint's towers (its puffin_meta.json "towers") -> the (group, field)s that shape them; the vision
# projector and the meta queries live in the LLM's hidden size.
TOWER_SHAPES: Dict[str, List[Tuple[str, str]]] = {
    "llm": [("llm", name) for name in SHAPE_FIELDS["llm"]],
    "vision": [("vision", name) for name in SHAPE_FIELDS["vision"]] + [("llm", "hidden_size")],
    "queries": [("connector", name) for name in SHAPE_FIELDS["connector"]] + [("llm", "hidden_size")],
    "dit": [("dit", name) for name in SHAPE_FIELDS["dit"]],
}


def _shape_value(group: str, name: str, values: Dict[str, Any]) -> Any:
    """A shape flag's effective value (``--kv-channels`` unset means hidden size / heads)."""
    if group == "llm" and name == "kv_channels" and values.get(name) is None:
        heads = values.get("num_attention_heads") or 0
        return values.get("hidden_size", 0) // heads if heads > 0 else None
    return values.get(name)


def shape_differences(args: PuffinArguments, stored: Dict[str, Dict[str, Any]], pairs: List[Tuple[str, str]]) -> List[str]:
    """``--flag CHECKPOINT (checkpoint) vs NOW (flags)`` for every (group, field) whose stored value differs."""
    differences = []
    for group, name in dict.fromkeys(pairs):  # ordered, without repeats
        if group not in stored or name not in stored[group]:
            continue  # flags of another version: nothing to compare
        config = getattr(args, group)
        then = _shape_value(group, name, stored[group])
        now = _shape_value(group, name, vars(config))
        if then != now:
            field = next(f for f in dataclasses.fields(config) if f.name == name)
            differences.append(f"{flag_name(type(config), field)} {then} (checkpoint) vs {now} (flags)")
    return differences


def checkpoint_shape_problems(args: PuffinArguments, flag: str, directory: str, meta: Dict[str, Any],
                              need_all_towers: bool) -> List[str]:
    """One message listing every shape difference between ``meta`` (a checkpoint's sidecar) and the flags."""
    from megatron_puffin.training.towers import CHECKPOINT_TOWERS as TOWERS

    kind_configs = {"llm": ("llm", "llm_config"), "vision": ("vision", "vision_config"), "dit": ("dit", "dit_config")}
    if meta.get("kind") in kind_configs and isinstance(meta.get(kind_configs[meta["kind"]][1]), dict):
        group, key = kind_configs[meta["kind"]]  # a converted tower checkpoint (tools/convert_checkpoint.py)
        stored = {group: meta[key]}
        if "llm_hidden_size" in meta:
            stored["llm"] = {"hidden_size": meta["llm_hidden_size"]}
        differences = shape_differences(args, stored, TOWER_SHAPES[group])
        towers: List[str] = []
    else:
        stored, towers = meta.get("args"), list(meta.get("towers", TOWERS))
        if not isinstance(stored, dict):
            return []  # no flags stored: the load-time tensor check still compares every shape
        differences = shape_differences(args, stored, [p for t in towers if t in TOWER_SHAPES for p in TOWER_SHAPES[t]])
    missing = [tower for tower in TOWERS if tower not in towers] if need_all_towers else []
    if missing:
        differences.append(f"it holds no {', '.join(missing)} tower (towers: {', '.join(towers) or 'none'}), which a "
                           f"resume needs; start from it with --pretrained-checkpoint {directory} instead")
    if not differences:
        return []
    return [f"{flag} {directory} holds a model of another shape than the flags give: {'; '.join(differences)}. Give "
            "the checkpoint's values (its puffin_meta.json holds them), or another checkpoint"]


def _checkpoint_sources(args: PuffinArguments) -> List[Tuple[str, str, bool]]:
    """(flag, checkpoint directory, needs every tower) of each checkpoint this run loads weights from; paths that do
    not resolve to an undamaged checkpoint are left out (the checkpoint decisions report them)."""
    from megatron_puffin.training import checkpointing as ckpt
    from megatron_puffin.training.checkpoint_safety import CheckpointError
    from megatron_puffin.training.resume import resolve_load

    sources = []
    ckpt_args = args.checkpoint
    try:
        resumed = resolve_load(args)
        if resumed is not None:
            sources.append(("--load", resumed, True))
    except CheckpointError:
        pass
    for flag, path in (("--pretrained-checkpoint", ckpt_args.pretrained_checkpoint),
                       ("--llm-checkpoint", ckpt_args.llm_checkpoint),
                       ("--vision-checkpoint", ckpt_args.vision_checkpoint),
                       ("--dit-checkpoint", ckpt_args.dit_checkpoint)):
        if not path or not Path(path).is_dir():
            continue
        try:
            directory = ckpt.resolve_checkpoint(path)
        except CheckpointError:
            continue
        if directory is not None and not ckpt.checkpoint_problems(directory):
            sources.append((flag, directory, False))
    return sources


def _checkpoint_metadata(args: PuffinArguments) -> List[Tuple[str, str, bool, Dict[str, Any]]]:
    """:func:`_checkpoint_sources` with each checkpoint's ``puffin_meta.json`` (JSON; nothing is unpickled); ones
    whose sidecar cannot be read are left out (the checkpoint decisions report them)."""
    from megatron_puffin.training import checkpointing as ckpt
    from megatron_puffin.training.checkpoint_safety import CheckpointError

    found = []
    for flag, directory, need_all_towers in _checkpoint_sources(args):
        try:
            found.append((flag, directory, need_all_towers, ckpt.read_metadata(directory) or {}))
        except CheckpointError:
            continue
    return found


TOWER_CHECKPOINT_KINDS = {"--llm-checkpoint": "llm", "--vision-checkpoint": "vision", "--dit-checkpoint": "dit"}
"""Tower flag -> the ``kind`` tools/convert_checkpoint.py records in the checkpoints it writes for it."""


def _kind_problem(args: PuffinArguments, flag: str, directory: str, meta: Dict[str, Any]) -> Optional[str]:
    """Whether a checkpoint is of the kind its flag loads (its ``puffin_meta.json`` ``kind``): a converted tower for
    its own tower flag, a whole model (``puffin``) for --load / --pretrained-checkpoint."""
    kind = meta.get("kind")
    expected = TOWER_CHECKPOINT_KINDS.get(flag, "puffin")
    if kind is None or kind == expected:
        return None
    given = getattr(args.checkpoint, flag[2:].replace("-", "_"), None) if flag in TOWER_CHECKPOINT_KINDS else None
    if given and os.path.realpath(directory) != os.path.realpath(given):
        return None  # a run directory given for a tower: check_input_checkpoints names it (no metadata.json there)
    if kind == "puffin":
        return (f"{flag} ({directory}) is a whole Puffin checkpoint, not a converted {expected} tower; start from it "
                f"with --pretrained-checkpoint {directory}")
    if kind in TOWER_CHECKPOINT_KINDS.values():
        return (f"{flag} ({directory}) holds the {kind} tower alone (tools/convert_checkpoint.py); give it as "
                f"--{kind}-checkpoint {directory}")
    return (f"{flag} ({directory}) holds a checkpoint of kind {kind!r}, which this version does not know; give a "
            "pretrain_puffin.py checkpoint or one tools/convert_checkpoint.py wrote")


def check_checkpoint_shapes(args: PuffinArguments) -> List[str]:
    """Every checkpoint the run loads (--load, --pretrained-checkpoint, the tower checkpoints) is of the kind its flag
    loads (:func:`_kind_problem`: a converted LLM given as --dit-checkpoint was loaded into nothing when
    --pretrained-checkpoint supplied the DiT, else failed on its tensors after the process groups started) and holds
    towers of the shape the flags give, compared through its ``puffin_meta.json``, before any process group exists;
    the tensors themselves are compared again when they load."""
    if args.dry_run:
        return []
    problems: List[str] = []
    for flag, directory, need_all_towers, meta in _checkpoint_metadata(args):
        kind_problem = _kind_problem(args, flag, directory, meta)
        problems += [kind_problem] if kind_problem else checkpoint_shape_problems(args, flag, directory, meta,
                                                                                  need_all_towers)
    return problems


PATH_VALIDATORS = [check_output_paths, check_input_checkpoints, check_vae_files, check_stream_datasets,
                   check_tokenizer, check_checkpoint_shapes]
