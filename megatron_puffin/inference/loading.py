"""Build a Puffin for inference from one of our checkpoints (training, stage hand-off or converted release).

The model shape comes from the checkpoint's ``puffin_meta.json`` (the resolved ``pretrain_puffin.py`` flags it was
trained with); ``pretrain_puffin.py`` flags (or ``@flagfiles``) given here override them, e.g. a model-shape flag
file for a checkpoint without a sidecar, another ``--tokenizer`` path or ``--vae-path``. The weights are loaded
through megatron-core's distributed checkpointing, so a checkpoint saved at any TP/PP layout loads at the
inference layout: tensor parallel size ``tensor_model_parallel_size`` (the world size), pipeline size 1.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_puffin.models.puffin import CHECKPOINT_MODULES

if TYPE_CHECKING:  # for annotations only
    from megatron_puffin.config import PuffinArguments
    from megatron_puffin.data import DataConfig

logger = logging.getLogger(__name__)


NOT_INHERITED = ("parallel",)
"""Flag groups not taken from the checkpoint: the inference layout is chosen here, not by the training run."""


class InferenceSetupError(ValueError):
    """The checkpoint or the flags cannot give a model; the one-line message says what to fix."""


@dataclass
class LoadedPuffin:
    """A Puffin ready for inference.

    Attributes:
        model: the whole model (one pipeline stage), in eval mode, no parameter requiring grad.
        tokenizer: the checkpoint's tokenizer.
        config: the model configuration it was built from.
        encoder_config: prompt assembly settings (image size, patch/fold, query count, text limits) as in training.
        args: the resolved flags (checkpoint sidecar + overrides).
        checkpoint: the checkpoint directory loaded.
        metadata: its ``puffin_meta.json`` (empty when it has none).
        towers: towers whose weights came from the checkpoint (the others keep their seeded initialisation).
    """

    model: Any
    tokenizer: Any
    config: Any
    encoder_config: Any
    args: Any
    checkpoint: str
    metadata: Dict[str, Any]
    towers: Sequence[str]

    @property
    def device(self) -> torch.device:
        return self.model.device


def resolve_inference_checkpoint(path: str) -> str:
    """A complete checkpoint directory from a checkpoint or run directory, else :class:`InferenceSetupError`."""
    from megatron_puffin.checkpointing import resolve_checkpoint

    if not os.path.exists(path):
        raise InferenceSetupError(f"--checkpoint {path}: no such file or directory; give a checkpoint directory "
                                  "(iter_*) or a run directory (--save of a training run)")
    directory = resolve_checkpoint(path)
    if directory is None:
        raise InferenceSetupError(f"--checkpoint {path}: no complete checkpoint there (an iter_* directory with "
                                  "puffin_meta.json, or a run directory holding one); convert a released .pth with "
                                  "tools/convert_checkpoint.py puffin-to-mcore")
    return directory


def _stored_defaults(parser, metadata: Dict[str, Any]) -> None:
    """Make the checkpoint's resolved flags the parser's defaults (repeatable flags are left alone)."""
    from megatron_puffin.config.arguments import CONFIG_GROUPS

    stored = metadata.get("args") or {}
    defaults = {}
    for name, cls, _ in CONFIG_GROUPS:
        if name in NOT_INHERITED:
            continue
        for field in dataclasses.fields(cls):
            if field.name in stored.get(name, {}) and not isinstance(stored[name][field.name], list):
                defaults[f"{cls.__name__}.{field.name}"] = stored[name][field.name]
    parser.set_defaults(**defaults)


def stored_path(path: Optional[str], metadata: Dict[str, Any]) -> Optional[str]:
    """A path among a checkpoint's stored flags (the tokenizer, the VAE files), found from any directory: a relative
    one that does not exist here is taken relative to the directory the training run ran in (``run_directory`` of
    ``puffin_meta.json``), when it exists there. Checkpoints written before that record keep the path as stored."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    run_directory = metadata.get("run_directory")
    if isinstance(run_directory, str) and os.path.exists(os.path.join(run_directory, path)):
        return os.path.join(run_directory, path)
    return path


def resolve_flags(metadata: Dict[str, Any], flags: Sequence[str] = ()):
    """``pretrain_puffin.py`` arguments: the checkpoint's stored flags overridden by ``flags`` (unvalidated), with
    relative tokenizer and VAE paths found through :func:`stored_path`."""
    from megatron_puffin.config import CONFIG_GROUPS, PuffinArguments, build_parser
    from megatron_puffin.config.dataclass_args import build_dataclass

    parser = build_parser()
    _stored_defaults(parser, metadata)
    namespace, unknown = parser.parse_known_args(list(flags))
    invalid = []
    groups = {name: build_dataclass(cls, namespace, invalid) for name, cls, _ in CONFIG_GROUPS}
    problems = [f"unknown flag or argument {item!r}" for item in unknown]
    problems += [f"{bad.flag} {bad.text!r} is not a valid {bad.expected}" for bad in invalid]
    if problems:
        raise InferenceSetupError("; ".join(problems) + " (model flags are pretrain_puffin.py flags)")
    args = PuffinArguments(**groups)
    args.parallel.pipeline_model_parallel_size = 1
    args.data.tokenizer = stored_path(args.data.tokenizer, metadata)
    args.model.vae_path = stored_path(args.model.vae_path, metadata)
    args.model.vae_config = stored_path(args.model.vae_config, metadata)
    return args


