"""Finished work of an interrupted tool run, kept batch by batch so that running the same command again resumes.

``tools/understand.py`` and ``tools/generate.py`` write their outputs only when every image is done; a run killed
before that (SIGTERM from a scheduler, SIGKILL, a crash) would lose every finished batch. Each finished batch is
therefore appended to a journal beside the outputs (one JSON line per image, flushed and fsynced), under a header
holding the run's *key*: the resolved checkpoint and its contents' fingerprint (:func:`checkpoint_fingerprint`: a
checkpoint retrained at the same path is another checkpoint), the model flags and every setting that changes an
image's result.
A later run with the same key reuses the journal's records instead of recomputing them. A journal of another key holds
the finished work of a different interrupted run: it is never replaced unasked (:class:`PreviousRunConflict`, one
line naming what differs; the tools' ``--overwrite`` discards it). The journal is removed once the outputs are
written.

Every rank reads the journal before the model is loaded; only the output rank writes it, and only after a finished
batch (so after every rank has taken part in a collective, and therefore after every rank has read it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping

logger = logging.getLogger(__name__)


class PreviousRunConflict(ValueError):
    """The output already holds work of a run with other settings; the message names the difference and the fix."""


def key_difference(old: Any, new: Mapping[str, Any]) -> str:
    """The settings that differ between two run keys, e.g. ``steps 3 (then) vs 40 (now)``."""
    if not isinstance(old, Mapping):
        return "written by an older version, without its settings"
    changed = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            then, now = old.get(name, "unset"), new.get(name, "unset")
            if name == "fingerprint":
                changed.append("the checkpoint's contents (retrained or replaced at the same path)")
            else:
                changed.append(f"{name} {shorten(then)} (then) vs {shorten(now)} (now)")
    return "; ".join(changed)


def shorten(value: Any, limit: int = 60) -> str:
    """``value`` (a string as is, anything else as JSON) cut to ``limit`` characters with "..." for a message."""
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit - 3] + "..."


class BatchJournal:
    """The journal at ``path`` for a run identified by ``key`` (JSON-serialisable).

    Raises:
        PreviousRunConflict: the journal holds finished work of a run with another key and ``overwrite`` is False.
    """

    def __init__(self, path: Path, key: Dict[str, Any], writer: bool, overwrite: bool = False) -> None:
        self.path, self.key, self.writer = Path(path), json.loads(json.dumps(key)), writer
        self.overwrite = overwrite
        self._handle = None
        self.finished: Dict[str, Dict[str, Any]] = self._read()

    def _read(self) -> Dict[str, Dict[str, Any]]:
        """Records of the journal's finished images by id, when the journal exists and has this run's key."""
        if not self.path.is_file():
            return {}
        lines = self.path.read_text(errors="replace").splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if not isinstance(header, dict):
            logger.warning("%s is not a resume journal (its first line is not a header); starting over", self.path)
            return {}
        records: Dict[str, Dict[str, Any]] = {}
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line being written when the run was killed
                break
            if isinstance(record, dict) and "id" in record:
                records[str(record["id"])] = record
        if header.get("key") != self.key:
            difference = key_difference(header.get("key"), self.key)
            if records and not self.overwrite:
                raise PreviousRunConflict(
                    f"{self.path} holds {len(records)} finished images of an interrupted run with other settings "
                    f"({difference}): run that command again to finish it, choose another output, or pass --overwrite "
                    "to discard them")
            if records:
                logger.warning("--overwrite: discarding %d finished images of an interrupted run with other settings "
                               "(%s) in %s", len(records), difference, self.path)
            return {}
        if records:
            logger.warning("resuming: %d finished images from %s", len(records), self.path)
        return records

    def append(self, records: Iterable[Dict[str, Any]]) -> None:
        """Adds finished records (output rank only); the first call replaces an old journal with this run's."""
        if not self.writer:
            return
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = list(self.finished.values())
            self._handle = self.path.open("w")
            self._write([{"key": self.key}] + kept)
        self._write(list(records))

    def _write(self, lines: List[Dict[str, Any]]) -> None:
        self._handle.write("".join(json.dumps(line) + "\n" for line in lines))
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def remove(self) -> None:
        """The outputs are written: the journal goes."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self.writer:
            self.path.unlink(missing_ok=True)


def checkpoint_fingerprint(directory: str) -> str:
    """A digest of a checkpoint's contents: of its manifest (which holds every file's SHA-256), else of every file's
    name, size and modification time."""
    from megatron_puffin.checkpoint_safety import MANIFEST_FILE

    manifest = Path(directory) / MANIFEST_FILE
    digest = hashlib.sha256()
    if manifest.is_file():
        digest.update(manifest.read_bytes())
    else:
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path.relative_to(directory)} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()

