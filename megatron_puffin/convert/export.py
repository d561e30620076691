"""Export what was trained: the LLM to a Hugging Face Qwen2 directory, the vision tower and the query path to our
own reloadable format (``docs/export.md``).

Sources are checkpoints of this project: ``hf-to-mcore`` output (kind ``llm``), a training checkpoint of any stage
(``run/iter_0001000``, or the run directory for its latest complete checkpoint; kind ``puffin``) and
``puffin-to-mcore`` output. Distributed checkpoints reshard on load, so a checkpoint written at any TP/PP is read
here by one process at TP=PP=1.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from megatron_puffin.distributed import process_groups
from megatron_puffin.files import is_whole_number, read_json_object
from megatron_puffin.models.llm import LLMConfig, build_llm
from megatron_puffin.checkpointing import load_module, read_metadata, resolve_checkpoint
from megatron_puffin.models.puffin import CHECKPOINT_MODULES

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "tokenizer.model")
TOWERS_FORMAT = "megatron_puffin.towers"
TOWERS_VERSION = 1
TOWERS_FILE = "puffin_towers.json"
EXPORTABLE_TOWERS = ("vision", "queries")


class ExportError(ValueError):
    """A checkpoint or output that cannot be exported as asked; the message says what to do."""


@contextlib.contextmanager
def staged_directory(output: str) -> Iterator[str]:
    """A hidden sibling of ``output`` to write an export into; renamed to ``output`` when the block succeeds and
    removed when it fails, so a failed or interrupted export never leaves a partial ``output`` (which would also
    block the re-run: exports never overwrite). A SIGKILL leaves only the hidden ``.NAME.partial-PID`` folder."""
    final = os.path.abspath(output)
    staging = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.partial-{os.getpid()}")
    try:
        yield staging
        os.rename(staging, final)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)


@dataclasses.dataclass
class ExportSource:
    """A resolved checkpoint directory and what its ``puffin_meta.json`` says about it."""

    directory: str
    metadata: Dict[str, Any]

    @property
    def kind(self) -> str:
        return self.metadata.get("kind", "")

    @property
    def args(self) -> Dict[str, Dict[str, Any]]:
        return self.metadata.get("args") or {}

    def holds(self, tower: str) -> bool:
        """Whether the checkpoint carries ``tower`` (a whole-model checkpoint lists its towers)."""
        if self.kind == "puffin":
            return tower in self.metadata.get("towers", ()) and tower in CHECKPOINT_MODULES
        return self.kind == tower

    def prefix(self, tower: str) -> str:
        """Key prefix of ``tower`` in the checkpoint (single-tower checkpoints have none)."""
        return f"{CHECKPOINT_MODULES[tower]}." if self.kind == "puffin" else ""

    def params_dtype(self) -> torch.dtype:
        """The parameter dtype the checkpoint was trained in (fp32 for converted towers)."""
        precision = self.args.get("precision") or {}
        return torch.bfloat16 if precision.get("bf16") else torch.float16 if precision.get("fp16") else torch.float32


def resolve_source(path: str, what: str = "--input") -> ExportSource:
    """The checkpoint ``path`` names (itself, or a run directory's latest complete one) with its metadata."""
    directory = resolve_checkpoint(path)
    if directory is None:
        raise ExportError(f"{what} {path}: no complete checkpoint there (a checkpoint directory with "
                          "puffin_meta.json, e.g. run/iter_0001000, or a run directory holding one)")
    return ExportSource(directory, read_metadata(directory) or {})


# --- LLM -> Hugging Face ---------------------------------------------------------------------------------------------
def llm_config_of(source: ExportSource) -> LLMConfig:
    """The LLM shape stored beside the checkpoint."""
    if source.kind == "llm" and "llm_config" in source.metadata:
        return LLMConfig(**source.metadata["llm_config"])
    if source.holds("llm") and "llm" in source.args:
        return LLMConfig(**source.args["llm"])
    raise ExportError(f"--input {source.directory}: its puffin_meta.json describes no LLM tower (kind "
                      f"{source.kind or 'unknown'!r}, towers {source.metadata.get('towers')}); export a checkpoint "
                      "written by hf-to-mcore, training or puffin-to-mcore")


def _stored_vocab_rows(source: ExportSource, prefix: str) -> Optional[int]:
    from megatron.core import dist_checkpointing

    from megatron_puffin import checkpoint_safety

    checkpoint_safety.install()  # .metadata through the restricted unpickler
    stored = dist_checkpointing.load_tensors_metadata(source.directory)
    entry = stored.get(f"{prefix}embedding.word_embeddings.weight")
    return int(entry.global_shape[0]) if entry is not None else None


def _with_stored_vocab_rows(source: ExportSource, config: LLMConfig) -> LLMConfig:
    """``config`` padding its vocabulary to the rows stored in ``source`` (padded for the TP size it was saved at),
    so that a TP=1 tower loads them."""
    rows = _stored_vocab_rows(source, source.prefix("llm"))
    if rows is not None and rows != config.padded_vocab_size(1) and rows >= config.vocab_size:
        return dataclasses.replace(config, make_vocab_size_divisible_by=rows)
    return config


def load_llm(source: ExportSource, dtype: Optional[torch.dtype] = None):
    """The LLM tower of ``source`` built at TP=PP=1 (parallel state must be initialised) with its weights.

    The vocabulary was padded for the TP size it was saved at; the tower is built with the same number of rows.
    """
    config = _with_stored_vocab_rows(source, llm_config_of(source))
    prefix = source.prefix("llm")
    transformer_config = config.to_transformer_config(params_dtype=dtype or source.params_dtype())
    model = build_llm(config, transformer_config=transformer_config, pg_collection=process_groups())
    load_module(model, source.directory, prefix=prefix, what="--input")
    return model.eval(), config


def tokenizer_path(source: ExportSource, override: Optional[str]) -> Optional[str]:
    """Where the run's tokenizer is: ``override``, else the training flags' ``--tokenizer``, else the HF directory
    ``hf-to-mcore`` converted (when it holds tokenizer files)."""
    if override:
        return override
    stored = (source.args.get("data") or {}).get("tokenizer")
    if stored:
        from megatron_puffin.inference.loading import stored_path

        return stored_path(stored, source.metadata)
    origin = source.metadata.get("source")
    if source.kind == "llm" and origin and any(os.path.exists(os.path.join(origin, n)) for n in TOKENIZER_FILES):
        return origin
    return None


def copy_tokenizer(path: str, output: str) -> List[str]:
    """Copy an HF tokenizer directory's files, or a SentencePiece ``.model`` (as ``tokenizer.model``), into
    ``output``; returns the names written."""
    source = Path(path)
    if not source.exists():
        raise ExportError(f"tokenizer {path} does not exist (paths in the training flags are relative to the "
                          "directory training ran in); give --tokenizer PATH")
    if source.is_file():
        shutil.copyfile(source, os.path.join(output, "tokenizer.model"))
        return ["tokenizer.model"]
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    models = sorted(source.glob("*.model"))
    if not copied and len(models) == 1:
        shutil.copyfile(models[0], os.path.join(output, "tokenizer.model"))
        return ["tokenizer.model"]
    if not copied:
        raise ExportError(f"tokenizer {path} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                          "give --tokenizer PATH")
    for name in copied:
        shutil.copyfile(source / name, os.path.join(output, name))
    return copied


def generation_config(tokenizer: Optional[str]) -> Dict[str, Any]:
    """Puffin's decoding defaults: greedy, stop at ``<|im_end|>`` (and ``<|endoftext|>``), pad with
    ``<|endoftext|>``, no BOS token."""
    from megatron_puffin.data.tokenizer import PuffinTokenizer

    config: Dict[str, Any] = {"do_sample": False, "bos_token_id": None}
    if tokenizer:
        ids = PuffinTokenizer(tokenizer)
        config["eos_token_id"] = [ids.eos_id, ids.pad_id] if ids.pad_id != ids.eos_id else ids.eos_id
        config["pad_token_id"] = ids.pad_id
    return config


def export_llm_to_hf(source: ExportSource, output: str, tokenizer: Optional[str] = None,
                     dtype: Optional[str] = None) -> Dict[str, Any]:
    """Write ``output`` (config.json, model.safetensors, generation_config.json, the tokenizer) from the LLM of
    ``source``; returns a summary for the log."""
    from megatron_puffin.convert.hf_io import save_hf_directory
    from megatron_puffin.convert.qwen2 import mcore_to_hf
    from megatron_puffin.data.tokenizer import PuffinTokenizer, TokenizerError, identity_difference

    found = tokenizer_path(source, tokenizer)
    if found and not os.path.exists(found):
        raise ExportError(f"tokenizer {found} does not exist (paths in the training flags are relative to the "
                          "directory training ran in); give --tokenizer PATH")
    if found:  # the export would ship another vocabulary than the weights were trained with
        try:
            current = PuffinTokenizer(found).identity()
        except TokenizerError:  # not a loadable tokenizer: copying it names what is missing
            current = None
        difference = current and identity_difference(source.metadata.get("tokenizer"), current)
        if difference:
            raise ExportError(f"--input {source.directory}: {difference}; give --tokenizer with the training "
                              "tokenizer's path")
    target = DTYPES[dtype] if dtype else None
    model, config = load_llm(source, target)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    weights = mcore_to_hf(state, config)
    written_dtype = next(iter(weights.values())).dtype
    hf_config = dict(source.metadata.get("hf_config") or config.to_hf())
    hf_config["torch_dtype"] = str(written_dtype).replace("torch.", "")
    save_hf_directory(output, hf_config, weights)
    copied = copy_tokenizer(found, output) if found else []
    try:
        generation = generation_config(found)
    except TokenizerError as error:  # its files are there (copied) but do not load: garbled, or no chat tokens
        raise ExportError(f"--tokenizer {found}: {error}") from None
    origin = source.metadata.get("source")
    if source.kind == "llm" and origin and os.path.isfile(os.path.join(origin, "generation_config.json")):
        with open(os.path.join(origin, "generation_config.json")) as handle:
            generation = json.load(handle)  # the converted model's own defaults
    with open(os.path.join(output, "generation_config.json"), "w") as handle:
        json.dump(generation, handle, indent=2)
    return {"dtype": str(written_dtype), "tokenizer": copied, "iteration": source.metadata.get("iteration")}


# --- vision tower and query path -> our format ----------------------------------------------------------------------
def _tower_configs(source: ExportSource) -> Tuple[Dict[str, Any], Dict[str, Any], int]:
    args = source.args
    if source.kind == "vision" and "vision_config" in source.metadata:
        return source.metadata["vision_config"], {}, int(source.metadata["llm_hidden_size"])
    if not args:
        raise ExportError(f"--input {source.directory}: no training flags in its puffin_meta.json; export a "
                          "training, puffin-to-mcore or radio-to-mcore checkpoint")
    return args["vision"], args["connector"], int(args["llm"]["hidden_size"])


def build_tower(tower: str, vision: Dict[str, Any], connector: Dict[str, Any], llm_hidden_size: int,
                dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A whole (TP=1, both pipeline ends) ``vision`` tower or ``queries`` path from stored configs."""
    from megatron_puffin.models.connector import ConnectorConfig, build_query_conditioner
    from megatron_puffin.models.vision import VisionConfig, build_vision

    device, groups = torch.device("cpu"), process_groups()
    if tower == "vision":
        return build_vision(VisionConfig(**vision), llm_hidden_size, params_dtype=dtype, device=device,
                            pg_collection=groups)
    return build_query_conditioner(ConnectorConfig(**connector), llm_hidden_size, params_dtype=dtype, device=device,
                                   pg_collection=groups)


def _plain_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}


def export_towers(source: ExportSource, output: str, towers: Optional[List[str]] = None) -> List[str]:
    """Write ``output/puffin_towers.json`` plus one ``<tower>.safetensors`` per exported tower (our parameter
    names, unsharded); returns the towers written."""
    from safetensors.torch import save_file

    wanted = list(towers or [t for t in EXPORTABLE_TOWERS if source.holds(t)])
    missing = [t for t in wanted if t not in EXPORTABLE_TOWERS or not source.holds(t)]
    if missing or not wanted:
        raise ExportError(f"--input {source.directory} holds towers {source.metadata.get('towers') or source.kind}; "
                          f"cannot export {missing or 'any of ' + ', '.join(EXPORTABLE_TOWERS)} "
                          f"(--towers takes {', '.join(EXPORTABLE_TOWERS)})")
    vision, connector, llm_hidden = _tower_configs(source)
    dtype = source.params_dtype()
    os.makedirs(output, exist_ok=True)
    for tower in wanted:
        module = build_tower(tower, vision, connector, llm_hidden, dtype)
        load_module(module, source.directory, prefix=source.prefix(tower), what="--input")
        save_file(_plain_state(module), os.path.join(output, f"{tower}.safetensors"), metadata={"format": "pt"})
    manifest = {
        "format": TOWERS_FORMAT, "version": TOWERS_VERSION, "towers": wanted,
        "vision_config": vision, "connector_config": connector, "llm_hidden_size": llm_hidden,
        "dtype": str(dtype).replace("torch.", ""), "source": source.directory,
        "iteration": source.metadata.get("iteration"), "lineage": source.metadata.get("lineage", []),
    }
    with open(os.path.join(output, TOWERS_FILE), "w") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
    return wanted


# --- the whole model -> the released Puffin layout ---------------------------------------------------------------
def export_puffin(source: ExportSource, output: str, dtype: Optional[str] = None) -> List[str]:
    """Write ``output``: one ``torch.save``d dict of the towers ``source`` holds under the released
    ``Puffin-*.pth`` names (:func:`megatron_puffin.convert.puffin.mcore_to_puffin`; plain tensors, loadable with
    ``torch.load(..., weights_only=True)``), in the dtype the checkpoint trained in unless ``dtype`` says; written
    to a hidden sibling and renamed, so a failed export leaves nothing under ``output``. Parallel state must be
    initialised at TP=PP=1. Returns the towers written."""
    from megatron_puffin.convert.puffin import PUFFIN_TOWERS, mcore_to_puffin, weights_only_config
    from megatron_puffin.files import atomic_path
    from megatron_puffin.inference.loading import resolve_flags
    from megatron_puffin.config.model import puffin_config
    from megatron_puffin.models.puffin import build_puffin

    towers = [tower for tower in PUFFIN_TOWERS if source.holds(tower)]
    if source.kind != "puffin" or not towers or not source.args:
        raise ExportError(f"--input {source.directory} is a {source.kind or 'unknown'!r} checkpoint without "
                          "Puffin towers; export a training or puffin-to-mcore checkpoint (mcore-to-hf, "
                          "mcore-to-sd3 and mcore-to-towers export single towers)")
    config = puffin_config(resolve_flags(source.metadata))
    config = weights_only_config(config, llm=_with_stored_vocab_rows(source, config.llm))
    model = build_puffin(config, pg_collection=process_groups())
    for tower in towers:
        module = CHECKPOINT_MODULES[tower]
        load_module(getattr(model, module), source.directory, prefix=f"{module}.", what="--input")
    target = DTYPES[dtype] if dtype else source.params_dtype()
    state = {name: tensor.detach().to(target).contiguous()
             for name, tensor in mcore_to_puffin(model.state_dict(), config, towers).items()}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as staging:
        torch.save(state, staging)
    return towers


def _towers_manifest_problem(manifest: Dict[str, Any]) -> Optional[str]:
    """What a towers manifest lacks (None: every key :func:`export_towers` writes, of the right type)."""
    if manifest.get("dtype") not in DTYPES:
        return f"dtype {manifest.get('dtype')!r} is not one of {', '.join(DTYPES)}"
    towers = manifest.get("towers")
    if not isinstance(towers, list) or not towers or any(tower not in EXPORTABLE_TOWERS for tower in towers):
        return f"towers {towers!r} is not a list of {' / '.join(EXPORTABLE_TOWERS)}"
    for key in ("vision_config", "connector_config"):
        if not isinstance(manifest.get(key), dict):
            return f"{key} is not a JSON object"
    size = manifest.get("llm_hidden_size")
    if not is_whole_number(size, minimum=1):
        return f"llm_hidden_size {size!r} is not a positive whole number"
    return None


def load_exported_towers(directory: str, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.nn.Module]:
    """Rebuild the towers of an :func:`export_towers` directory with their weights (strict); megatron-core's
    parallel state must be initialised (``megatron_puffin.distributed.initialize()``, TP=1)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(directory, TOWERS_FILE)
    if not os.path.isfile(path):
        raise ExportError(f"{directory} has no {TOWERS_FILE}; it was not written by mcore-to-towers")
    manifest = read_json_object(path, ExportError, "; export the towers again (mcore-to-towers)")
    if manifest.get("format") != TOWERS_FORMAT or manifest.get("version") != TOWERS_VERSION:
        raise ExportError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                          f"this version reads {TOWERS_FORMAT!r} version {TOWERS_VERSION}")
    problem = _towers_manifest_problem(manifest)
    if problem is not None:
        raise ExportError(f"{path}: {problem}; export the towers again (mcore-to-towers)")
    stored = DTYPES[manifest["dtype"]]
    towers = {}
    for tower in manifest["towers"]:
        try:
            module = build_tower(tower, manifest["vision_config"], manifest["connector_config"],
                                 manifest["llm_hidden_size"], dtype or stored)
        except (TypeError, ValueError) as error:  # a config key or value this version does not know
            raise ExportError(f"{path}: the {tower} tower cannot be built from its config ({error}); export the "
                              "towers again (mcore-to-towers) with this version") from None
        weights_path = os.path.join(directory, f"{tower}.safetensors")
        try:
            weights = load_file(weights_path)
        except (OSError, SafetensorError) as error:
            raise ExportError(f"{weights_path} is not a readable safetensors file ({error}); export the towers "
                              "again (mcore-to-towers)") from None
        result = module.load_state_dict(weights, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ExportError(f"{directory}/{tower}.safetensors does not fit the {tower} tower of its manifest: "
                              f"missing {missing}, unexpected {result.unexpected_keys}")
        towers[tower] = module.eval()
    return towers
