"""File-system helpers shared by the entry point and the tools: whether an output folder can be made (checked before
any work, so a bad path fails at once instead of when the results are written) and atomic text writes."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Union

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


def write_text_atomically(path: PathLike, text: str) -> None:
    """Replaces ``path`` with ``text`` in one rename (a kill leaves the old file or the new one, never half)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
