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

from pathlib import Path

from megatron_puffin.config import ConfigError
from megatron_puffin.files import PathInUse, PathLock, lock_path

LOCK_NAME = ".puffin_run.lock"

SaveDirectoryLock = PathLock
"""The held lock of one run's ``--save`` directory (:func:`lock_save_directory`); ``release()`` ends it."""


def lock_save_directory(save: str) -> PathLock:
    """Takes ``save``'s run lock (creating the directory), or raises :class:`ConfigError` naming the run holding it."""
    try:
        return lock_path(Path(save) / LOCK_NAME)
    except PathInUse as error:
        raise ConfigError([f"--save {save} is in use by another training run ({error.holder}); wait for it to end, or "
                           "give this run another --save"]) from None
    except OSError as error:  # read-only or special file system, no permission: before any work, one line
        raise ConfigError([f"--save {save}: cannot create or write there ({error.strerror or error}); give a "
                           "folder this job can write"]) from None
