"""Convert published weights to and from megatron-core distributed checkpoints.

Every ``*-to-mcore`` command writes a new checkpoint directory (published atomically, with a ``puffin_meta.json``)
that loads at any TP/PP layout. Commands that take ``--tensor-model-parallel-size`` (and ``hf-to-mcore``'s
``--pipeline-model-parallel-size``) run with that many processes under torchrun; the others run as one process.

**LLM** (for ``--llm-checkpoint``): a Hugging Face Qwen2 directory <-> the LLM tower alone (kind ``llm``)::

    torchrun --nproc-per-node 2 tools/convert_checkpoint.py hf-to-mcore --hf-dir Qwen2.5-1.5B-Instruct \\
        --output ckpt/qwen_tp2 --tensor-model-parallel-size 2
    python tools/convert_checkpoint.py mcore-to-hf --input ckpt/qwen_tp2 --output qwen_hf

``mcore-to-hf`` also exports the LLM of a training checkpoint of any stage and TP/PP (``--input run/iter_0001000``,
or a run directory for its latest) and of ``puffin-to-mcore`` output, with the run's tokenizer and Puffin's
generation config; ``mcore-to-towers`` writes the vision tower and the query path in our reloadable format
(docs/export.md).

**Whole model** -> the released ``Puffin-*.pth`` layout (the inverse of ``puffin-to-mcore``; docs/export.md)::

    python tools/convert_checkpoint.py mcore-to-puffin --input run/stage4_instruction --output Puffin-Mine.pth

**MMDiT** (for ``--dit-checkpoint``): a diffusers SD3 ``transformer/`` folder <-> the DiT tower alone (kind ``dit``)::

    torchrun --nproc-per-node 2 tools/convert_checkpoint.py sd3-to-mcore \\
        --transformer-dir stable-diffusion-3-medium-diffusers/transformer --output ckpt/sd3_mmdit \\
        --tensor-model-parallel-size 2
    python tools/convert_checkpoint.py mcore-to-sd3 --input ckpt/sd3_mmdit --output sd3_transformer

``mcore-to-sd3`` also exports the MMDiT of a training or ``puffin-to-mcore`` checkpoint (``--input
run/iter_0001000``, or a run directory for its latest): weights only, since a stock diffusers pipeline cannot feed
Puffin's condition latents. It writes the dtype the diffusers weights had (float32 for
other checkpoints; ``--dtype`` to choose) and the original ``config.json``.

**Vision** (for ``--vision-checkpoint``): a RADIO checkpoint -> the vision tower alone (kind ``vision``)::

    python tools/convert_checkpoint.py radio-to-mcore --radio-checkpoint C-RADIOv3-H/model.safetensors \\
        --output ckpt/c-radiov3-h -- @examples/stages/stage1_alignment.args

The file is a safetensors file, a torch ``.pth``/``.pth.tar`` (``state_dict`` / ``model`` / ``module`` wrappers
are unpacked) or a directory of safetensors, under RADIO's names (bare, ``radio_model.`` or ``--prefix``). The
tower's shape comes from ``pretrain_puffin.py`` flags after the command's own (``@flagfile`` arguments too; ``--``
optional; defaults: the C-RADIOv3-H encoder and a 1536-wide LLM); shape flags that disagree with the file are
listed with the values the file needs. A RADIO checkpoint has no projector, but ``--vision-checkpoint`` loads the
whole tower (encoder and projector, strictly), so the checkpoint carries a freshly initialised projector
(megatron-core's init, seed ``--seed``), as training would start it; ``puffin_meta.json`` says so.

**Released Puffin** (for ``--pretrained-checkpoint``): ``Puffin-{Align,Base,Thinking,Instruct}.pth`` -> the whole
``PuffinModel`` (kind ``puffin``, one process, the model built at TP=PP=1 from the run's flags)::

    python tools/convert_checkpoint.py puffin-to-mcore --puffin-checkpoint Puffin-Base.pth \\
        --output ckpt/puffin_base -- @examples/stages/stage2_sft.args

``puffin_meta.json`` lists the towers the file supplied (``llm``, ``vision``, ``queries``, ``dit``; the reference's
``projector`` is part of our ``vision``, its ``vae.`` tensors are ignored: the VAE comes from ``--vae-path``), and
``--pretrained-checkpoint`` loads exactly those; the other towers come from ``--llm-checkpoint`` /
``--vision-checkpoint`` / ``--dit-checkpoint`` or random initialisation, as for any stage hand-off. A file with
the vision projector but no RADIO encoder (stage 1 saved only what trained) needs ``--vision-checkpoint DIR`` among
the flags: the encoder is taken from there so that the listed ``vision`` tower is complete. A file with the
encoder but no projector gets a freshly initialised projector (reported).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import warnings
from glob import glob
from typing import Dict, List, Optional, Sequence, Tuple

warnings.filterwarnings("ignore", category=UserWarning)
# deprecation notices of torch.distributed.checkpoint / megatron-core about their own internals ("we are deprecating
# ShardedTensor", "`load_state_dict` is deprecated"), printed on every load of a megatron-core checkpoint
warnings.filterwarnings("ignore", category=FutureWarning)

from megatron_puffin.process_lifetime import exit_quietly_while_starting  # noqa: E402

exit_quietly_while_starting(__name__, "convert_checkpoint.py")  # Ctrl-C while the libraries below load: one line

import torch  # noqa: E402
from safetensors import SafetensorError  # noqa: E402

import megatron_puffin.distributed as mpd  # noqa: E402
from megatron_puffin.convert.common import ConversionError  # noqa: E402
from megatron_puffin.convert.hf_io import HFDirectoryError, load_hf_directory  # noqa: E402
from megatron_puffin.convert.qwen2 import hf_to_mcore, load_llm_state_dict  # noqa: E402
from megatron_puffin.models.llm import LLMConfig, build_llm  # noqa: E402
from megatron_puffin.checkpoint_safety import CheckpointError, weights_only_failure  # noqa: E402
from megatron_puffin.models.extra_state import is_extra_state_key  # noqa: E402
from megatron_puffin.platform import setup  # noqa: E402
from megatron_puffin.checkpointing import (  # noqa: E402
    CheckpointWriteError,
    load_module,
    read_metadata,
    save_checkpoint,
    write_failure,
)
from megatron_puffin.models.puffin import CHECKPOINT_MODULES  # noqa: E402
from megatron_puffin.training.towers import CHECKPOINT_TOWERS, TOWERS  # noqa: E402
from megatron_puffin.files import folder_problem  # noqa: E402

logger = logging.getLogger("convert_checkpoint")

# Reference tower (megatron_puffin.convert.puffin.tower_of) -> our tower as --pretrained-checkpoint names it.
PUFFIN_TOWERS = {spec.name: spec.checkpoint for spec in TOWERS if spec.checkpoint}
TOWER_ORDER = CHECKPOINT_TOWERS
TOWER_PREFIXES = {tower: module + "." for tower, module in CHECKPOINT_MODULES.items()}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(SystemExit):
    """A mistake in the command line or the inputs; the message says what to do."""


# --- helpers ------------------------------------------------------------------------------------------------------
def _layout(ctx) -> Dict[str, int]:
    return {"tp": ctx.tensor_model_parallel_size, "pp": ctx.pipeline_model_parallel_size}


def _save_converted(model, ctx, output: str, metadata: Dict, message: str, *message_args) -> None:
    """Writes ``model``'s distributed checkpoint to ``output`` with ``metadata`` plus the layout it is saved at
    (``saved_layout``); rank 0 logs ``message % (output, *message_args)``. Every ``*-to-mcore`` command ends here."""
    save_checkpoint(model.sharded_state_dict(), output, metadata={**metadata, "saved_layout": _layout(ctx)})
    if ctx.rank == 0:
        logger.info(message, output, *message_args)


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(torch.is_tensor(v) for v in value.values())


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """One safetensors file's tensors; a file that is not one (garbled, truncated) is a usage error naming it, not
    a write failure of --output."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as error:
        raise UsageError(f"{path} is not a readable safetensors file ({error}); download or copy it again") from None


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a safetensors file, a directory of safetensors, or a torch checkpoint (a plain state dict or one
    under ``state_dict`` / ``model`` / ``module``)."""
    if os.path.isdir(path):
        files = sorted(glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise UsageError(f"{path} is a directory without *.safetensors files")
        state: Dict[str, torch.Tensor] = {}
        for name in files:
            state.update(_read_safetensors(name))
        return state
    if not os.path.exists(path):
        raise UsageError(f"no such file: {path}")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": a plain pickle is refused below anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
                loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - random bytes, truncated archives, objects other than tensors
        raise UsageError(
            f"{path} is not a torch checkpoint of plain tensors ({weights_only_failure(error)}); this tool loads only "
            "tensors and plain containers, never code from a file: save the tensors with safetensors where the file "
            "was made"
        ) from None
    if _is_state_dict(loaded):
        return loaded
    if isinstance(loaded, dict):
        for key in ("state_dict", "model", "module"):
            if _is_state_dict(loaded.get(key)):
                return loaded[key]
    raise UsageError(f"{path} holds no state dict (a dict of tensors, or one under 'state_dict', 'model' or 'module')")


def pretrain_flags(extra: Sequence[str], command: str):
    """``pretrain_puffin.py`` flags (unvalidated: paths need not exist) from the arguments after the command's own."""
    from megatron_puffin.config import parse_args

    extra = list(extra)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    flags = parse_args(extra, validate=False)
    problems = [f"unknown flag or argument {item!r}" for item in flags.unknown]
    problems += [f"{bad.flag} {bad.text!r} is not a valid {bad.expected}" for bad in flags.invalid]
    if problems:
        raise UsageError(f"{command}: " + "; ".join(problems)
                         + " (pretrain_puffin.py flags go after the command's own)")
    return flags


