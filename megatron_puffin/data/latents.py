"""Cached VAE latents: per-sample posterior moments stored beside a shard's fields (a speed lever).

The frozen VAE encoder is a pure function of the (dynamically resized) image, so its posterior ``(mean, std)`` can
be computed once, offline (``tools/cache_latents.py``), instead of at every step. Training then samples the
posterior exactly as the online path does: ``normalize(mean + std * eps)`` with ``eps`` from the same per-sample
generators (``PuffinModel._latents``), so with float32 storage the loss is the online one; bf16/fp16 storage
halves the bytes at the storage format's rounding of the moments.

Three extra fields, aligned by sample index with the shard's own (:data:`LATENT_FIELDS`): the target image
(``image``), the initial view (``image_init``) and the camera map (``camera``, rendered at the target image's size
as the collator does). Each sample's entry is its moments ``[2, C, h, w]`` flattened (mean then std), empty where
the source is absent; ``latent_shape`` holds ``(h, w)`` of each of the three per sample (0, 0 when absent).
bf16/fp16 values are stored as their 16-bit patterns (megatron-core's ``IndexedDataset`` has no 16-bit float).
``latent_crc`` holds, per sample, one CRC-32 per latent field over its ``(h, w)`` and its stored bytes
(:func:`latent_checksum`): training recomputes it for every moment it reads, so damaged bytes that keep the file's
size (a flipped bit, a bad sector) make a bad sample, counted and skipped, instead of silently wrong latents.
Latents cached before the checksums existed have no ``latent_crc`` and are read unchecked (with a warning).

The manifest gains a ``latents`` entry: storage dtype, latent channels, the resolution they were computed at
(``--image-size`` / ``--image-size-unit``) and the VAE's identity (its config and a SHA-256 of its weights).
Training with ``--cached-latents`` checks all of it against its own VAE and data flags, naming both sides when
they differ.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

from megatron_puffin.data.format import (
    BAD_SAMPLE_ERRORS,
    MANIFEST_NAME,
    MappedField,
    PuffinDataset,
    checksum,
    first_unchecked_warning,
    read_manifest,
    reopen_field,
)
from megatron_puffin.files import is_whole_number, write_text_atomically

logger = logging.getLogger(__name__)

LATENT_FIELDS: Dict[str, str] = {"latent_image": "image", "latent_init": "image_init", "latent_camera": "camera"}
"""Latent field -> the shard field it encodes."""
SHAPE_FIELD = "latent_shape"
CRC_FIELD = "latent_crc"
LOCK_NAME = ".latents.lock"
"""Held in a shard while a process writes its latents (removed at the end)."""
"""Per sample, the :func:`latent_checksum` of each of :data:`LATENT_FIELDS` (int64, in that order)."""
BATCH_KEYS: Dict[str, str] = {"latent_image": "target_moments", "latent_init": "init_moments",
                              "latent_camera": "camera_moments"}
"""Latent field -> the micro-batch key the collator fills (``[B, 2, C, h, w]`` or a list)."""
TASK_MOMENTS: Dict[str, tuple] = {"text2image": ("target_moments",),
                                  "cam2image": ("target_moments", "camera_moments"),
                                  "image2image": ("target_moments", "camera_moments", "init_moments")}
"""Loss task -> the moments its VAE inputs need (understanding tasks need none)."""
STORAGE_DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                          "float16": torch.float16}


class LatentCacheError(ValueError):
    """Cached latents missing, or made by another VAE or at another resolution than training uses."""


def vae_identity(vae) -> Dict[str, Any]:
    """``{"config": the AutoencoderKL config, "weights_sha256": hash of every tensor (name, dtype, bytes) in
    state-dict order, "dtype": the dtype it runs in}`` of a :class:`~megatron_puffin.models.vae.FrozenVAE`. Two
    identities are the same VAE when :func:`same_vae` says so; ``dtype`` (already part of the hash) is kept to say
    why two hashes differ."""
    digest = hashlib.sha256()
    dtypes = set()
    for name, tensor in vae.vae.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        dtypes.add(str(tensor.dtype).replace("torch.", ""))
    config = {key: value for key, value in dict(vae.vae.config).items() if not key.startswith("_")}
    return {"config": json.loads(json.dumps(config, default=str)), "weights_sha256": digest.hexdigest(),
            "dtype": "/".join(sorted(dtypes))}


def same_vae(cached: Optional[Mapping[str, Any]], training: Mapping[str, Any]) -> bool:
    """Whether two :func:`vae_identity` values are one VAE: the same config and weights hash (latents cached
    before the identity recorded its ``dtype`` match too)."""
    return cached is not None and all(cached.get(key) == training[key] for key in ("config", "weights_sha256"))


def _dtype_hint(cached: Mapping[str, Any], training: Mapping[str, Any]) -> str:
    """Why two VAEs of the same config may hash apart: the dtype they run in."""
    theirs, ours = cached.get("dtype"), training.get("dtype")
    if theirs and ours and theirs != ours:
        return f"; the cache ran the VAE in {theirs}, training runs it in {ours}: use --vae-dtype {ours}"
    if ours and not theirs:
        return f" (the same weights in another dtype count as another VAE: training runs it in {ours}, give " \
               f"--vae-dtype {ours})"
    return ""


def _to_storage(moments: torch.Tensor, dtype: str) -> np.ndarray:
    values = moments.detach().to("cpu", STORAGE_DTYPES[dtype]).contiguous().reshape(-1)
    return values.numpy() if dtype == "float32" else values.view(torch.int16).numpy().view(np.uint16)


def _from_storage(values: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "float32":
        return torch.from_numpy(np.array(values, dtype=np.float32))
    bits = torch.from_numpy(np.array(values, dtype=np.uint16).view(np.int16))
    return bits.view(STORAGE_DTYPES[dtype]).float()


def latent_checksum(height: int, width: int, payload: np.ndarray) -> int:
    """CRC-32 of one stored latent entry: its ``(h, w)`` as two int32 followed by its stored bytes (so a damaged
    shape that keeps the element count is caught too; 0 for an absent source, ``(0, 0)`` and no bytes, is just the
    CRC of eight zero bytes)."""
    return checksum(payload, checksum(np.array([height, width], dtype=np.int32)))


def _sources(sample: Mapping[str, Any], image_size: int, image_unit: int) -> Dict[str, Optional[torch.Tensor]]:
    """The three images the loader would give the VAE for this sample (None where absent)."""
    from megatron_puffin.data.collate import batched_camera_maps
    from megatron_puffin.data.images import load_dynamic

    target = load_dynamic(sample["image"], image_size, image_unit) if sample.get("image") else None
    init = load_dynamic(sample["image_init"], image_size, image_unit) if sample.get("image_init") else None
    camera = None
    if target is not None and sample.get("camera") is not None:
        values = sample["camera"]
        cameras = torch.tensor([[values.roll, values.pitch, values.vfov]], dtype=torch.float32)
        camera = batched_camera_maps(cameras, [target])[0]
    return {"latent_image": target, "latent_init": init, "latent_camera": camera}


def _encode(vae, images: List[torch.Tensor]) -> List[torch.Tensor]:
    """``[2, C, h, w]`` moments of each image (same-shaped images batched by the VAE wrapper)."""
    if not images:
        return []
    mean, std = vae.encode_moments(images)
    return [torch.stack([m, s]).float() for m, s in zip(mean, std)]


def _sources_or_none(shard_dir: Path, dataset, index: int, image_size: int, image_unit: int,
                     bad_samples: List[str]) -> Dict[str, Optional[torch.Tensor]]:
    """:func:`_sources` of sample ``index``; a sample that does not decode (what training's loader counts as a bad
    sample) gets no latents, and one line in ``bad_samples`` and the log."""
    try:
        return _sources(dataset[index], image_size, image_unit)
    except BAD_SAMPLE_ERRORS as error:
        line = f"shard {shard_dir} index {index}: {type(error).__name__}: {' '.join(str(error).split())}"
        bad_samples.append(line)
        logger.warning("bad sample left without latents (training skips it and counts it the same way): %s", line)
        return {name: None for name in LATENT_FIELDS}


def cache_shard_latents(shard_dir: os.PathLike, vae, image_size: int, image_unit: int, dtype: str = "bfloat16",
                        batch_size: int = 16, overwrite: bool = False,
                        bad_samples: Optional[List[str]] = None,
                        progress: Optional[Callable[[int], None]] = None) -> str:
    """Adds the latent fields to one shard (atomically: the manifest is replaced last).

    Returns "skipped" when the shard already holds latents of this VAE, resolution and dtype, "written" when it
    held none, "replaced" when it held other ones and ``overwrite`` is set (otherwise ValueError, naming both).
    The new fields are written to temporary files first (an interruption there leaves the old latents as they
    were); a replacement then removes the manifest's entry before renaming them into place, so an interruption
    among the renames leaves a shard without latents (training says so; a re-run writes them), never the old
    identity over new fields.

    A sample whose images do not decode (a shard damaged after preprocessing, which checks every image) gets empty
    latents, as a sample without that image does: training's loader fails to decode the same sample first and
    replaces it by the next one, so those latents are never read. Each such sample is one line appended to
    ``bad_samples`` (and logged). ``progress`` is called with the number of samples encoded after each batch.

    One process at a time: the shard is locked while its latents are written (``.latents.lock`` beside its fields,
    removed at the end); a second process finds it held and gets a ValueError naming the first. Two runs started
    together used to write the same temporary files.
    """
    from megatron_puffin.files import locked

    shard_dir = Path(shard_dir)
    with locked(shard_dir / LOCK_NAME, f"{shard_dir} is being cached by another process ({{holder}}); wait for it to "
                                       "end"):
        return _cache_locked_shard(shard_dir, vae, image_size, image_unit, dtype, batch_size, overwrite,
                                   [] if bad_samples is None else bad_samples, progress)


def _cache_locked_shard(shard_dir: Path, vae, image_size: int, image_unit: int, dtype: str, batch_size: int,
                        overwrite: bool, bad_samples: List[str], progress: Optional[Callable[[int], None]]) -> str:
    manifest = read_manifest(shard_dir)
    entry = {"dtype": dtype, "image_size": image_size, "image_size_unit": image_unit,
             "latent_channels": int(vae.vae.config.latent_channels), "vae": vae_identity(vae)}
    existing = manifest.get("latents")
    if existing is not None:
        problem = _entry_problem(existing)
        if problem is None and _same_entry(existing, entry):
            if CRC_FIELD not in existing["fields"]:
                logger.warning("%s holds these latents without checksums (cached by an older version); "
                               "--overwrite re-caches them with checksums", shard_dir)
            return "skipped"
        if not overwrite:
            what = f"a malformed latents entry ({problem})" if problem is not None \
                else f"cached latents of another {_entry_difference(existing, entry)}"
            raise ValueError(f"{shard_dir} already holds {what}; pass --overwrite to replace them")
    dataset = PuffinDataset(str(shard_dir))
    num_bytes = _write_latent_fields(shard_dir, dataset, vae, image_size, image_unit, dtype, batch_size, bad_samples,
                                     progress or (lambda count: None))
    if existing is not None:
        del manifest["latents"]
        _write_manifest(shard_dir, manifest)
    for name in [*LATENT_FIELDS, SHAPE_FIELD, CRC_FIELD]:
        for suffix in (".bin", ".idx"):
            os.replace(shard_dir / f"{name}.tmp{suffix}", shard_dir / f"{name}{suffix}")
    manifest["latents"] = dict(entry, fields={name: {"num_bytes": count} for name, count in num_bytes.items()})
    _write_manifest(shard_dir, manifest)
    logger.info("cached %s latents of %d samples in %s", dtype, len(dataset), shard_dir)
    return "written" if existing is None else "replaced"


def _write_latent_fields(shard_dir: Path, dataset: PuffinDataset, vae, image_size: int, image_unit: int, dtype: str,
                         batch_size: int, bad_samples: List[str], progress: Callable[[int], None]) -> Dict[str, int]:
    """Encodes every sample of ``dataset`` ``batch_size`` at a time into the ``<field>.tmp`` files of
    :data:`LATENT_FIELDS` and :data:`SHAPE_FIELD` beside the shard; returns each field's byte count. On any failure
    (a full disk, Ctrl-C) the temporary files are removed before the error goes on."""
    builders = {name: IndexedDatasetBuilder(get_bin_path(str(shard_dir / f"{name}.tmp")),
                                            dtype=np.float32 if dtype == "float32" else np.uint16)
                for name in LATENT_FIELDS}
    shapes = IndexedDatasetBuilder(get_bin_path(str(shard_dir / f"{SHAPE_FIELD}.tmp")), dtype=np.int32)
    checksums = IndexedDatasetBuilder(get_bin_path(str(shard_dir / f"{CRC_FIELD}.tmp")), dtype=np.int64)
    per_sample = {SHAPE_FIELD: shapes, CRC_FIELD: checksums}
    try:
        num_bytes = {name: 0 for name in [*LATENT_FIELDS, *per_sample]}
        for start in range(0, len(dataset), batch_size):
            stop = min(start + batch_size, len(dataset))
            samples = [_sources_or_none(shard_dir, dataset, i, image_size, image_unit, bad_samples)
                       for i in range(start, stop)]
            encoded = {}
            for name in LATENT_FIELDS:
                present = [i for i, sample in enumerate(samples) if sample[name] is not None]
                encoded[name] = dict(zip(present, _encode(vae, [samples[i][name] for i in present])))
            for i in range(len(samples)):
                shape, crcs = [], []
                for name, builder in builders.items():
                    moments = encoded[name].get(i)
                    payload = _to_storage(moments, dtype) if moments is not None else np.zeros(0, builder.dtype)
                    builder.add_item(torch.from_numpy(payload.copy()))
                    builder.end_document()
                    num_bytes[name] += payload.nbytes
                    shape += list(moments.shape[-2:]) if moments is not None else [0, 0]
                    crcs.append(latent_checksum(*shape[-2:], payload))
                for name, payload in ((SHAPE_FIELD, np.array(shape, dtype=np.int32)),
                                      (CRC_FIELD, np.array(crcs, dtype=np.int64))):
                    per_sample[name].add_item(torch.from_numpy(payload))
                    per_sample[name].end_document()
                    num_bytes[name] += payload.nbytes
            progress(len(samples))
        for name, builder in [*builders.items(), *per_sample.items()]:
            builder.finalize(get_idx_path(str(shard_dir / f"{name}.tmp")))
    except BaseException:  # a full disk, Ctrl-C: no half-written field stays beside the shard (a re-run redoes it)
        for builder in [*builders.values(), *per_sample.values()]:
            try:
                builder.data_file.close()
            except OSError:  # flushing its buffer into the full disk: the file goes anyway
                pass
        for name in [*builders, *per_sample]:
            for suffix in (".bin", ".idx"):
                Path(shard_dir / f"{name}.tmp{suffix}").unlink(missing_ok=True)
        raise
    return num_bytes


def _write_manifest(shard_dir: Path, manifest: Mapping[str, Any]) -> None:
    write_text_atomically(shard_dir / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True))


def _resolution(entry: Mapping[str, Any]) -> str:
    """A latents entry's resolution as the flags that give it."""
    return f"--image-size {entry.get('image_size')} --image-size-unit {entry.get('image_size_unit')}"


