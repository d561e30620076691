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
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

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
    """Load a model's weights from a distributed checkpoint saved at any TP/PP layout."""
    state = load_checkpoint(model.sharded_state_dict(), directory)
    model.load_state_dict(state, strict=True)


def read_metadata(directory: str) -> Optional[Dict[str, Any]]:
    """The JSON sidecar of a checkpoint, if any."""
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)
