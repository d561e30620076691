"""megatron-core distributed checkpoints (reshardable across TP/PP/DP), published atomically.

A checkpoint is written into ``<dir>.tmp`` by all ranks and renamed to ``<dir>`` by rank 0 after a barrier,
so an interrupted write never looks like a complete checkpoint. A JSON sidecar (``puffin_meta.json``) may carry
resolved flags and stage lineage.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_puffin.models.extra_state import (
    absent_tensors,
    drop_absent_extra_state,
    load_model_state,
    stored_checkpoint_keys,
)

logger = logging.getLogger(__name__)

META_FILE = "puffin_meta.json"
TMP_SUFFIX = ".tmp"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(sharded_state_dict: Dict[str, Any], directory: str, metadata: Optional[Dict] = None) -> None:
    """Collectively save ``sharded_state_dict`` (from ``model.sharded_state_dict()`` etc.) to ``directory``.

    Raises:
        FileExistsError: ``directory`` already exists (checkpoints are never overwritten in place).
    """
    from megatron.core import dist_checkpointing

    if os.path.exists(directory):
        raise FileExistsError(f"checkpoint directory {directory} already exists; choose a new one")
    staging = directory.rstrip("/") + TMP_SUFFIX
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)  # debris of an interrupted earlier write
        os.makedirs(staging)  # megatron-core needs an existing, empty directory
    _barrier()
    dist_checkpointing.save(sharded_state_dict, staging)
    _barrier()
    if _rank() == 0:
        if metadata is not None:
            with open(os.path.join(staging, META_FILE), "w") as handle:
                json.dump(metadata, handle, indent=2, sort_keys=True, default=str)
        os.replace(staging, directory)
        logger.info("saved checkpoint %s", directory)
    _barrier()


def load_checkpoint(sharded_state_dict: Dict[str, Any], directory: str) -> Dict[str, Any]:
    """Collectively load the tensors described by ``sharded_state_dict`` from ``directory`` (any layout)."""
    from megatron.core import dist_checkpointing

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint at {directory}")
    return dist_checkpointing.load(sharded_state_dict, directory)


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


def read_metadata(directory: str) -> Optional[Dict[str, Any]]:
    """The JSON sidecar of a checkpoint, if any."""
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


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


def complete_checkpoints(run_directory: str) -> List[Tuple[int, str]]:
    """(iteration, path) of every complete ``iter_*`` checkpoint of a run directory, oldest first."""
    if not os.path.isdir(run_directory):
        return []
    found = []
    for name in os.listdir(run_directory):
        if not name.startswith("iter_") or name.endswith(TMP_SUFFIX):
            continue
        path = os.path.join(run_directory, name)
        try:
            iteration = int(name[len("iter_"):])
        except ValueError:
            continue
        if is_complete_checkpoint(path):
            found.append((iteration, path))
    return sorted(found)


def resolve_checkpoint(path: str) -> Optional[str]:
    """A checkpoint directory itself, or the latest complete checkpoint of a run directory (None if it has none)."""
    if is_complete_checkpoint(path):
        return path
    found = complete_checkpoints(path)
    return found[-1][1] if found else None


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


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the configured model (the message lists the tensors and what to fix)."""


def check_fits(sharded_state_dict: Dict[str, Any], directory: str, what: str) -> None:
    """Raise :class:`CheckpointMismatch` naming every tensor that the checkpoint lacks or has at another shape."""
    problems = shape_mismatches(sharded_state_dict, directory)
    if not problems:
        return
    shown = "\n".join(f"  - {p}" for p in problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise CheckpointMismatch(
        f"{what} {directory} does not fit the configured model ({len(problems)} tensor(s)):\n{shown}{more}\n"
        "Give the tower flags the checkpoint was trained with (its puffin_meta.json holds them), or another checkpoint."
    )


def load_module(module: torch.nn.Module, directory: str, prefix: str = "", what: str = "checkpoint") -> None:
    """Load one module (a whole model or a tower) from a distributed checkpoint whose keys carry ``prefix``."""
    sharded = module.sharded_state_dict(prefix=prefix)
    check_fits(sharded, directory, what)
    drop_absent_extra_state(sharded, stored_checkpoint_keys(directory))
    loaded = load_checkpoint(sharded, directory)
    state = {key: loaded[key] for key in sharded}  # load() also returns the checkpoint's common (non-tensor) part
    if prefix:
        state = {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state.items()}
    load_model_state(module, state, f"{what} {directory}")
