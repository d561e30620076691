"""Reading checkpoints without running code from them, and knowing that their bytes are the ones written.

Two threats, two defences:

* **Code in a checkpoint.** torch's distributed-checkpoint reader unpickles ``.metadata`` with plain ``pickle``,
  its planner unpickles saved objects with ``weights_only=False``, and megatron-core's ``common.pt`` goes through
  ``torch.load``. A crafted file can therefore run arbitrary code. :class:`SafeFileSystemReader` reads
  ``.metadata`` with :class:`MetadataUnpickler`, which admits only the distributed-checkpoint metadata types,
  ``torch.Size``, dtypes and plain containers, and checks every saved object with torch's ``weights_only``
  unpickler before the planner sees it; :class:`SafeCommonLoadStrategy` loads ``common.pt`` with
  ``weights_only=True``. Anything else is refused with a :class:`CheckpointError` naming the file.
  :func:`install` makes megatron-core's torch_dist strategy build its readers here (one patched function,
  ``megatron.core.dist_checkpointing.strategies.torch._get_filesystem_reader``; megatron-core 0.16.1 offers no
  argument for the reader).
* **Damaged bytes.** :func:`write_manifest` records the size and SHA-256 of every file of a checkpoint in
  ``puffin_manifest.json`` before the checkpoint is published; :func:`verify_manifest` checks them on load;
  :func:`structural_problems` is the cheap check (files present, sizes) used to pick the newest usable checkpoint.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
from typing import Any, Dict, List, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader

from megatron_puffin.files import read_json_object

logger = logging.getLogger(__name__)

MANIFEST_FILE = "puffin_manifest.json"
MANIFEST_VERSION = 1
DCP_METADATA_FILE = ".metadata"
COMMON_FILE = "common.pt"
MCORE_CONFIG_FILE = "metadata.json"
_HASH_CHUNK = 1 << 22


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the one-line message names the file and what to do."""


# --- restricted unpickling ----------------------------------------------------------------------------------------
_DCP_TYPES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadItemType",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # maps a layout's name to torch.strided etc.
    "torch": {"Size"},
    "builtins": {"set", "frozenset", "bytearray", "complex", "slice"},
    "collections": {"OrderedDict"},
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a distributed checkpoint's ``.metadata``: only the types listed in ``_DCP_TYPES``, torch dtypes
    and the containers pickle builds by itself (dict, list, tuple, str, numbers) can be created."""

    def __init__(self, handle, path: str) -> None:
        super().__init__(handle)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_TYPES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self.path} asks to create {module}.{name}, which distributed-checkpoint metadata never holds: refusing "
            "to load it (unpickling it could run code); use a checkpoint written by pretrain_puffin.py or "
            "tools/convert_checkpoint.py"
        )


def load_dcp_metadata(path: str):
    """The ``torch.distributed.checkpoint.Metadata`` in ``path``, read by :class:`MetadataUnpickler`."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as handle:
            metadata = MetadataUnpickler(handle, path).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; use an earlier one") from None
    except Exception as error:  # noqa: BLE001 - any decoding failure means a damaged file
        raise CheckpointError(
            f"{path} is not readable distributed-checkpoint metadata ({type(error).__name__}: {error}); the file is "
            "damaged, use an earlier checkpoint"
        ) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not distributed-checkpoint metadata")
    return metadata


_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation of torch.load")


def weights_only_failure(error: BaseException) -> str:
    """The line of a ``torch.load(..., weights_only=True)`` failure that says what was refused (e.g. "Trying to load
    unsupported GLOBAL posix.system ..."), without torch's surrounding advice, which suggests retrying with
    ``weights_only=False``: exactly what would run the file's code."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            if not rest and index + 1 < len(lines) and not lines[index + 1].startswith(_TORCH_ADVICE):
                rest = lines[index + 1]
            return _without_allowlist_advice(f"WeightsUnpickler error: {rest}".rstrip())
    if isinstance(error, (KeyError, EOFError)):  # torch's legacy reader on bytes torch.save did not write
        return f"not a file torch.save wrote: {type(error).__name__} {str(error) or 'at the end of the file'}"
    kept = [line for line in lines if not line.startswith(_TORCH_ADVICE)]
    return _without_allowlist_advice(kept[0] if kept else (lines[0] if lines else type(error).__name__))


def _without_allowlist_advice(line: str) -> str:
    """"... was not an allowed global by default. Please use `torch.serialization.add_safe_globals([...])` ... if you
    trust this class/function." without its second sentence (allowlisting a file's global is how its code would run)."""
    return line.split(". Please use `torch.serialization", 1)[0]