def _seed(flags) -> int:
    return flags.training.seed


@contextlib.contextmanager
def _one_line_errors(directory: str, mismatch: Tuple[type, ...] = (ConversionError,)):
    """A Hugging Face / diffusers folder that is not what the command converts, as one line naming it: weights that
    do not fit its ``config.json`` (``mismatch``: a mixed folder, another model), another model family or options
    the tower does not implement (ValueError), a ``config.json`` lacking a key."""
    try:
        yield
    except mismatch as error:
        reason = str(error).strip().splitlines()[0]
        raise HFDirectoryError(f"{directory}: its weights do not fit its config.json: {reason}") from None
    except ValueError as error:
        raise HFDirectoryError(f"{directory}: {error}") from None
    except KeyError as error:
        raise HFDirectoryError(f"{directory}: config.json lacks {error}") from None


# --- LLM ------------------------------------------------------------------------------------------------------------
def hf_to_mcore_command(args: argparse.Namespace) -> None:
    hf_config, hf_state = load_hf_directory(args.hf_dir)
    with _one_line_errors(args.hf_dir):
        config = LLMConfig.from_hf(hf_config)
    ctx = mpd.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, seed=0)
    model = build_llm(config, pre_process=ctx.is_first_pipeline_stage, post_process=ctx.is_last_pipeline_stage,
                      pg_collection=mpd.process_groups())
    with _one_line_errors(args.hf_dir, mismatch=(ConversionError, RuntimeError)):  # RuntimeError: torch's sizes
        load_llm_state_dict(model, hf_to_mcore(hf_state, config), config)
    metadata = {
        "kind": "llm",
        "source": args.hf_dir,
        "hf_config": hf_config,
        "llm_config": dataclasses.asdict(config),
    }
    _save_converted(model, ctx, args.output, metadata, "wrote %s (TP=%d, PP=%d)", ctx.tensor_model_parallel_size,
                    ctx.pipeline_model_parallel_size)