def _same_entry(existing: Mapping[str, Any], entry: Mapping[str, Any]) -> bool:
    """A shard's latents entry is the one asked for (its fields aside; the VAE compared by :func:`same_vae`)."""
    rest = {k: v for k, v in existing.items() if k not in ("fields", "vae")}
    return rest == {k: v for k, v in entry.items() if k != "vae"} and same_vae(existing.get("vae"), entry["vae"])


def _entry_difference(existing: Mapping[str, Any], entry: Mapping[str, Any]) -> str:
    """What differs between a shard's latents and the ones asked for: "VAE (weights sha256 <cached> cached,
    <new> now)", "resolution (...)" or "dtype (...)"."""
    if not same_vae(existing.get("vae"), entry["vae"]):
        theirs, ours = existing.get("vae", {}).get("weights_sha256", "?")[:12], entry["vae"]["weights_sha256"][:12]
        if theirs == ours:  # the same weights under another config (e.g. its scaling factor)
            return f"VAE config ({_config_diff(existing['vae'].get('config', {}), entry['vae']['config'])})"
        dtypes = existing.get("vae", {}).get("dtype"), entry["vae"].get("dtype")
        hint = f"; run in {dtypes[0]} cached, {dtypes[1]} now" if all(dtypes) and dtypes[0] != dtypes[1] else ""
        return f"VAE (weights sha256 {theirs} cached, {ours} now{hint})"
    for key in ("image_size", "image_size_unit"):
        if existing.get(key) != entry[key]:
            return f"resolution ({_resolution(existing)} cached, {_resolution(entry)} now)"
    return f"dtype ({existing.get('dtype')} cached, {entry['dtype']} now)"