def check_inference_layout(args: PuffinArguments) -> None:
    """The tower shapes against the inference tensor-parallel size (the training validators' rules)."""
    from megatron_puffin.config.validate import check_llm_parallel, check_positive, check_towers

    problems = check_positive(args) + check_llm_parallel(args) + check_towers(args)
    if problems:
        raise InferenceSetupError("; ".join(problems))


def _model_config(args: PuffinArguments, dtype: Optional[torch.dtype], need_vae: bool):
    from megatron_puffin.distributed import cuda_available
    from megatron_puffin.config.model import puffin_config

    config = puffin_config(args)
    if dtype is None:
        dtype = config.params_dtype if cuda_available() else torch.float32  # CPU: fp32
    model = config.model
    if not need_vae:
        model = dataclasses.replace(model, vae_path=None, vae_config=None)
    for flag, path in (("--vae-path", model.vae_path), ("--vae-config", model.vae_config)):
        if path and not os.path.exists(path):
            raise InferenceSetupError(f"{flag} {path}: not found here or in the directory training ran in; give "
                                      f"{flag} with its path")
    # A training run's --sequence-parallel does not apply: decoding feeds one token per step.
    return dataclasses.replace(config, params_dtype=dtype, fp8=None, model=model, sequence_parallel=False)


def _encoder_config(args: PuffinArguments):
    from megatron_puffin.data.task_encoders import TaskEncoderConfig

    data = args.data
    return TaskEncoderConfig(
        seed=args.training.seed, image_max_size=data.image_size, image_unit=data.image_size_unit,
        vision_patch_size=args.vision.patch_size, vision_fold=args.vision.fold_size,
        num_query_tokens=args.connector.num_queries,
        max_understanding_text_tokens=data.max_understanding_text_tokens,
        max_generation_text_tokens=data.max_generation_text_tokens, cfg_dropout_prob=0.0, mixed_motion_prob=0.0,
    )


def _open_tokenizer(data: DataConfig, vocab_size: int):
    from megatron_puffin.data import PuffinTokenizer
    from megatron_puffin.data.tokenizer import TokenizerError

    path = data.tokenizer
    if not path:
        raise InferenceSetupError("no tokenizer: the checkpoint stores none; give --tokenizer PATH")
    if not os.path.exists(path):
        raise InferenceSetupError(f"--tokenizer {path}: not found here or in the directory training ran in; give "
                                  "--tokenizer with the training tokenizer's path")
    try:
        tokenizer = PuffinTokenizer(path)
    except TokenizerError as error:
        raise InferenceSetupError(f"--tokenizer {path}: {error}") from None
    if tokenizer.vocab_size > vocab_size:
        raise InferenceSetupError(f"--tokenizer {path} has {tokenizer.vocab_size} tokens, more than the model's "
                                  f"--vocab-size {vocab_size}; give the tokenizer the checkpoint was trained with")
    return tokenizer


def _load_towers(model, directory: str, towers: Sequence[str]) -> None:
    """Loads each tower the checkpoint holds through training's loader (:func:`checkpointing.load_module`: any TP
    layout, either ``--transformer-impl``, Transformer Engine's ``_extra_state`` created or ignored), with the
    mismatches as one :class:`InferenceSetupError` line."""
    from megatron_puffin.checkpointing import CheckpointMismatch, load_module
    from megatron_puffin.models.extra_state import StateDictMismatch

    for tower in towers:
        module = getattr(model, CHECKPOINT_MODULES[tower], None)
        if module is None:
            continue
        try:
            load_module(module, directory, prefix=CHECKPOINT_MODULES[tower] + ".", what="--checkpoint")
        except CheckpointMismatch as error:
            raise InferenceSetupError(
                f"--checkpoint {directory} does not fit the model shape ({len(error.problems)} tensor(s) differ, "
                f"e.g. {error.problems[0] if error.problems else error}); give the model flags it was trained with "
                "(its puffin_meta.json holds them)") from None
        except StateDictMismatch as error:
            raise InferenceSetupError(" ".join(str(error).split())) from None