def mcore_to_hf_command(args: argparse.Namespace) -> None:
    from megatron_puffin.convert.export import ExportError, export_llm_to_hf, resolve_source, staged_directory

    try:
        source = resolve_source(args.input)
        mpd.initialize(seed=0)
        with staged_directory(args.output) as staging:
            summary = export_llm_to_hf(source, staging, tokenizer=args.tokenizer, dtype=args.dtype)
    except ExportError as error:
        raise UsageError(f"mcore-to-hf: {error}") from None
    logger.info("wrote %s from %s (LLM, %s; tokenizer: %s)", args.output, source.directory, summary["dtype"],
                ", ".join(summary["tokenizer"]) or "none found (give --tokenizer)")


def mcore_to_towers_command(args: argparse.Namespace) -> None:
    from megatron_puffin.convert.export import ExportError, export_towers, resolve_source, staged_directory

    try:
        source = resolve_source(args.input)
        mpd.initialize(seed=0)
        with staged_directory(args.output) as staging:
            towers = export_towers(source, staging, args.towers.split(",") if args.towers else None)
    except ExportError as error:
        raise UsageError(f"mcore-to-towers: {error}") from None
    logger.info("wrote %s from %s (%s; reload with megatron_puffin.convert.export.load_exported_towers)",
                args.output, source.directory, ", ".join(towers))


