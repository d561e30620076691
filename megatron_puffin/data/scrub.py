"""Read every sample of a dataset's shards the way training reads them, to find damage before a run starts.

Training finds a damaged sample only when it draws it (and then skips and counts it, ``--max-bad-samples``); a
user who copied a dataset to a cluster, or whose disk reported errors, wants to know before spending GPU hours.
:func:`check_shard` reads each sample of one shard through :class:`~megatron_puffin.data.format.PuffinDataset`
(the per-sample checksums, UTF-8 texts, finite cameras), decodes its images completely and, where the shard holds
cached VAE latents, reads them through :class:`~megatron_puffin.data.latents.LatentCache` (their checksums and
shapes). ``tools/check_data.py`` runs it over every shard of the ``--data`` paths.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_puffin.data.format import (
    BAD_SAMPLE_ERRORS,
    CHECKSUM_FIELD,
    DatasetFormatError,
    PuffinDataset,
    ShardUnavailableError,
)
from megatron_puffin.data.images import decode_image
from megatron_puffin.data.latents import CRC_FIELD, LatentCache, LatentCacheError

IMAGE_FIELDS = ("image", "image_init")


@dataclass
class ShardReport:
    """What :func:`check_shard` found in one shard.

    Attributes:
        shard: The shard directory.
        samples: Samples read.
        bad: One line per damaged sample: ``index I: ErrorType: what``.
        error: Why the shard as a whole cannot be read (a truncated file, a malformed manifest), else None.
        checksums: Whether its fields carry per-sample checksums (shards written before they existed do not).
        latents: None without cached latents, else whether they carry checksums.
    """

    shard: str
    samples: int = 0
    bad: List[str] = field(default_factory=list)
    error: Optional[str] = None
    checksums: bool = False
    latents: Optional[bool] = None


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def check_shard(shard_dir: str) -> ShardReport:
    """Reads every sample of one shard as training would (see the module docstring); never raises for damage."""
    report = ShardReport(shard=str(shard_dir))
    try:
        dataset = PuffinDataset(shard_dir)
        manifest = dataset.shards[0].manifest
        report.checksums = CHECKSUM_FIELD in manifest["fields"]
        latents = None
        if "latents" in manifest:
            entry = manifest["latents"] if isinstance(manifest["latents"], dict) else {}
            # Checked at the resolution they were cached at (a malformed entry is a LatentCacheError naming it).
            latents = LatentCache(dataset, None, entry.get("image_size"), entry.get("image_size_unit"),
                                  f"shard {shard_dir}")
            report.latents = CRC_FIELD in entry["fields"]
    except (DatasetFormatError, LatentCacheError) as error:
        report.error = _one_line(error)
        return report
    for index in range(len(dataset)):
        try:
            sample = dataset[index]
            for name in IMAGE_FIELDS:
                if sample[name]:
                    decode_image(sample[name])
            if latents is not None:
                latents.moments(index)
        except ShardUnavailableError as error:  # truncated or replaced while it was being read
            report.error = _one_line(error)
            return report
        except BAD_SAMPLE_ERRORS as error:
            report.bad.append(f"index {index}: {_one_line(error)}")
        report.samples += 1
    return report
