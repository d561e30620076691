"""The indexed multimodal dataset format: a manifest plus one megatron-core ``IndexedDataset`` per field.

A *shard* is a directory::

    <shard>/manifest.json          schema version, fields and types, sample count, subset, source, flags, bad samples
    <shard>/<field>.bin / .idx     one megatron-core IndexedDataset per field, aligned by sample index

Fields (:data:`FIELDS`): encoded image bytes, initial-view image bytes (cross-view), UTF-8 texts (caption
description, thinking reasoning, cross-view scene description, photography answer, source key) and the typed
camera (float32 roll, pitch, vfov, yaw; NaN where absent). Camera sentences are *not* stored: they are rendered
from the typed values (docs/puffin.md §3.1). An empty text / image means "absent".

Integrity: ``<shard>/crc.bin / .idx`` holds, per sample, the CRC-32 of each field's stored bytes (in :data:`FIELDS`
order). Every read of a field checks it, so bytes damaged on disk without changing the file's size (a flipped bit,
a bad sector, a stray write) make a bad sample, counted and skipped, instead of a silently different caption,
camera or image. Shards written before the checksums existed have no ``crc`` field and are read unchecked.

A *dataset* is one shard, or a directory holding shard directories at any depth, or a list of such paths; all
shards are read as one sequence (:class:`PuffinDataset`). The reader memory-maps every field once, checks the
manifest against the shards on open and fails with :class:`DatasetFormatError` on truncated or inconsistent files.
"""
import json
import logging
import math
import os
import shutil
import struct
import zlib
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, get_bin_path, get_idx_path

from megatron_puffin.camera import Camera
from megatron_puffin.files import is_whole_number, read_json_object

logger = logging.getLogger(__name__)

FORMAT_NAME = "megatron_puffin.indexed"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
CAMERA_WIDTH = 4
"""Camera values per sample: roll, pitch, vfov, yaw (radians, float32; NaN = absent)."""

FIELDS: Dict[str, Dict[str, str]] = {
    "key": {"dtype": "uint8", "kind": "text", "doc": "source identifier (annotation path relative to its folder)"},
    "image": {"dtype": "uint8", "kind": "bytes", "doc": "encoded image (JPEG/PNG as in the source, or re-encoded)"},
    "image_init": {"dtype": "uint8", "kind": "bytes", "doc": "encoded initial view of a cross-view pair"},
    "caption": {"dtype": "uint8", "kind": "text", "doc": "scene description of the caption, camera sentence removed"},
    "reasoning": {"dtype": "uint8", "kind": "text", "doc": "text inside <think>...</think> of the thinking caption"},
    "scene": {"dtype": "uint8", "kind": "text", "doc": "cross-view target scene description (cap_folder_scene)"},
    "answer": {"dtype": "uint8", "kind": "text", "doc": "photography answer text, verbatim"},
    "camera": {"dtype": "float32", "kind": "camera", "doc": "roll, pitch, vfov, yaw in radians; NaN = absent"},
}
"""Field name -> storage dtype, kind and meaning. Every shard has all fields."""

CHECKSUM_FIELD = "crc"
"""Per sample, :func:`checksum` of each of :data:`FIELDS`' stored bytes (int64, in :data:`FIELDS` order)."""
_CHECKSUM_SPEC = {"dtype": "int64", "kind": "checksum", "doc": "CRC-32 of each field's stored bytes"}

_NUMPY_DTYPES = {"uint8": np.uint8, "float32": np.float32, "int64": np.int64}


# What reading a sample that cannot be decoded raises (the loader counts and skips it, the tools name it): garbled
# image bytes (PIL: OSError, SyntaxError, EOFError, zlib and struct errors), bad UTF-8 (UnicodeDecodeError), a bad
# index pointer (ValueError/IndexError from the memory map), a non-finite camera (BadSampleError).
BAD_SAMPLE_ERRORS = (ValueError, IndexError, OSError, EOFError, SyntaxError, struct.error, zlib.error)