def mcore_to_puffin_command(args: argparse.Namespace) -> None:
    from megatron_puffin.convert.export import ExportError, export_puffin, resolve_source

    try:
        source = resolve_source(args.input)
        mpd.initialize(seed=0)
        towers = export_puffin(source, args.output, args.dtype)
    except (ExportError, ConversionError) as error:
        raise UsageError(f"mcore-to-puffin: {error}") from None
    logger.info("wrote %s from %s (%s; the released Puffin-*.pth layout, loadable with torch.load(..., "
                "weights_only=True))", args.output, source.directory, ", ".join(towers))


# --- MMDiT ----------------------------------------------------------------------------------------------------------
def sd3_to_mcore_command(args: argparse.Namespace) -> None:
    from megatron_puffin.convert.sd3 import diffusers_to_mcore, load_dit_state_dict, shard_dit_state_dict
    from megatron_puffin.models.dit import DiTConfig, build_dit

    diffusers_config, diffusers_state = load_hf_directory(args.transformer_dir)
    with _one_line_errors(args.transformer_dir):
        config = DiTConfig.from_diffusers(diffusers_config)
        state = diffusers_to_mcore(diffusers_state, config)
    source_dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values() if t.is_floating_point()})
    ctx = mpd.initialize(args.tensor_model_parallel_size, 1, seed=0)
    model = build_dit(config, pg_collection=mpd.process_groups())
    shard = shard_dit_state_dict(state, config, ctx.tensor_model_parallel_size)[ctx.tp_rank]
    load_dit_state_dict(model, shard)
    metadata = {
        "kind": "dit",
        "source": args.transformer_dir,
        "dit_config": dataclasses.asdict(config),
        "diffusers_config": diffusers_config,
        "source_dtype": source_dtypes[0] if len(source_dtypes) == 1 else None,
    }
    _save_converted(model, ctx, args.output, metadata, "wrote %s (MMDiT, %d layers, TP=%d)", config.num_layers,
                    ctx.tensor_model_parallel_size)