def _build_out_of_memory(error: BaseException, directory: str, flags: Sequence[str]) -> BaseException:
    """The error to raise for a model build that failed: one line when it ran out of memory (a model flag of
    another size was the allocator's traceback from inside megatron-core's first layer), else ``error`` itself."""
    from megatron_puffin.memory import available_bytes, is_out_of_memory

    if not is_out_of_memory(error):
        return error
    _, where = available_bytes()
    given = f"; the model flags given here ({' '.join(flags)}) replace its stored ones" if flags else ""
    return InferenceSetupError(f"the model of checkpoint {directory} does not fit this process's memory "
                               f"({where}){given}; use more processes (--tensor-model-parallel-size) or a machine "
                               f"with more memory ({' '.join(str(error).split())[:160]})")


def load_puffin(checkpoint: str, flags: Sequence[str] = (), tensor_model_parallel_size: Optional[int] = None,
                dtype: Optional[torch.dtype] = None, need_vae: bool = True) -> LoadedPuffin:
    """Start the process group (if needed) and build + load a Puffin for inference.

    Collective: every rank of the world calls it. The world size must be a multiple of
    ``tensor_model_parallel_size``; extra ranks are data-parallel replicas holding the same model (the tools deal
    their batches to them: :class:`megatron_puffin.inference.cli.ReplicaRounds`).

    Args:
        checkpoint: a checkpoint directory (``iter_*``) or a run directory (its latest complete checkpoint).
        flags: ``pretrain_puffin.py`` flags / ``@flagfiles`` overriding the checkpoint's stored ones.
        tensor_model_parallel_size: inference TP size (any size the tower shapes divide; the checkpoint reshards);
            default ``--tensor-model-parallel-size`` among ``flags`` (not the training run's), else 1.
        dtype: parameter dtype; default the checkpoint's precision on a GPU, float32 on a CPU.
        need_vae: build the frozen VAE (generation); understanding does not need it.

    Raises:
        InferenceSetupError: missing checkpoint, unusable flags or tokenizer, or a checkpoint of another shape.
    """
    import megatron_puffin.distributed as mpd
    from megatron_puffin.models.puffin import build_puffin
    from megatron_puffin.data.tokenizer import identity_difference
    from megatron_puffin.checkpointing import read_metadata

    directory = resolve_inference_checkpoint(checkpoint)
    metadata = read_metadata(directory) or {}
    kind = metadata.get("kind", "puffin")
    if kind != "puffin":  # a converted tower (tools/convert_checkpoint.py *-to-mcore): no flags, no other towers
        raise InferenceSetupError(
            f"checkpoint {directory} holds the {kind} tower alone (tools/convert_checkpoint.py), not a Puffin model: "
            f"train from it (pretrain_puffin.py --{kind}-checkpoint {directory}), or give a pretrain_puffin.py "
            "checkpoint or puffin-to-mcore's output")
    args = resolve_flags(metadata, flags)
    if tensor_model_parallel_size is not None:
        args.parallel.tensor_model_parallel_size = tensor_model_parallel_size
    tensor_model_parallel_size = args.parallel.tensor_model_parallel_size
    check_inference_layout(args)
    tokenizer = _open_tokenizer(args.data, args.llm.vocab_size)
    difference = identity_difference(metadata.get("tokenizer"), tokenizer.identity())
    if difference:  # e.g. a --tokenizer override, or the stored path now holding another file
        raise InferenceSetupError(f"checkpoint {directory}: {difference}; give --tokenizer with the training "
                                  "tokenizer's path")
    args.model.image_pad_token_id = tokenizer.image_pad_id
    config = _model_config(args, dtype, need_vae)  # names a VAE file found neither here nor where training ran
    if need_vae:  # the VAE is not in the checkpoint: its files come from the stored flags or --vae-path here
        from megatron_puffin.config.validate_paths import check_vae_files

        problems = check_vae_files(args)
        if problems:
            raise InferenceSetupError("; ".join(problems))
    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % tensor_model_parallel_size:
        raise InferenceSetupError(f"--tensor-model-parallel-size ({tensor_model_parallel_size}) must divide the number "
                                  f"of processes ({world_size}); launch a multiple of it")
    ctx = mpd.initialize(tensor_model_parallel_size, 1, seed=args.training.seed)
    try:
        model = build_puffin(config, pg_collection=mpd.process_groups())
        if ctx.device.type == "cuda":
            model.cuda(ctx.device)
    except (RuntimeError, MemoryError) as error:
        raise _build_out_of_memory(error, directory, flags) from None
    towers = [tower for tower in metadata.get("towers", list(CHECKPOINT_MODULES)) if tower in CHECKPOINT_MODULES]
    _load_towers(model, directory, towers)
    model.eval()
    model.requires_grad_(False)
    logger.info("loaded %s (towers %s) at TP=%d, %s", directory, ", ".join(towers), tensor_model_parallel_size,
                config.params_dtype)
    return LoadedPuffin(model=model, tokenizer=tokenizer, config=config, encoder_config=_encoder_config(args),
                        args=args, checkpoint=directory, metadata=metadata, towers=towers)