class LatentCache:
    """Reads the cached moments of a :class:`~megatron_puffin.data.format.PuffinDataset`'s samples.

    Args:
        dataset: The stream's dataset (every shard must hold latents).
        vae: The training VAE's :func:`vae_identity` (None: not checked).
        image_size, image_unit: The training resolution flags.
        what: How to name the stream in errors (e.g. ``--task-stream cam2image:/data/main``).

    Raises:
        LatentCacheError: A shard without latents, or with latents of another VAE / resolution (naming both).
    """

    def __init__(self, dataset: PuffinDataset, vae: Optional[Mapping[str, Any]], image_size: int, image_unit: int,
                 what: str):
        self.dataset = dataset
        self._fields: Dict[int, Dict[str, MappedField]] = {}
        self._pid: Optional[int] = None
        for shard in dataset.shards:
            check_latent_manifest(shard.manifest, shard.dir, vae, image_size, image_unit, what)
        unchecked = [shard.dir for shard in dataset.shards if CRC_FIELD not in shard.manifest["latents"]["fields"]]
        if first_unchecked_warning("latents", unchecked):
            logger.warning("--cached-latents: %s: %d shard(s) hold latents cached without checksums (e.g. %s): damaged "
                           "bytes there cannot be told from good ones; tools/cache_latents.py --overwrite re-caches "
                           "them with checksums", what, len(unchecked), unchecked[0])

    def _shard_fields(self, shard) -> Dict[str, MappedField]:
        if self._pid != os.getpid():  # memory maps are reopened after a fork (DataLoader workers)
            self._fields, self._pid = {}, os.getpid()
        key = id(shard)
        if key not in self._fields:
            sizes = shard.manifest["latents"]["fields"]
            self._fields[key] = {name: reopen_field(shard.dir, name, sizes[name]["num_bytes"], shard.num_samples)
                                 for name in stored_latent_fields(shard.manifest["latents"])}
        return self._fields[key]

    def __getstate__(self):
        return dict(self.__dict__, _fields={}, _pid=None)

    def moments(self, index: int, keys: Sequence[str] = tuple(BATCH_KEYS.values())) -> Dict[str, torch.Tensor]:
        """Batch key (:data:`BATCH_KEYS`, those in ``keys``) -> float32 ``[2, C, h, w]`` of one sample, for the
        sources it has.

        Raises:
            ValueError: the sample's stored shape and values disagree (damaged bytes): the loader counts it as a bad
                sample and takes the next one, as for an image that does not decode.
        """
        shard, local = self.dataset.locate(index)
        fields, entry = self._shard_fields(shard), shard.manifest["latents"]
        shape = fields[SHAPE_FIELD][local].tolist()
        if len(shape) != 2 * len(LATENT_FIELDS) or min(shape) < 0:
            raise ValueError(f"cached latents of shard {shard.dir} index {local}: latent_shape holds {shape}, not "
                             f"{len(LATENT_FIELDS)} (height, width) pairs; re-run tools/cache_latents.py --overwrite")
        checksums = fields[CRC_FIELD][local].tolist() if CRC_FIELD in fields else None
        if checksums is not None and len(checksums) != len(LATENT_FIELDS):
            raise ValueError(f"cached latents of shard {shard.dir} index {local}: {CRC_FIELD} holds {len(checksums)} "
                             f"checksums, not {len(LATENT_FIELDS)}; re-run tools/cache_latents.py --overwrite")
        result = {}
        for slot, name in enumerate(LATENT_FIELDS):
            height, width = shape[2 * slot], shape[2 * slot + 1]
            if height and BATCH_KEYS[name] in keys:
                stored = fields[name][local]
                values = _from_storage(stored, entry["dtype"])
                expected = 2 * entry["latent_channels"] * height * width
                where = f"cached latents of shard {shard.dir} index {local}: {name}"
                if values.numel() != expected:
                    raise ValueError(f"{where} holds {values.numel()} values, latent_shape says {height}x{width} "
                                     f"({expected}); re-run tools/cache_latents.py --overwrite")
                if checksums is not None and latent_checksum(height, width, stored) != checksums[slot]:
                    raise ValueError(f"{where}: its bytes do not match their stored CRC-32 (damaged on disk); re-run "
                                     "tools/cache_latents.py --overwrite")
                result[BATCH_KEYS[name]] = values.reshape(2, entry["latent_channels"], height, width)
        return result