def check_saved_object(data: bytes, where: str) -> None:
    """Refuse a saved object (a megatron-core ShardedObject) that torch's ``weights_only`` unpickler rejects."""
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(
            f"{where}: a saved object is not plain data ({weights_only_failure(error)}); refusing to unpickle it (it "
            "could run code); use a checkpoint written by pretrain_puffin.py or tools/convert_checkpoint.py"
        ) from None


class _CheckedBytesPlanner:
    """Passes everything to the real load planner; saved objects are first checked by :func:`check_saved_object`
    (an object the ``weights_only`` unpickler accepts builds only plain data when the planner unpickles it)."""

    def __init__(self, planner, directory: str) -> None:
        self._planner = planner
        self._directory = directory

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        data = value.getvalue()
        check_saved_object(data, f"{self._directory} ({read_item.dest_index.fqn})")
        self._planner.load_bytes(read_item, io.BytesIO(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)


class SafeFileSystemReader(FileSystemReader):
    """torch's ``FileSystemReader`` that reads ``.metadata`` through :class:`MetadataUnpickler` (cached, as
    megatron-core's own reader caches it) and checks saved objects before they are unpickled."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self._cached_metadata = None
        self._refused: Optional[CheckpointError] = None

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        if self._cached_metadata is None:
            path = str(self._get_metadata_path(kwargs.get("rank")))
            if self._refused is not None and not os.path.exists(path):
                raise self._refused  # torch retries rank-local metadata after a failure: report the real cause
            try:
                metadata = load_dcp_metadata(path)
            except CheckpointError as error:
                self._refused = error
                raise
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._cached_metadata = metadata
        return self._cached_metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _CheckedBytesPlanner(planner, str(self.path)))


def _safe_filesystem_reader(checkpoint_dir, cache_metadata: bool = False):  # noqa: ARG001 - always cached
    return SafeFileSystemReader(checkpoint_dir)


def install() -> None:
    """Make megatron-core's torch_dist load strategy read checkpoints through :class:`SafeFileSystemReader`.

    megatron-core 0.16.1 builds its reader in ``strategies.torch._get_filesystem_reader`` (for ``load``,
    ``load_tensors_metadata`` and ``load_sharded_metadata``) and takes no reader argument, so this one function is
    replaced. Idempotent; called by every load in :mod:`megatron_puffin.checkpointing`."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    if mcore_torch.MultiStorageClientFeature.is_enabled():
        raise CheckpointError("megatron-core's multi-storage client is enabled: its reader unpickles checkpoint "
                              "metadata unchecked; disable it to load checkpoints here")
    mcore_torch._get_filesystem_reader = _safe_filesystem_reader


def common_load_strategy():
    """A megatron-core common-state load strategy that reads ``common.pt`` with ``weights_only=True``."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return load_common(str(checkpoint_dir))

        def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
            raise CheckpointError(f"{checkpoint_dir}: sharded objects in separate files are not supported here")

    return SafeCommonLoadStrategy()


def load_common(directory: str) -> Dict[str, Any]:
    """The common (unsharded) part of a checkpoint, ``common.pt``, loaded with ``weights_only=True``."""
    path = os.path.join(directory, COMMON_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; use an earlier one")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path} holds objects other than plain data ({weights_only_failure(error)}); refusing "
                              "to load it (it could run code)") from None
    except Exception as error:  # noqa: BLE001 - truncated or garbled
        raise CheckpointError(f"{path} is not readable ({type(error).__name__}: {error}); the file is damaged, "
                              "use an earlier checkpoint") from None


# --- integrity manifest -------------------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files_of(directory: str) -> List[str]:
    """Relative paths of every regular file under ``directory`` but the manifest, sorted."""
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), directory)
            if relative != MANIFEST_FILE:
                found.append(relative)
    return sorted(found)


def write_manifest(directory: str) -> Dict[str, Any]:
    """Record size and SHA-256 of every file in ``directory`` (run by one rank after all writes, before the
    checkpoint is published); written to a temporary name and renamed, so a manifest is always whole."""
    files = {name: {"size": os.path.getsize(os.path.join(directory, name)),
                    "sha256": _sha256(os.path.join(directory, name))} for name in _files_of(directory)}
    manifest = {"version": MANIFEST_VERSION, "algorithm": "sha256", "files": files}
    path = os.path.join(directory, MANIFEST_FILE)
    with open(path + ".tmp", "w") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(path + ".tmp", path)
    return manifest


def read_manifest(directory: str) -> Optional[Dict[str, Any]]:
    """The manifest of a checkpoint; None for a checkpoint written before manifests existed."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.exists(path):
        return None
    damaged = "; the checkpoint is damaged, use an earlier one"
    manifest = read_json_object(path, CheckpointError, damaged)
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(entry, dict) and isinstance(entry.get("size"), int)
                                              and isinstance(entry.get("sha256"), str) for entry in files.values()):
        raise CheckpointError(f"{path} is not a valid integrity manifest (\"files\" must map each file to its size "
                              f"and sha256){damaged}")
    return manifest


