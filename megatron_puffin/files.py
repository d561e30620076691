"""File-system helpers shared by the entry point and the tools: whether an output folder can be made (checked before
any work, so a bad path fails at once instead of when the results are written), atomic writes, one writer per output
(:func:`lock_path`), and the JSON objects the project's own files hold (shard manifests, checkpoint sidecars, model
configs)."""
from __future__ import annotations

import codecs
import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Dict, Iterator, Optional, Type, Union

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def folder_problem(folder: PathLike) -> Optional[str]:
    """Why ``folder`` (created later when missing) cannot hold outputs, or None: the nearest part of it that exists
    must be a folder this process can create entries in. Tried, not inferred from permission bits: root passes
    every permission check, yet a read-only mount or a special file system (``/proc``) refuses it."""
    target = Path(folder).absolute()
    existing = next(part for part in (target, *target.parents) if part.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".puffin-write-check-", dir=existing))
    except OSError as error:
        return f"the folder {existing} is not writable ({error.strerror or error})"
    return None


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A hidden temporary sibling of ``path`` to write; renamed onto ``path`` when the block ends, removed when it
    raises (a kill leaves the old file or the new one, never half of one)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


class PathInUse(Exception):
    """Another process holds the lock :func:`lock_path` asked for; ``holder`` is the line it wrote there."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


class PathLock:
    """A lock held by :func:`lock_path` (or none, where the file system has no locks); :meth:`release` ends it."""

    def __init__(self, handle: Optional[IO[str]] = None, path: Optional[Path] = None, remove: bool = False) -> None:
        self._handle, self._path, self._remove = handle, path, remove

    def release(self) -> None:
        if self._handle is None:
            return
        if self._remove and self._path is not None:
            self._path.unlink(missing_ok=True)  # while still held: no other process can hold this file yet
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None


def lock_path(path: PathLike, remove_on_release: bool = False) -> PathLock:
    """An exclusive ``flock`` on the file ``path`` (created, with its folder), holding a line naming this process.
    The kernel releases it when the process dies (SIGKILL included), so a stale lock never blocks a later run.
    ``remove_on_release``: the file goes when the lock is released (for locks beside a tool's outputs).

    Raises:
        OSError: the file cannot be created or opened.
        PathInUse: another process holds it.
    A file system without locks (some NFS mounts) gets a warning and an empty :class:`PathLock`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "holder unknown"
        handle.close()
        raise PathInUse(holder) from None
    except OSError as error:
        handle.close()
        logger.warning("cannot lock %s (%s): nothing stops a second process from writing there", path, error)
        return PathLock()
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return PathLock(handle, path, remove_on_release)


@contextlib.contextmanager
def locked(lock_file: PathLike, in_use: str, error: Type[Exception] = ValueError) -> Iterator[None]:
    """Holds :func:`lock_path` on ``lock_file`` for the block (the file removed at its end): one writer of an output
    at a time. ``in_use`` is the message when another process holds it, with ``{holder}`` where its line goes.

    Raises:
        error: another process holds the lock.
    """
    try:
        lock = lock_path(lock_file, remove_on_release=True)
    except PathInUse as held:
        raise error(in_use.format(holder=held.holder)) from None
    try:
        yield
    finally:
        lock.release()


def decode_text(data: bytes) -> str:
    """The text of a file a user wrote, perhaps with a Windows tool: UTF-8 with or without the byte-order mark
    (Notepad, Excel's "CSV UTF-8"), or UTF-16 with its byte-order mark (PowerShell's ``>``). Line ends are left as
    they are. Raises UnicodeDecodeError for anything else."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    return data.decode("utf-8-sig")


def read_text(path: PathLike) -> str:
    """:func:`decode_text` of the file ``path``."""
    return decode_text(Path(path).read_bytes())


def write_text_atomically(path: PathLike, text: str) -> None:
    """Replaces ``path`` with ``text`` in one rename (a kill leaves the old file or the new one, never half)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def read_json_object(path: PathLike, error: Type[Exception], advice: str = "",
                     name: Optional[str] = None) -> Dict[str, Any]:
    """The JSON object the file ``path`` holds (read as :func:`read_text` does). A file that is not JSON, or whose
    JSON is not an object (an array, a string, ``null``: an overwritten file), raises ``error`` with one line naming
    the file (as ``name``, default its path), what is wrong and ``advice`` (e.g. ``"; the checkpoint is damaged"``).
    A file that cannot be read raises its ``OSError``: what a missing file means is the caller's to say."""
    name = str(path) if name is None else name
    try:
        value = json.loads(read_text(path))
    except ValueError as problem:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{name} is not valid JSON ({problem}){advice}") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        raise error(f"{name} holds {kind}, not a JSON object{advice}")
    return value


def is_whole_number(value: Any, minimum: int = 0) -> bool:
    """Whether a value read from JSON is a whole number of at least ``minimum`` (``true`` / ``false`` are not: Python
    takes them for 1 and 0)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