def _entry_problem(entry: Any) -> Optional[str]:
    """What is wrong with a manifest's ``latents`` entry as a value (None: it has every key
    :func:`cache_shard_latents` writes, of the right type): a hand-edited or damaged entry would otherwise fail
    later, inside a loader worker, as a KeyError or a reshape error."""
    if not isinstance(entry, dict):
        return f"it is {json.dumps(entry)[:40]}, not a JSON object"
    if entry.get("dtype") not in STORAGE_DTYPES:
        return f"dtype {entry.get('dtype')!r} is not one of {', '.join(STORAGE_DTYPES)}"
    for key in ("image_size", "image_size_unit", "latent_channels"):
        if not is_whole_number(entry.get(key), minimum=1):
            return f"{key} {entry.get(key)!r} is not a positive whole number"
    vae = entry.get("vae")
    if not isinstance(vae, dict) or not isinstance(vae.get("config"), dict) \
            or not isinstance(vae.get("weights_sha256"), str):
        return "vae is not an object with a config object and a weights_sha256 string"
    if vae["config"].get("latent_channels", entry["latent_channels"]) != entry["latent_channels"]:
        return f"latent_channels {entry['latent_channels']} differs from its VAE config's " \
               f"{vae['config']['latent_channels']}"
    fields = entry.get("fields")
    for name in stored_latent_fields(entry) if isinstance(fields, dict) else LATENT_FIELDS:
        if not isinstance(fields, dict) or not isinstance(fields.get(name), dict) \
                or not is_whole_number(fields[name].get("num_bytes")):
            return f"fields.{name}.num_bytes is missing or not a whole number"
    return None


