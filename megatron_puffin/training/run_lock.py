"""One training run per ``--save`` directory at a time.

Two runs writing into one ``--save`` (a job submitted twice, a Slurm requeue while the first copy still runs) would
write the same ``iter_N.tmp`` staging directories: each save removes the other's half-written staging directory as
debris of an interrupted write, and a checkpoint could be published holding shards of both runs. Rank 0 of a run
therefore holds an exclusive ``flock`` on ``--save/.puffin_run.lock`` from before the model is built until the run
ends; a second run finds it held and stops with one line naming the holder, before any work. The kernel releases
the lock when its holder dies (SIGKILL included), so a stale lock never blocks a resumed run. A file system without
locks (some NFS mounts) gets a warning and no protection.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import IO, Optional

from megatron_puffin.config import ConfigError

logger = logging.getLogger(__name__)

LOCK_NAME = ".puffin_run.lock"


class SaveDirectoryLock:
    """The held lock of one run's ``--save`` directory (:func:`lock_save_directory`); :meth:`release` ends it."""

    def __init__(self, handle: Optional[IO[str]]) -> None:
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def lock_save_directory(save: str) -> SaveDirectoryLock:
    """Takes ``save``'s run lock (creating the directory), or raises :class:`ConfigError` naming the run holding it."""
    path = Path(save) / LOCK_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as error:  # read-only or special file system, no permission: before any work, one line
        raise ConfigError([f"--save {save}: cannot create or write there ({error.strerror or error}); give a "
                           "folder this job can write"]) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "holder unknown"
        handle.close()
        raise ConfigError([f"--save {save} is in use by another training run ({holder}); wait for it to end, or "
                           "give this run another --save"]) from None
    except OSError as error:
        handle.close()
        logger.warning("cannot lock --save %s (%s): nothing stops a second run from writing into it", save, error)
        return SaveDirectoryLock(None)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return SaveDirectoryLock(handle)