_WIDTHS = {"camera": CAMERA_WIDTH, "checksum": len(FIELDS)}
"""Values per sample of the fixed-width kinds."""
_FIELD_SLOTS = {name: slot for slot, name in enumerate(FIELDS)}


class DatasetFormatError(ValueError):
    """A shard is missing, truncated or inconsistent with its manifest."""


class ShardUnavailableError(RuntimeError):
    """A shard the run opened at start-up cannot be read any more (moved, deleted or replaced while the run was
    reading it, a lost mount): not a bad sample to skip, since every sample of the shard is gone."""


class BadSampleError(ValueError):
    """One stored sample holds values no task can use (e.g. a non-finite camera)."""


@dataclass
class PuffinRecord:
    """One sample in typed form, as written by :class:`ShardWriter` (empty text/bytes = absent).

    Attributes:
        key: Source identifier (e.g. the annotation path); never empty.
        image: Encoded image bytes of the (target) image.
        caption: Scene description without the camera sentence.
        reasoning: Thinking reasoning (inside ``<think>``), or "".
        scene: Cross-view target scene description, or "".
        answer: Photography answer text, or "".
        image_init: Encoded initial view of a cross-view pair, or b"".
        camera: The camera of the (target) image (with yaw for cross-view targets), or None.
    """

    key: str
    image: bytes = b""
    caption: str = ""
    reasoning: str = ""
    scene: str = ""
    answer: str = ""
    image_init: bytes = b""
    camera: Optional[Camera] = None


def camera_to_array(camera: Optional[Camera]) -> np.ndarray:
    """(roll, pitch, vfov, yaw) float32 with NaN for an absent camera or yaw."""
    if camera is None:
        return np.full(CAMERA_WIDTH, np.nan, dtype=np.float32)
    yaw = np.nan if camera.yaw is None else camera.yaw
    return np.array([camera.roll, camera.pitch, camera.vfov, yaw], dtype=np.float32)


def array_to_camera(values: np.ndarray) -> Optional[Camera]:
    """Inverse of :func:`camera_to_array` (None when roll is NaN)."""
    roll, pitch, vfov, yaw = (float(v) for v in values)
    if math.isnan(roll):
        return None
    if not all(math.isfinite(v) for v in (roll, pitch, vfov)) or math.isinf(yaw):
        raise BadSampleError(f"non-finite camera values (roll, pitch, vfov, yaw) = {(roll, pitch, vfov, yaw)}")
    return Camera(roll, pitch, vfov, None if math.isnan(yaw) else yaw)


def checksum(payload: np.ndarray, start: int = 0) -> int:
    """CRC-32 of an array's stored bytes (continuing from ``start``, a previous CRC-32)."""
    return zlib.crc32(np.ascontiguousarray(payload).view(np.uint8), start)


def _spec(name: str) -> Dict[str, str]:
    return _CHECKSUM_SPEC if name == CHECKSUM_FIELD else FIELDS[name]


def stored_fields(manifest: Dict[str, Any]) -> List[str]:
    """The fields a shard holds: :data:`FIELDS` and, unless it was written before checksums existed,
    :data:`CHECKSUM_FIELD`."""
    return [*FIELDS, *([CHECKSUM_FIELD] if CHECKSUM_FIELD in manifest["fields"] else [])]


def _field_payload(record: PuffinRecord, name: str) -> np.ndarray:
    value = getattr(record, name)
    if FIELDS[name]["kind"] == "camera":
        return camera_to_array(value)
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return np.frombuffer(data, dtype=np.uint8)