def stored_latent_fields(entry: Mapping[str, Any]) -> List[str]:
    """The files of a well-formed latents entry: :data:`LATENT_FIELDS`, :data:`SHAPE_FIELD` and, unless the latents
    were cached before checksums existed, :data:`CRC_FIELD`."""
    return [*LATENT_FIELDS, SHAPE_FIELD, *([CRC_FIELD] if CRC_FIELD in entry["fields"] else [])]


def _field_file_problem(shard_dir: Path, name: str, num_bytes: int) -> Optional[str]:
    """Whether a latent field's two files are there, the data file of the size its manifest entry says."""
    prefix = str(shard_dir / name)
    for path in (get_idx_path(prefix), get_bin_path(prefix)):
        if not os.path.isfile(path):
            return f"{path} is missing"
    size = os.path.getsize(get_bin_path(prefix))
    if size != num_bytes:
        return f"{get_bin_path(prefix)} has {size} bytes, its manifest says {num_bytes}"
    return None


def check_latent_manifest(manifest: Mapping[str, Any], shard_dir: Path, vae: Optional[Mapping[str, Any]],
                          image_size: int, image_unit: int, what: str) -> None:
    """Raises ValueError when a shard's cached latents are missing, malformed or were made by another VAE or
    resolution."""
    entry = manifest.get("latents")
    if entry is None:
        raise LatentCacheError(f"--cached-latents: {what}: shard {shard_dir} has no cached latents; run "
                         f"tools/cache_latents.py --data {shard_dir} with the training VAE, or drop --cached-latents")
    problem = _entry_problem(entry)
    if problem is not None:
        raise LatentCacheError(f"--cached-latents: {what}: shard {shard_dir}: the latents entry of its "
                               f"{MANIFEST_NAME} is malformed ({problem}); re-run tools/cache_latents.py "
                               f"--data {shard_dir} --overwrite with the training VAE")
    for name in stored_latent_fields(entry):
        problem = _field_file_problem(Path(shard_dir), name, entry["fields"][name]["num_bytes"])
        if problem is not None:
            raise LatentCacheError(f"--cached-latents: {what}: shard {shard_dir}: {problem}; re-run "
                                   f"tools/cache_latents.py --data {shard_dir} --overwrite with the training VAE")
    ours = _resolution({"image_size": image_size, "image_size_unit": image_unit})
    theirs = _resolution(entry)
    if ours != theirs:
        raise LatentCacheError(f"--cached-latents: {what}: shard {shard_dir} holds latents at {theirs}, training uses "
                         f"{ours}; re-run tools/cache_latents.py --overwrite at the training resolution")
    if vae is not None and not same_vae(entry["vae"], vae):
        theirs_vae = f"weights sha256 {entry['vae']['weights_sha256'][:12]}"
        ours_vae = f"weights sha256 {vae['weights_sha256'][:12]}"
        hint = ""
        if entry["vae"]["config"] != vae["config"]:
            theirs_vae += f", config {_config_diff(entry['vae']['config'], vae['config'])}"
        else:
            hint = _dtype_hint(entry["vae"], vae)
        raise LatentCacheError(f"--cached-latents: {what}: shard {shard_dir} holds latents of another VAE "
                               f"({theirs_vae}) than the training one ({ours_vae}); re-run tools/cache_latents.py "
                               f"--overwrite with the training VAE{hint}")


