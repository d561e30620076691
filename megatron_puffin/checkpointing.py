"""megatron-core distributed checkpoints (reshardable across TP/PP/DP), published atomically and verified on load.

A checkpoint is written into ``<dir>.tmp`` by all ranks; after a barrier rank 0 adds the JSON sidecar
(``puffin_meta.json``: resolved flags and stage lineage) and the integrity manifest (``puffin_manifest.json``: size
and SHA-256 of every file) and renames it to ``<dir>``, so an interrupted write never looks like a complete
checkpoint. Loading verifies the manifest and reads every pickled part through
:mod:`megatron_puffin.checkpoint_safety` (no code runs from a checkpoint).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_puffin import checkpoint_safety as safety
from megatron_puffin.checkpoint_safety import CheckpointError
from megatron_puffin.files import is_whole_number, read_json_object
from megatron_puffin.models.extra_state import (
    absent_tensors,
    drop_absent_extra_state,
    load_model_state,
)

logger = logging.getLogger(__name__)

META_FILE = "puffin_meta.json"
TMP_SUFFIX = ".tmp"
REPLACED_SUFFIX = ".replaced"  # an old checkpoint moved aside while its replacement is published


def _rank() -> int:
    """This process's rank; before the process group exists (the validation pass), torchrun's RANK."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed; the message says why in one line (with the free space of its file system).
    Nothing was published and the half-written files are gone."""


def save_checkpoint(sharded_state_dict: Dict[str, Any], directory: str, metadata: Optional[Dict] = None,
                    replace: bool = False, keep_replaced: bool = False) -> None:
    """Collectively save ``sharded_state_dict`` (from ``model.sharded_state_dict()`` etc.) to ``directory``.

    Args:
        replace: an existing ``directory`` is replaced (the new one is complete before the old one goes).
        keep_replaced: keep the replaced directory as ``<directory>.replaced-<time>`` instead of deleting it.

    Raises:
        FileExistsError: ``directory`` already exists and ``replace`` is False.
        CheckpointWriteError: A write failed (a full disk, a lost mount).
    """
    from megatron.core import dist_checkpointing

    if os.path.exists(directory) and not replace:
        raise FileExistsError(f"checkpoint directory {directory} already exists; choose a new one")
    staging = directory.rstrip("/") + TMP_SUFFIX
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # debris of an interrupted earlier write
        os.makedirs(staging)  # megatron-core needs an existing, empty directory
    _barrier()
    try:
        dist_checkpointing.save(sharded_state_dict, staging)  # a failed write raises on every rank
        _barrier()
        if _rank() == 0:
            if metadata is not None:
                with open(os.path.join(staging, META_FILE), "w") as handle:
                    json.dump(metadata, handle, indent=2, sort_keys=True, default=str)
            safety.write_manifest(staging)
            _publish(staging, directory, keep_replaced)
            logger.info("saved checkpoint %s", directory)
    except (OSError, CheckpointException) as error:  # a full disk, a lost mount: one line, and the half-written
        reason = write_failure(error, staging)  # files go (they would keep a full disk full; never taken for a
        shutil.rmtree(staging, ignore_errors=True)  # checkpoint anyway), after the free space was measured
        raise CheckpointWriteError(reason) from None
    _barrier()


def write_failure(error: BaseException, directory: str) -> str:
    """What went wrong in a checkpoint write, in one line: the OSError, or the first rank's failure inside
    torch's CheckpointException (whose own text is a traceback per rank), and the space left under ``directory``
    (a full disk shows as megatron-core's "unexpected pos" write error)."""
    failures = getattr(error, "failures", None)
    if failures:
        first = next(iter(failures.values()))
        error = first[0] if isinstance(first, tuple) else first
    reason = " ".join(str(error).split()) or type(error).__name__
    existing = next((part for part in (os.path.abspath(directory), *Path(os.path.abspath(directory)).parents)
                     if os.path.isdir(part)), None)
    try:
        reason += f" ({shutil.disk_usage(existing).free / 2**20:.1f} MiB free on its file system)"
    except (OSError, TypeError):  # a lost mount; nothing of the path left
        pass
    return reason


def _publish(staging: str, directory: str, keep_replaced: bool = False) -> None:
    """Rename ``staging`` to ``directory``; an existing ``directory`` is first moved aside (and deleted after,
    unless ``keep_replaced``). A crash in between leaves the old checkpoint under its moved-aside name."""
    if not os.path.exists(directory):
        os.replace(staging, directory)
        return
    aside = directory.rstrip("/") + REPLACED_SUFFIX + (time.strftime("-%Y%m%d-%H%M%S") if keep_replaced else "")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(directory, aside)
    os.replace(staging, directory)
    if keep_replaced:
        logger.warning("replaced damaged checkpoint %s; the old files are kept in %s", directory, aside)
    else:
        shutil.rmtree(aside, ignore_errors=True)
        logger.warning("replaced checkpoint %s (--overwrite-checkpoints)", directory)


def delete_later_checkpoints(run_directory: str, iteration: int) -> List[str]:
    """Delete the published checkpoints of ``run_directory`` newer than ``iteration`` (rank 0; they belong to the
    run that --overwrite-checkpoints replaces)."""
    if _rank() != 0:
        return []
    doomed = [path for i, path in published_checkpoints(run_directory) if i > iteration]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
        logger.warning("deleted %s, a later checkpoint of the replaced run (--overwrite-checkpoints)", path)
    return doomed


_VERIFIED: set = set()


def verify_checkpoint(directory: str) -> None:
    """Raise :class:`CheckpointError` naming the first damaged file of ``directory`` (size and SHA-256 against its
    manifest; the files are shared among the ranks and the findings gathered, so all ranks raise together)."""
    key = os.path.realpath(directory)
    if key in _VERIFIED:
        return
    world = dist.get_world_size() if dist.is_initialized() else 1
    try:
        share = dist.get_rank() if dist.is_initialized() else 0
        problems = safety.structural_problems(directory) or safety.verify_manifest(directory, share, world)
        if not problems:  # restricted unpickling before megatron-core / torch read it (they would wrap the error)
            safety.load_dcp_metadata(os.path.join(directory, safety.DCP_METADATA_FILE))
    except CheckpointError as error:
        problems = [str(error)]
    if world > 1:
        gathered: List[Optional[List[str]]] = [None] * world
        dist.all_gather_object(gathered, problems)
        problems = sorted({p for rank_problems in gathered for p in rank_problems or []})
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        advice = "" if "earlier" in problems[0] else "; use an earlier checkpoint"
        raise CheckpointError(f"{problems[0]}{more}{advice}")
    if safety.read_manifest(directory) is None and _rank() == 0:
        logger.warning("%s has no %s (written before integrity manifests): its bytes are not verified", directory,
                       safety.MANIFEST_FILE)
    _VERIFIED.add(key)


def load_checkpoint(sharded_state_dict: Dict[str, Any], directory: str) -> Dict[str, Any]:
    """Collectively load the tensors described by ``sharded_state_dict`` from ``directory`` (any layout), after
    verifying its manifest; metadata and saved objects are read by the restricted readers."""
    from megatron.core import dist_checkpointing

    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint at {directory}")
    from torch.distributed.checkpoint.api import CheckpointException

    verify_checkpoint(directory)
    safety.install()
    try:
        return dist_checkpointing.load(sharded_state_dict, directory, common_strategy=safety.common_load_strategy())
    except CheckpointException as error:  # torch gathers every rank's failure: report ours in one line
        for failure, _ in error.failures.values():
            if isinstance(failure, CheckpointError):
                raise CheckpointError(str(failure)) from None
        raise


def load_common(directory: str) -> Dict[str, Any]:
    """The common (unsharded) part of a verified checkpoint (``weights_only``)."""
    verify_checkpoint(directory)
    return safety.load_common(directory)


def stored_checkpoint_keys(directory: str) -> Set[str]:
    """Keys of every tensor and object in a megatron-core distributed checkpoint (objects without their
    ``/shard_<offsets>_<shape>`` suffix), read through the restricted metadata reader."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    safety.install()
    return {key.split("/shard_", 1)[0] for key in load_sharded_metadata(directory).keys()}


def load_model_checkpoint(model: torch.nn.Module, directory: str) -> None:
    """Load a model's weights from a distributed checkpoint saved at any TP/PP layout (and either
    ``--transformer-impl``: see :mod:`megatron_puffin.models.extra_state`)."""
    sharded = model.sharded_state_dict()
    stored = stored_checkpoint_keys(directory)
    missing = absent_tensors(sharded, stored)
    if missing:
        raise CheckpointMismatch(f"checkpoint {directory} lacks {len(missing)} tensor(s) of the model: "
                                 f"{', '.join(missing[:20])}")
    drop_absent_extra_state(sharded, stored)
    state = load_checkpoint(sharded, directory)
    load_model_state(model, state, f"checkpoint {directory}")


# The sidecar's top-level entries and the JSON type each must have where present (older checkpoints lack some).
_METADATA_TYPES = {"args": dict, "consumed": dict, "layout": dict, "lineage": list, "towers": list, "kind": str,
                   "iteration": int, "samples_per_step": int, "imported": dict}


def read_metadata(directory: str) -> Optional[Dict[str, Any]]:
    """The JSON sidecar of a checkpoint, if any, checked against the checkpoint's integrity manifest (an edited
    sidecar would otherwise rebuild a model of other flags before the weights' check) and for its entries' types.

    Raises:
        CheckpointError: the sidecar changed since the checkpoint was written, is not a JSON object, or holds an
            entry of the wrong type (naming it).
    """
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):
        return None
    problem = safety.file_problem(directory, META_FILE)
    if problem is not None:
        raise CheckpointError(f"{problem}; use an earlier checkpoint")
    meta = read_json_object(path, CheckpointError, "; the checkpoint is damaged")
    for key, kind in _METADATA_TYPES.items():
        value = meta.get(key)
        if key in meta and not (is_whole_number(value) if kind is int else isinstance(value, kind)):
            raise CheckpointError(f"{path}: {key} holds {json.dumps(value)[:40]}, not a JSON "
                                  f"{_JSON_NAMES[kind]}; the checkpoint is damaged: use an earlier one")
    for group, values in meta.get("args", {}).items():
        if not isinstance(values, dict):
            raise CheckpointError(f"{path}: args.{group} holds {json.dumps(values)[:40]}, not a JSON object; the "
                                  "checkpoint is damaged: use an earlier one")
    return meta


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "whole number"}


# --- run directories --------------------------------------------------------------------------------------------
ITERATION_FORMAT = "iter_{:07d}"


def iteration_directory(save: str, iteration: int) -> str:
    """``<save>/iter_0000100``: where the checkpoint of optimizer step ``iteration`` goes."""
    return os.path.join(save, ITERATION_FORMAT.format(iteration))


def is_complete_checkpoint(directory: str) -> bool:
    """Published (renamed from its staging name) and carrying the sidecar written before the rename."""
    return (
        os.path.isdir(directory)
        and not directory.rstrip("/").endswith(TMP_SUFFIX)
        and os.path.exists(os.path.join(directory, META_FILE))
    )


def _iteration_of(name: str) -> Optional[int]:
    """The iteration of a published ``iter_*`` name (None for staging, moved-aside or other names)."""
    if not name.startswith("iter_"):
        return None
    try:
        return int(name[len("iter_"):])
    except ValueError:
        return None


def published_checkpoints(run_directory: str) -> List[Tuple[int, str]]:
    """(iteration, path) of every published ``iter_*`` directory of a run directory, complete or not, oldest first."""
    if not os.path.isdir(run_directory):
        return []
    found = []
    for name in os.listdir(run_directory):
        iteration = _iteration_of(name)
        path = os.path.join(run_directory, name)
        if iteration is not None and os.path.isdir(path):
            found.append((iteration, path))
    return sorted(found)


def complete_checkpoints(run_directory: str) -> List[Tuple[int, str]]:
    """(iteration, path) of every complete ``iter_*`` checkpoint of a run directory, oldest first."""
    return [(iteration, path) for iteration, path in published_checkpoints(run_directory)
            if is_complete_checkpoint(path)]


CHECKPOINT_FILES = (META_FILE, safety.MANIFEST_FILE, safety.DCP_METADATA_FILE, safety.COMMON_FILE,
                    safety.MCORE_CONFIG_FILE)


def is_checkpoint_directory(path: str) -> bool:
    """A checkpoint itself (holds any file a checkpoint holds, or is named ``iter_*``), not a run directory."""
    return os.path.isdir(path) and (
        _iteration_of(os.path.basename(os.path.normpath(path))) is not None
        or any(os.path.exists(os.path.join(path, name)) for name in CHECKPOINT_FILES)
    )


def checkpoint_problems(directory: str) -> List[str]:
    """Cheap checks of one checkpoint (no hashing), each naming the file: the sidecar is valid JSON, the files
    megatron-core reads exist, every file the manifest lists has its recorded size, and ``.metadata`` passes the
    restricted unpickler."""
    problems = []
    try:
        if read_metadata(directory) is None:
            problems.append(f"{os.path.join(directory, META_FILE)} is missing")
    except CheckpointError as error:
        problems.append(str(error))
    problems += safety.structural_problems(directory)
    if not problems:
        try:  # restricted unpickling: a crafted .metadata is refused here, before any work
            safety.load_dcp_metadata(os.path.join(directory, safety.DCP_METADATA_FILE))
        except CheckpointError as error:
            problems.append(str(error))
    return problems


def resolve_checkpoint(path: str) -> Optional[str]:
    """A checkpoint directory itself, or the newest usable checkpoint of a run directory: newer published ones
    with a missing, truncated or unreadable file are skipped with a warning naming the file. None when the run
    directory holds no published checkpoint; :class:`CheckpointError` when every one is damaged."""
    if is_checkpoint_directory(path):
        return path
    damaged = []
    for iteration, candidate in reversed(published_checkpoints(path)):
        problems = checkpoint_problems(candidate)
        if not problems:
            if damaged and _rank() == 0:
                logger.warning("--load %s: using %s, the newest complete checkpoint", path, candidate)
            return candidate
        damaged.append(candidate)
        if _rank() == 0:
            logger.warning("skipping damaged checkpoint %s: %s", candidate, "; ".join(problems))
    if damaged:
        problems = checkpoint_problems(damaged[0])
        raise CheckpointError(f"{path}: no usable checkpoint; the newest, {damaged[0]}, is damaged: {problems[0]}")
    return None


def damaged_checkpoints(run_directory: str) -> List[str]:
    """Published checkpoints of a run directory that fail :func:`checkpoint_problems`."""
    return [path for _, path in published_checkpoints(run_directory) if checkpoint_problems(path)]


def prune_checkpoints(run_directory: str, keep_last_n: int) -> List[str]:
    """Delete all but the newest ``keep_last_n`` complete checkpoints (rank 0 only); returns what was deleted."""
    if _rank() != 0:
        return []
    found = complete_checkpoints(run_directory)
    doomed = [path for _, path in found[:-keep_last_n]] if keep_last_n > 0 else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
        logger.info("deleted old checkpoint %s (--keep-last-n %d)", path, keep_last_n)
    return doomed


# --- partial loads and shape checks -----------------------------------------------------------------------------
def _flatten_sharded(state: Dict[str, Any]) -> Dict[str, Any]:
    """ShardedTensors of a (nested) sharded state dict, keyed by their checkpoint key."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return {value.key: value for value in nested_values(state) if isinstance(value, ShardedTensor)}