def structural_problems(directory: str) -> List[str]:
    """Cheap checks (no hashing): the files megatron-core needs exist, and every file the manifest lists exists
    at its recorded size. Each problem names the file."""
    problems = []
    try:
        manifest = read_manifest(directory)
    except CheckpointError as error:
        return [str(error)]
    required = [DCP_METADATA_FILE, COMMON_FILE, MCORE_CONFIG_FILE]
    for name in required:
        if not os.path.isfile(os.path.join(directory, name)):
            problems.append(f"{os.path.join(directory, name)} is missing")
    if manifest is None:
        return problems
    for name, entry in sorted(manifest["files"].items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            if name not in required:
                problems.append(f"{path} is missing")
        elif os.path.getsize(path) != entry["size"]:
            problems.append(f"{path} has {os.path.getsize(path)} bytes, the manifest records {entry['size']} "
                            "(truncated or overwritten)")
    return problems


def verify_manifest(directory: str, rank: int = 0, world_size: int = 1) -> List[str]:
    """Problems found by hashing this rank's share of the files (every ``world_size``-th file from ``rank``);
    the callers gather the lists so that every rank learns every problem."""
    manifest = read_manifest(directory)
    if manifest is None:
        return []
    problems = []
    for index, (name, entry) in enumerate(sorted(manifest["files"].items())):
        if index % world_size != rank:
            continue
        problem = _file_problem(os.path.join(directory, name), entry)
        if problem is not None:
            problems.append(problem)
    return problems


def _file_problem(path: str, entry: Dict[str, Any]) -> Optional[str]:
    """How one file differs from its manifest entry (missing, size, SHA-256), or None."""
    if not os.path.isfile(path):
        return f"{path} is missing"
    if os.path.getsize(path) != entry["size"]:
        return f"{path} has {os.path.getsize(path)} bytes, the manifest records {entry['size']}"
    if _sha256(path) != entry["sha256"]:
        return f"{path} does not match its SHA-256 in {MANIFEST_FILE} (the bytes changed after the checkpoint was " \
               "written)"
    return None


def file_problem(directory: str, name: str) -> Optional[str]:
    """:func:`verify_manifest` for one small file read before the weights (the ``puffin_meta.json`` sidecar):
    None when it matches its manifest entry or the checkpoint has no manifest or no entry for it."""
    manifest = read_manifest(directory)
    entry = None if manifest is None else manifest["files"].get(name)
    return None if entry is None else _file_problem(os.path.join(directory, name), entry)