def _config_diff(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> str:
    keys = sorted(key for key in set(theirs) | set(ours) if theirs.get(key) != ours.get(key))
    return ", ".join(f"{key}: cached {theirs.get(key)!r} vs training {ours.get(key)!r}" for key in keys[:3])


def cache_dataset_latents(paths: Sequence[os.PathLike], vae, image_size: int, image_unit: int,
                          dtype: str = "bfloat16", batch_size: int = 16, overwrite: bool = False,
                          rank: int = 0, world_size: int = 1, progress: bool = False) -> Dict[str, int]:
    """:func:`cache_shard_latents` on every shard under ``paths`` (with ``world_size`` > 1: the shards whose
    position in that list is ``rank`` modulo ``world_size``, so processes launched together never share a shard);
    returns counts of shards written / replaced / skipped and of the samples left without latents because they do
    not decode (``bad_samples``). ``progress``: a bar over this process's samples on stderr."""
    from tqdm import tqdm

    from megatron_puffin.data.format import find_shards

    counts = {"written": 0, "replaced": 0, "skipped": 0}
    bad_samples: List[str] = []
    shards = [shard for path in paths for shard in find_shards(path)][rank::world_size]
    sizes = [read_manifest(Path(shard))["num_samples"] for shard in shards]
    with tqdm(total=sum(sizes), unit="samples", desc="cache latents", disable=not progress, file=sys.stderr,
              mininterval=1.0) as bar:
        for shard, size in zip(shards, sizes):
            done = bar.n
            result = cache_shard_latents(shard, vae, image_size, image_unit, dtype, batch_size, overwrite,
                                         bad_samples, bar.update)
            bar.update(done + size - bar.n)  # a skipped shard counts as done
            counts[result] += 1
    counts["bad_samples"] = len(bad_samples)
    return counts