def shape_mismatches(sharded_state_dict: Dict[str, Any], directory: str) -> List[str]:
    """Tensors whose global shape in the checkpoint differs from the model's, or that the checkpoint lacks."""
    from megatron.core import dist_checkpointing

    verify_checkpoint(directory)
    safety.install()
    stored = dist_checkpointing.load_tensors_metadata(directory)
    problems = []
    for key, tensor in sorted(_flatten_sharded(sharded_state_dict).items()):
        if key not in stored:
            problems.append(f"{key}: missing from the checkpoint")
        elif tuple(stored[key].global_shape) != tuple(tensor.global_shape):
            problems.append(
                f"{key}: checkpoint {list(stored[key].global_shape)} vs model {list(tensor.global_shape)}"
            )
    return problems


class CheckpointMismatch(CheckpointError):
    """A checkpoint that does not fit the configured model (the message lists the tensors and what to fix;
    ``problems`` holds one line per tensor, for callers that word it their own way)."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems)


def check_fits(sharded_state_dict: Dict[str, Any], directory: str, what: str) -> None:
    """Raise :class:`CheckpointMismatch` naming every tensor that the checkpoint lacks or has at another shape."""
    problems = shape_mismatches(sharded_state_dict, directory)
    if not problems:
        return
    shown = "\n".join(f"  - {p}" for p in problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise CheckpointMismatch(
        f"{what} {directory} does not fit the configured model ({len(problems)} tensor(s)):\n{shown}{more}\n"
        "Give the tower flags the checkpoint was trained with (its puffin_meta.json holds them), or another checkpoint.",
        problems)


def as_model_dtensors(module: torch.nn.Module, state_dict):
    """A loaded model state dict whose entries for FSDP2 (DTensor) parameters are DTensors laid out like them.

    megatron-core's dist-checkpoint load returns each DTensor parameter's *local shard* as a plain tensor (the
    checkpoint's sharded tensors are built from ``_local_tensor``); ``load_state_dict`` can only copy a DTensor into
    a DTensor parameter. Other entries (and every entry without --use-torch-fsdp2) are returned unchanged.
    """
    from torch.distributed.tensor import DTensor

    targets = module.state_dict(keep_vars=True)
    converted = dict(state_dict)
    for key, value in state_dict.items():
        target = targets.get(key)
        if isinstance(target, DTensor) and torch.is_tensor(value) and not isinstance(value, DTensor):
            converted[key] = DTensor.from_local(value, target.device_mesh, target.placements, run_check=False,
                                                shape=target.shape, stride=target.stride())
    return converted


def load_module(module: torch.nn.Module, directory: str, prefix: str = "", what: str = "checkpoint") -> None:
    """Load one module (a whole model or a tower) from a distributed checkpoint whose keys carry ``prefix``.

    With ``--use-torch-fsdp2`` the module's parameters are DTensors: the load fills each one's local shard (the
    sharded state dict is built without grad mode, as for a resume) and hands ``load_state_dict`` DTensors laid out
    like them (:func:`as_model_dtensors`)."""
    with torch.no_grad():
        sharded = module.sharded_state_dict(prefix=prefix)
        check_fits(sharded, directory, what)
        drop_absent_extra_state(sharded, stored_checkpoint_keys(directory))
        loaded = load_checkpoint(sharded, directory)
        state = {key: loaded[key] for key in sharded}  # load() also returns the checkpoint's common (non-tensor) part
        if prefix:
            state = {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state.items()}
        load_model_state(module, as_model_dtensors(module, state), f"{what} {directory}")