class ShardWriter:
    """Writes one shard directory; it appears atomically (temporary name, renamed by :meth:`finalize`).

    Args:
        shard_dir: Final shard directory (must not exist yet).
        subset: Which part of the source the samples come from ("main", "cross_view", "photography", ...).
        source: Free-form description of the source (paths, record range), stored in the manifest.
        flags: The creation flags, stored in the manifest.
    """

    def __init__(self, shard_dir: Union[str, os.PathLike], subset: str, source: Optional[Dict[str, Any]] = None,
                 flags: Optional[Dict[str, Any]] = None):
        self.shard_dir = Path(shard_dir)
        self.tmp_dir = self.staging_dir(shard_dir)
        if self.shard_dir.exists():
            raise FileExistsError(f"shard {self.shard_dir} already exists")
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True)
        self.subset, self.source, self.flags = subset, source or {}, flags or {}
        self.num_samples = 0
        self._builders = {
            name: IndexedDatasetBuilder(get_bin_path(str(self.tmp_dir / name)),
                                        dtype=_NUMPY_DTYPES[_spec(name)["dtype"]])
            for name in [*FIELDS, CHECKSUM_FIELD]
        }
        self._field_bytes = {name: 0 for name in self._builders}

    @staticmethod
    def staging_dir(shard_dir: Union[str, os.PathLike]) -> Path:
        """Where the shard ``shard_dir`` is written until :meth:`finalize` renames it into place."""
        shard_dir = Path(shard_dir)
        return shard_dir.with_name(shard_dir.name + ".tmp")

    def add(self, record: PuffinRecord) -> None:
        """Appends one sample (all fields)."""
        if not record.key:
            raise ValueError("a record needs a non-empty key")
        payloads = {name: _field_payload(record, name) for name in FIELDS}
        payloads[CHECKSUM_FIELD] = np.array([checksum(payload) for payload in payloads.values()], dtype=np.int64)
        for name, payload in payloads.items():
            self._builders[name].add_item(torch.from_numpy(payload.copy()))
            self._builders[name].end_document()
            self._field_bytes[name] += payload.nbytes
        self.num_samples += 1

    def finalize(self, bad_samples: Optional[Dict[str, int]] = None) -> Path:
        """Writes the indices and the manifest, then publishes the shard under its final name.

        Args:
            bad_samples: Per-reason counts of source samples skipped while filling this shard.

        Returns:
            The shard directory.
        """
        for name, builder in self._builders.items():
            builder.finalize(get_idx_path(str(self.tmp_dir / name)))
        manifest = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "num_samples": self.num_samples,
            "subset": self.subset,
            "fields": {
                name: {"dtype": _spec(name)["dtype"], "kind": _spec(name)["kind"], "num_bytes": self._field_bytes[name],
                       **({"width": _WIDTHS[_spec(name)["kind"]]} if _spec(name)["kind"] in _WIDTHS else {})}
                for name in self._builders
            },
            "source": self.source,
            "flags": self.flags,
            "bad_samples": dict(sorted((bad_samples or {}).items())),
        }
        (self.tmp_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(self.tmp_dir, self.shard_dir)
        logger.info("wrote shard %s (%d samples)", self.shard_dir, self.num_samples)
        return self.shard_dir


def read_manifest(shard_dir: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Reads and checks a shard manifest (format name, schema version, fields)."""
    path = Path(shard_dir) / MANIFEST_NAME
    try:
        manifest = read_json_object(path, DatasetFormatError, "; the shard is corrupt, re-create it")
    except FileNotFoundError as error:
        raise DatasetFormatError(f"{path} is missing: {shard_dir} is not a finished shard") from error
    if manifest.get("format") != FORMAT_NAME or manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetFormatError(
            f"{path}: format {manifest.get('format')!r} schema {manifest.get('schema_version')!r} is not "
            f"{FORMAT_NAME!r} schema {SCHEMA_VERSION}; re-run tools/preprocess_data.py"
        )
    fields = manifest.get("fields")
    if not isinstance(fields, dict):
        raise DatasetFormatError(f"{path} has no \"fields\" object; the shard is corrupt, re-create it")
    missing = sorted(set(FIELDS) - set(fields))
    if missing:
        raise DatasetFormatError(f"{path} lacks fields {missing}")
    counts = [manifest.get("num_samples")] + [entry.get("num_bytes") if isinstance(entry, dict) else None
                                             for entry in (fields[name] for name in stored_fields(manifest))]
    if not all(is_whole_number(count) for count in counts):
        raise DatasetFormatError(f"{path}: \"num_samples\" and each field's \"num_bytes\" must be whole numbers "
                                 "of at least 0; the shard is corrupt, re-create it")
    return manifest


def _check_field(shard_dir: Path, name: str, manifest: Dict[str, Any]) -> None:
    """Checks that a field's .idx/.bin match the manifest (sample count, byte size, camera width)."""
    prefix = str(shard_dir / name)
    idx_path, bin_path = Path(get_idx_path(prefix)), Path(get_bin_path(prefix))
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise DatasetFormatError(f"shard {shard_dir}: {path.name} is missing")
    itemsize = np.dtype(_NUMPY_DTYPES[_spec(name)["dtype"]]).itemsize
    expected_bytes = manifest["fields"][name]["num_bytes"]
    if bin_path.stat().st_size != expected_bytes:
        raise DatasetFormatError(
            f"shard {shard_dir}: {bin_path.name} has {bin_path.stat().st_size} bytes, the manifest says "
            f"{expected_bytes} (truncated or replaced file); re-create the shard"
        )
    num_samples = manifest["num_samples"]
    # .idx layout (megatron-core): 34-byte header, int32 lengths, int64 pointers, int64 document indices.
    expected_idx = 34 + num_samples * 4 + num_samples * 8 + (num_samples + 1) * 8
    if idx_path.stat().st_size != expected_idx:
        raise DatasetFormatError(
            f"shard {shard_dir}: {idx_path.name} has {idx_path.stat().st_size} bytes, expected {expected_idx} for "
            f"{num_samples} samples (truncated or inconsistent index)"
        )
    dataset = _open_field(prefix, expected_bytes)
    lengths = dataset.sequence_lengths
    if len(dataset) != num_samples or int(lengths.sum(dtype=np.int64)) * itemsize != expected_bytes:
        raise DatasetFormatError(f"shard {shard_dir}: field {name} index disagrees with the manifest")
    width = _WIDTHS.get(_spec(name)["kind"])
    if width is not None and num_samples and not (lengths == width).all():
        raise DatasetFormatError(f"shard {shard_dir}: {name} entries must hold {width} values each")


def _open_field(prefix: str, num_bytes: int) -> IndexedDataset:
    # numpy cannot memory-map an empty file: an all-empty field is opened without mmap and never read.
    return IndexedDataset(prefix, multimodal=False, mmap=num_bytes > 0)


def reopen_field(shard_dir: Path, name: str, num_bytes: int, num_samples: int) -> "MappedField":
    """Memory-maps a field of a shard checked at start-up again (in a new process: a DataLoader worker); every read
    of the result checks the file's size again (:class:`MappedField`).

    Raises:
        ShardUnavailableError: Its files are gone, unreadable, of another size (truncated: reading past the end of a
            memory-mapped file is a SIGBUS, not an error) or hold another number of samples than the manifest read
            at start-up (the shard was replaced).
    """
    prefix = str(shard_dir / name)
    for path in (get_idx_path(prefix), get_bin_path(prefix)):
        if not os.path.isfile(path):
            raise ShardUnavailableError(f"shard {shard_dir}: {path} no longer exists{_GONE}")
    _check_unchanged_size(shard_dir, get_bin_path(prefix), os.path.getsize(get_bin_path(prefix)), num_bytes)
    try:
        dataset = _open_field(prefix, num_bytes)
    except (AssertionError, OSError, ValueError) as error:  # megatron-core asserts, numpy/mmap raise
        raise ShardUnavailableError(f"shard {shard_dir}: field {name} cannot be opened ({type(error).__name__}: "
                                    f"{error}){_GONE}") from None
    if len(dataset) != num_samples:
        raise ShardUnavailableError(f"shard {shard_dir}: field {name} now holds {len(dataset)} samples, "
                                    f"{num_samples} when the run started{_GONE}")
    return MappedField(dataset, shard_dir, get_bin_path(prefix), num_bytes)


_GONE = "; the shard was moved, deleted or replaced while the run was reading it: put it back and resume"


def _check_unchanged_size(shard_dir: Path, bin_path: str, size: int, num_bytes: int) -> None:
    if size != num_bytes:
        raise ShardUnavailableError(f"shard {shard_dir}: {bin_path} now has {size} bytes, {num_bytes} when the run "
                                    f"started (truncated or rewritten){_GONE}")


class MappedField:
    """A field of a shard memory-mapped in this process (:func:`reopen_field`), read like megatron-core's
    ``IndexedDataset`` (``field[i]``, slices, ``len``, ``sequence_lengths``).

    Every read first checks that the mapped ``.bin`` file still has the size it had when the run started. Reading a
    memory-mapped file past its new end is a SIGBUS, which Python cannot catch: in a DataLoader worker it killed the
    worker, and with ``--num-workers 0`` the rank itself, without a save. The check is one ``fstat`` of the
    descriptor megatron-core's reader keeps open (the mapped file itself, even if its path was replaced; about a
    microsecond), which leaves only the moment between the check and the read.
    """

    def __init__(self, dataset: IndexedDataset, shard_dir: Path, bin_path: str, num_bytes: int):
        self.dataset, self.shard_dir, self.bin_path, self.num_bytes = dataset, shard_dir, bin_path, num_bytes
        handle = getattr(getattr(dataset, "bin_reader", None), "_bin_file_reader", None)
        try:
            self._descriptor: Optional[int] = handle.fileno() if handle is not None else None
        except (OSError, ValueError, AttributeError):
            self._descriptor = None

    def check_unchanged(self) -> None:
        """Raises :class:`ShardUnavailableError` when the file no longer has its size from the run's start."""
        try:
            size = os.fstat(self._descriptor).st_size if self._descriptor is not None else \
                os.path.getsize(self.bin_path)
        except OSError:
            raise ShardUnavailableError(f"shard {self.shard_dir}: {self.bin_path} no longer exists{_GONE}") from None
        _check_unchanged_size(self.shard_dir, self.bin_path, size, self.num_bytes)

    def __getitem__(self, index):
        self.check_unchanged()
        return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self.dataset.sequence_lengths


def find_shards(path: Union[str, os.PathLike]) -> List[Path]:
    """Shard directories at or below ``path`` (sorted by relative path).

    Raises:
        DatasetFormatError: Nothing there; a half-written shard (``*.tmp``, a killed preprocessing); a directory
            with field files but no manifest; or a preprocessed subset whose shards do not cover all its records.
    """
    root = Path(path)
    if (root / MANIFEST_NAME).is_file():
        return [root]
    if not root.is_dir():
        raise DatasetFormatError(f"dataset path {root} does not exist")
    _check_no_unfinished_shards(root)
    shards = sorted(p.parent for p in root.rglob(MANIFEST_NAME))
    if not shards:
        raw = [part for part in (root, *root.parents[:2]) if (part / "summary.json").is_file() or
               (part / "summary").is_dir()]
        hint = (f"; {raw[0]} looks like raw Puffin-4M data: make shards with tools/preprocess_data.py --input "
                f"{raw[0]} --output-prefix DIR and train on DIR/<subset>") if raw else ""
        raise DatasetFormatError(f"no shard (directory with {MANIFEST_NAME}) found under {root}{hint}")
    _check_subset_coverage(shards)
    return shards


def _check_no_unfinished_shards(root: Path) -> None:
    """A ``*.tmp`` shard or field files without a manifest mean an unfinished or damaged write: never skip it."""
    for index_file in sorted(root.rglob("*.idx")):
        directory = index_file.parent
        if directory.name.endswith(".tmp"):
            raise DatasetFormatError(f"half-written shard {directory} (preprocessing was interrupted); rerun "
                                     "tools/preprocess_data.py into a fresh --output-prefix")
        if not (directory / MANIFEST_NAME).is_file():
            raise DatasetFormatError(f"shard {directory} has field files but no {MANIFEST_NAME} (unfinished or "
                                     "damaged); re-create it with tools/preprocess_data.py")


def _check_subset_coverage(shards: List[Path]) -> None:
    """Shards written by tools/preprocess_data.py record their summary-record range and the subset's record count:
    together the shards of a subset directory must cover [0, subset_records) without a gap."""
    groups: Dict[Path, List[tuple]] = {}
    for shard in shards:
        source = read_manifest(shard).get("source", {})
        records, total = source.get("records"), source.get("subset_records")
        if isinstance(records, list) and len(records) == 2 and isinstance(total, int):
            groups.setdefault(shard.parent, []).append((int(records[0]), int(records[1]), total, shard))
    for subset_dir, ranges in groups.items():
        covered = 0
        for start, end, total, shard in sorted(ranges):
            if start != covered:
                raise DatasetFormatError(f"{subset_dir}: no shard holds summary records [{covered}, {start}) (a shard "
                                         f"before {shard.name} is missing or lost its {MANIFEST_NAME}); re-run "
                                         "tools/preprocess_data.py")
            covered = end
        if covered != ranges[0][2]:
            raise DatasetFormatError(f"{subset_dir}: the shards hold summary records [0, {covered}) of "
                                     f"{ranges[0][2]} (preprocessing did not finish or a shard is missing); re-run "
                                     "tools/preprocess_data.py")


class _Shard:
    """One opened shard: lazily memory-maps its fields (again after a fork, so DataLoader workers work)."""

    def __init__(self, shard_dir: Path, validate: bool = True):
        self.dir = shard_dir
        self.manifest = read_manifest(shard_dir)
        if validate:
            for name in stored_fields(self.manifest):
                _check_field(shard_dir, name, self.manifest)
        self.num_samples = int(self.manifest["num_samples"])
        self.subset = self.manifest.get("subset", "")
        self._fields: Optional[Dict[str, MappedField]] = None
        self._pid: Optional[int] = None

    def fields(self) -> Dict[str, "MappedField"]:
        if self._fields is None or self._pid != os.getpid():
            self._fields = {name: reopen_field(self.dir, name, self.manifest["fields"][name]["num_bytes"],
                                               self.num_samples) for name in stored_fields(self.manifest)}
            self._pid = os.getpid()
        return self._fields

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fields"], state["_pid"] = None, None
        return state


def _text(array: np.ndarray) -> Optional[str]:
    return array.tobytes().decode("utf-8") if array.size else None


def _stored_checksums(shard: _Shard, local: int) -> Optional[np.ndarray]:
    """A sample's stored :data:`CHECKSUM_FIELD` entry (None for a shard written before checksums existed)."""
    fields = shard.fields()
    if CHECKSUM_FIELD not in fields:
        return None
    stored = fields[CHECKSUM_FIELD][local]
    if len(stored) != len(FIELDS):
        raise BadSampleError(f"field {CHECKSUM_FIELD} holds {len(stored)} checksums, not {len(FIELDS)} (damaged on "
                             "disk)")
    return stored


def _read(shard: _Shard, local: int, name: str, checksums: Optional[np.ndarray]) -> np.ndarray:
    """One field of one sample, checked against ``checksums`` (:func:`_stored_checksums`) unless that is None."""
    if shard.manifest["fields"][name]["num_bytes"] == 0:
        return np.zeros(0, dtype=_NUMPY_DTYPES[FIELDS[name]["dtype"]])
    values = shard.fields()[name][local]
    if checksums is not None and checksum(values) != int(checksums[_FIELD_SLOTS[name]]):
        raise BadSampleError(f"field {name}: its bytes do not match their stored CRC-32 (damaged on disk)")
    return values


_WARNED_UNCHECKED: set = set()
"""(what, shard) pairs without checksums this process has warned about (:func:`first_unchecked_warning`)."""


def first_unchecked_warning(what: str, shard_dirs: Sequence[Path]) -> bool:
    """Whether some of ``shard_dirs`` (written before checksums existed, for ``what``: "fields", "latents") has not
    been warned about in this process yet; marks them. A run opens the same data again (its validation streams, the
    camera metric's held-out images), and one warning per process says it all."""
    new = {(what, str(shard)) for shard in shard_dirs} - _WARNED_UNCHECKED
    _WARNED_UNCHECKED.update(new)
    return bool(new)


class PuffinDataset(torch.utils.data.Dataset):
    """Random access to one or several shards as one sequence of typed samples.

    Args:
        paths: A shard directory, a directory containing shard directories (any depth), or a list of those.
        validate: Check every field of every shard against its manifest on open (cheap: index headers and file
            sizes; no sample is read).

    ``dataset[i]`` returns a dict: ``index`` (int), ``subset`` (str), ``key`` (str), ``image`` (bytes),
    ``image_init`` (bytes or None), ``caption``, ``reasoning``, ``scene``, ``answer`` (str or None) and
    ``camera`` (:class:`~megatron_puffin.camera.Camera` or None; yaw set for cross-view targets).

    Raises:
        DatasetFormatError: On a missing, truncated or inconsistent shard.
    """

    def __init__(self, paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], validate: bool = True):
        path_list = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not path_list:
            raise DatasetFormatError("PuffinDataset needs at least one path")
        shard_dirs = [shard for path in path_list for shard in find_shards(path)]
        self.shards = [_Shard(shard_dir, validate) for shard_dir in shard_dirs]
        self._offsets = np.cumsum([0] + [shard.num_samples for shard in self.shards]).tolist()
        logger.info("opened %d samples in %d shards from %s", len(self), len(self.shards), path_list)
        unchecked = [shard.dir for shard in self.shards if CHECKSUM_FIELD not in shard.manifest["fields"]]
        if first_unchecked_warning("fields", unchecked):
            logger.warning("%d of %d shards (e.g. %s) were written without per-sample checksums (before they "
                           "existed): bytes damaged there are read unchecked; tools/preprocess_data.py writes them "
                           "with checksums", len(unchecked), len(self.shards), unchecked[0])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, index: int) -> "tuple[_Shard, int]":
        """(shard, index inside the shard) of a global sample index."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        index = index % len(self) if index < 0 else index
        shard_index = bisect_right(self._offsets, index) - 1
        return self.shards[shard_index], index - self._offsets[shard_index]

    def read_field(self, index: int, name: str, verify: bool = True) -> np.ndarray:
        """Raw stored values of one field of one sample (a read-only view into the memory map).

        Raises:
            BadSampleError: With ``verify``, the values do not match the sample's stored checksum (bytes damaged on
                disk).
        """
        shard, local = self.locate(index)
        return _read(shard, local, name, _stored_checksums(shard, local) if verify else None)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        index = int(index)
        shard, local = self.locate(index)
        checksums = _stored_checksums(shard, local)
        sample: Dict[str, Any] = {"index": index % len(self), "subset": shard.subset}
        for name, spec in FIELDS.items():
            values = _read(shard, local, name, checksums)
            if spec["kind"] == "text":
                sample[name] = _text(values)
            elif spec["kind"] == "bytes":
                sample[name] = values.tobytes() if values.size else None
            else:
                sample[name] = array_to_camera(values)
        sample["key"] = sample["key"] or ""
        return sample

    def cameras(self) -> np.ndarray:
        """All cameras as a float32 array [N, 4] (roll, pitch, vfov, yaw; NaN = absent), each checked against its
        sample's stored checksum as :meth:`read_field` does.

        Raises:
            BadSampleError: naming the first sample whose camera bytes are damaged on disk.
        """
        rows = np.full((len(self), CAMERA_WIDTH), np.nan, dtype=np.float32)
        for index in range(len(self)):
            try:
                values = self.read_field(index, "camera")
            except BadSampleError as error:
                raise BadSampleError(f"sample {index}: {error}") from None
            if values.size:
                rows[index] = np.asarray(values, dtype=np.float32).reshape(CAMERA_WIDTH)
        return rows

    def bad_sample_counts(self) -> Dict[str, int]:
        """Per-reason counts of source samples skipped while preprocessing, summed over the shards."""
        totals: Dict[str, int] = {}
        for shard in self.shards:
            for reason, count in shard.manifest.get("bad_samples", {}).items():
                totals[reason] = totals.get(reason, 0) + int(count)
        return dict(sorted(totals.items()))