def mcore_to_sd3_command(args: argparse.Namespace) -> None:
    import json

    from megatron_puffin.convert.export import staged_directory
    from megatron_puffin.convert.sd3 import save_diffusers_transformer
    from megatron_puffin.models.dit import DiTConfig, build_dit
    from megatron_puffin.checkpointing import resolve_checkpoint

    directory = resolve_checkpoint(args.input) or args.input
    metadata = read_metadata(directory) or {}
    if metadata.get("kind") == "dit" and "dit_config" in metadata:
        config, prefix = DiTConfig(**metadata["dit_config"]), ""
    elif "dit" in (metadata.get("args") or {}) and "dit" in metadata.get("towers", ["dit"]):
        config, prefix = DiTConfig(**metadata["args"]["dit"]), "dit."  # a training or puffin-to-mcore checkpoint
    else:
        raise UsageError(f"{args.input}: no puffin_meta.json describing an MMDiT (written by sd3-to-mcore, "
                         "puffin-to-mcore or training)")
    dtype_name = args.dtype if args.dtype != "source" else (metadata.get("source_dtype") or "float32")
    mpd.initialize(seed=0)
    model = build_dit(config, pg_collection=mpd.process_groups())
    load_module(model, directory, prefix=prefix, what="--input")
    state = {k: v.to(DTYPES[dtype_name]) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    with staged_directory(args.output) as staging:
        save_diffusers_transformer(staging, state, config)
        if metadata.get("diffusers_config"):  # keep the original file (diffusers bookkeeping keys included)
            with open(os.path.join(staging, "config.json"), "w") as handle:
                json.dump(metadata["diffusers_config"], handle, indent=2)
    logger.info("wrote %s (%s)", args.output, dtype_name)


# --- vision ---------------------------------------------------------------------------------------------------------
def radio_to_mcore_command(args: argparse.Namespace, extra: Sequence[str]) -> None:
    from megatron_puffin.convert.common import shard_by_table
    from megatron_puffin.convert.radio import encoder_tensor_table, radio_to_mcore, radio_vision_shape
    from megatron_puffin.models.vision import build_vision

    flags = pretrain_flags(extra, "radio-to-mcore")
    config, llm_hidden = flags.vision, flags.llm.hidden_size
    radio = read_state_dict(args.radio_checkpoint)
    prefix = args.prefix
    try:
        shape = radio_vision_shape(radio, prefix)
        wrong = {name: value for name, value in shape.items() if getattr(config, name) != value}
        if wrong:
            raise ConversionError(
                f"{args.radio_checkpoint} does not fit the vision flags; set "
                + ", ".join(f"--vision-{name.replace('_', '-')} {value} (now {getattr(config, name)})"
                            for name, value in wrong.items())
            )
        encoder = radio_to_mcore(radio, config, prefix=prefix)
    except ConversionError as error:
        raise UsageError(f"radio-to-mcore: {error}") from None
    tp = args.tensor_model_parallel_size or flags.parallel.tensor_model_parallel_size
    ctx = mpd.initialize(tp, 1, seed=_seed(flags))
    model = build_vision(config, llm_hidden, pg_collection=mpd.process_groups())
    # This rank's encoder shard from the file; the projector keeps its fresh initialisation.
    shard = shard_by_table(encoder, encoder_tensor_table(config), ctx.tensor_model_parallel_size,
                           "radio-to-mcore")[ctx.tp_rank]
    result = model.load_state_dict(shard, strict=False)
    fresh = [k for k in result.missing_keys if not is_extra_state_key(k)]
    if result.unexpected_keys or any(not k.startswith("projector.") for k in fresh):
        raise UsageError(f"radio-to-mcore: tensors not matching the tower: unexpected {result.unexpected_keys}, "
                         f"missing {[k for k in fresh if not k.startswith('projector.')]}")
    projector = f"random initialisation (seed {_seed(flags)}): a RADIO checkpoint has no projector"
    metadata = {
        "kind": "vision",
        "source": args.radio_checkpoint,
        "vision_config": dataclasses.asdict(config),
        "llm_hidden_size": llm_hidden,
        "projector": projector,
    }
    _save_converted(model, ctx, args.output, metadata, "wrote %s (RADIO encoder %d x %d, TP=%d); projector: %s",
                    config.num_layers, config.hidden_size, ctx.tensor_model_parallel_size, projector)


# --- released Puffin ----------------------------------------------------------------------------------------------
def _tower_list(supplied: Sequence[str]) -> List[str]:
    ours = {PUFFIN_TOWERS[name] for name in supplied if name in PUFFIN_TOWERS}
    return [tower for tower in TOWER_ORDER if tower in ours]


def puffin_to_mcore_command(args: argparse.Namespace, extra: Sequence[str]) -> None:
    from megatron_puffin.convert.puffin import load_puffin_state_dict, puffin_to_mcore, weights_only_config
    from megatron_puffin.config.model import puffin_config
    from megatron_puffin.models.puffin import build_puffin

    flags = pretrain_flags(extra, "puffin-to-mcore")
    config = weights_only_config(puffin_config(flags))
    reference = read_state_dict(args.puffin_checkpoint)
    try:
        ours, supplied = puffin_to_mcore(reference, config)
    except ConversionError as error:
        raise UsageError(f"puffin-to-mcore: {error}") from None
    towers = _tower_list(supplied)
    if not towers:
        raise UsageError(f"puffin-to-mcore: {args.puffin_checkpoint} supplies no tower ({', '.join(supplied)})")
    if "projector" in supplied and "vision" not in supplied and not flags.checkpoint.vision_checkpoint:
        raise UsageError(
            f"puffin-to-mcore: {args.puffin_checkpoint} holds the vision projector but not the RADIO encoder; give "
            "--vision-checkpoint DIR (radio-to-mcore output) among the flags to complete the vision tower "
            "(--pretrained-checkpoint loads whole towers, and a random encoder must not replace the base one)"
        )
    ctx = mpd.initialize(1, 1, seed=_seed(flags))
    if ctx.world_size != 1:
        raise UsageError("puffin-to-mcore runs as one process (the checkpoint loads at any layout)")
    # Seeded as training seeds its model (tensors the file lacks start as a TP=PP=1 fp32 run would start them).
    model = build_puffin(config, pg_collection=mpd.process_groups())
    completed: Dict[str, str] = {}
    base = flags.checkpoint.vision_checkpoint
    if ("vision" in supplied) != ("projector" in supplied) and base:  # half a vision tower: the rest from the base
        load_module(model.vision, base, prefix="", what="--vision-checkpoint")
        missing_part = "projector" if "vision" in supplied else "encoder"
        completed["vision"] = f"{missing_part} from --vision-checkpoint {base}"
    missing = load_puffin_state_dict(model, ours)
    fresh = sorted(k for k in missing if k.startswith(tuple(TOWER_PREFIXES[t] for t in towers))
                   and not k.endswith("pos_embed.pos_embed")  # the MMDiT's fixed sin-cos table, not a weight
                   and not ("vision" in completed and k.startswith("vision.")))
    if fresh:
        logger.warning("puffin-to-mcore: %d tensor(s) of the listed towers are not in the file and keep their "
                       "random initialisation (seed %d): %s", len(fresh), _seed(flags), ", ".join(fresh))
    ignored = [name for name in supplied if name not in PUFFIN_TOWERS]
    metadata = {
        "kind": "puffin",
        "iteration": 0,
        "towers": towers,
        "lineage": [{"stage": "imported", "source": args.puffin_checkpoint}],
        "args": flags.to_dict(),
        "imported": {"source": args.puffin_checkpoint, "reference_towers": list(supplied), "ignored": ignored,
                     "completed": completed, "random_initialisation": fresh},
    }
    _save_converted(model, ctx, args.output, metadata, "wrote %s: towers %s from %s%s%s", ", ".join(towers),
                    args.puffin_checkpoint, "".join(f"; {tower}: {what}" for tower, what in completed.items()),
                    f"; ignored {', '.join(ignored)}" if ignored else "")


# --- command line ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)

    to_mcore = command("hf-to-mcore", "HF Qwen2 directory -> distributed checkpoint of the LLM")
    to_mcore.add_argument("--hf-dir", required=True, help="HF directory with config.json and safetensors")
    to_mcore.add_argument("--output", required=True, help="new checkpoint directory (must not exist)")
    to_mcore.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP of the writing processes")
    to_mcore.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP of the writing processes")
    to_hf = command("mcore-to-hf", "LLM of a checkpoint (hf-to-mcore, training at any stage and TP/PP, "
                                   "puffin-to-mcore) -> HF Qwen2 directory with tokenizer and generation config")
    to_hf.add_argument("--input", required=True,
                       help="checkpoint directory (e.g. run/iter_0001000) or a training run directory (its latest)")
    to_hf.add_argument("--output", required=True, help="HF directory to write")
    to_hf.add_argument("--tokenizer", default=None,
                       help="tokenizer to copy in (default: the training run's --tokenizer, or the converted HF "
                            "directory's tokenizer files)")
    to_hf.add_argument("--dtype", choices=list(DTYPES), default=None,
                       help="dtype of the written weights (default: the dtype the checkpoint was trained in)")
    towers = command("mcore-to-towers", "vision tower and query path (meta queries, connectors, projections) of a "
                                        "checkpoint -> our reloadable format (docs/export.md)")
    towers.add_argument("--input", required=True, help="training, puffin-to-mcore or radio-to-mcore checkpoint "
                                                       "(or a training run directory for its latest)")
    towers.add_argument("--output", required=True, help="directory to write (puffin_towers.json + safetensors)")
    towers.add_argument("--towers", default=None,
                        help="comma-separated subset of vision,queries (default: those the checkpoint holds)")

    to_puffin = command("mcore-to-puffin", "every tower of a training or puffin-to-mcore checkpoint -> one file in "
                                          "the released Puffin-*.pth layout, for the reference's own code")
    to_puffin.add_argument("--input", required=True,
                           help="checkpoint directory (e.g. run/iter_0001000) or a training run directory (its latest)")
    to_puffin.add_argument("--output", required=True, help="file to write, e.g. Puffin-MyRun.pth (must not exist)")
    to_puffin.add_argument("--dtype", choices=list(DTYPES), default=None,
                           help="dtype of the written weights (default: the dtype the checkpoint was trained in)")

    sd3 = command("sd3-to-mcore", "diffusers SD3 transformer/ folder -> distributed checkpoint of the MMDiT")
    sd3.add_argument("--transformer-dir", required=True, help="diffusers folder: config.json + safetensors")
    sd3.add_argument("--output", required=True, help="new checkpoint directory (must not exist)")
    sd3.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP of the writing processes")
    to_sd3 = command("mcore-to-sd3", "distributed checkpoint (MMDiT, or a training checkpoint) -> diffusers folder "
                                     "(weights only: stock diffusers pipelines cannot feed Puffin's camera / "
                                     "initial-view condition latents or its connector context)")
    to_sd3.add_argument("--input", required=True,
                        help="checkpoint written by sd3-to-mcore, puffin-to-mcore or training (or a run directory)")
    to_sd3.add_argument("--output", required=True, help="diffusers transformer/ folder to write")
    to_sd3.add_argument("--dtype", choices=["source", *DTYPES], default="source",
                        help="dtype of the written weights (default: that of the converted diffusers weights, "
                             "float32 when unknown)")

    radio = command("radio-to-mcore", "RADIO checkpoint -> distributed checkpoint of the vision tower "
                                      "(encoder from the file, projector freshly initialised)")
    radio.add_argument("--radio-checkpoint", required=True,
                       help="safetensors file, torch .pth(.tar), or a directory of safetensors under RADIO's names")
    radio.add_argument("--output", required=True, help="new checkpoint directory (must not exist)")
    radio.add_argument("--tensor-model-parallel-size", type=int, default=None,
                       help="TP of the writing processes (default: that of the pretrain_puffin.py flags, else 1)")
    radio.add_argument("--prefix", default=None,
                       help="removed from every name (default: 'radio_model.' when every name has it, else none)")

    puffin = command("puffin-to-mcore", "released Puffin-*.pth -> distributed checkpoint of the whole model "
                                        "(for --pretrained-checkpoint)")
    puffin.add_argument("--puffin-checkpoint", required=True, help="Puffin-{Align,Base,Thinking,Instruct}.pth")
    puffin.add_argument("--output", required=True, help="new checkpoint directory (must not exist)")
    for sub in (radio, puffin):
        sub.epilog = ("Then the pretrain_puffin.py flags that give the model's shape (e.g. @examples/stages/"
                      "stage2_sft.args), optionally after '--'.")
    return parser


FLAG_COMMANDS = {"radio-to-mcore": radio_to_mcore_command, "puffin-to-mcore": puffin_to_mcore_command}
PLAIN_COMMANDS = {"hf-to-mcore": hf_to_mcore_command, "mcore-to-hf": mcore_to_hf_command,
                  "mcore-to-towers": mcore_to_towers_command, "mcore-to-puffin": mcore_to_puffin_command,
                  "sd3-to-mcore": sd3_to_mcore_command, "mcore-to-sd3": mcore_to_sd3_command}


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from megatron_puffin.optional_deps import log_backends_once

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # --help and usage errors first, without the start-up log lines
    if extra and args.command not in FLAG_COMMANDS:
        parser.error(f"{args.command}: unrecognized arguments: {' '.join(extra)}")
    log_backends_once(logger)
    setup()
    problem = input_problem(args)
    if problem:
        print(f"convert_checkpoint.py {args.command}: {problem}", file=sys.stderr)
        return 2
    try:
        if args.command in FLAG_COMMANDS:
            FLAG_COMMANDS[args.command](args, extra)
        else:
            PLAIN_COMMANDS[args.command](args)
    except (CheckpointError, HFDirectoryError) as error:
        print(f"convert_checkpoint.py {args.command}: {error}", file=sys.stderr)
        return 1
    except (OSError, SafetensorError, CheckpointWriteError) as error:  # a full disk or a lost mount while writing
        output = getattr(args, "output", None) or "."
        reason = error if isinstance(error, CheckpointWriteError) else \
            write_failure(error, os.path.dirname(os.path.abspath(output)))
        print(f"convert_checkpoint.py {args.command}: {reason}; --output {output} was not published (outputs appear "
              "whole or not at all): fix that and run the same command again", file=sys.stderr)
        return 1
    finally:
        mpd.destroy()
    return 0


def input_problem(args: argparse.Namespace) -> Optional[str]:
    """Mistakes found before any work: an existing --output, a parallel size the launch does not provide."""
    output = getattr(args, "output", None)
    if output and os.path.exists(output):
        kind = "file" if args.command == "mcore-to-puffin" else "directory"
        return f"--output {output} already exists; choose a new {kind} (nothing is overwritten)"
    problem = folder_problem(os.path.dirname(os.path.abspath(output))) if output else None
    if problem:
        return f"--output {output}: {problem}; choose a path under a folder this job can write"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tp = getattr(args, "tensor_model_parallel_size", None) or 1
    pp = getattr(args, "pipeline_model_parallel_size", None) or 1
    if tp < 1 or pp < 1:
        return "--tensor-model-parallel-size and --pipeline-model-parallel-size must be at least 1"
    if world_size % (tp * pp):
        return (f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} needs {tp * pp} processes "
                f"(or a multiple), this launch has {world_size}: run it as torchrun --nproc-per-node {tp * pp} "
                f"tools/convert_checkpoint.py {args.command} ...")
    return None


if __name__ == "__main__":
    from megatron_puffin.process_lifetime import exit_on_ctrl_c, exit_process

    exit_process(exit_on_ctrl_c("convert_checkpoint.py", main,
                            "no partial output is left (the staging folder is removed): run the same command again"))
