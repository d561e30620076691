"""Real faults for tests. A full disk: a per-file size limit (``RLIMIT_FSIZE``), whose ``EFBIG`` takes the same error
paths as ``ENOSPC`` without a small file system to mount (which needs root). ``SIGXFSZ`` is ignored, so that a write
past the limit fails with an OSError instead of killing the process."""
import contextlib
import resource
import signal
from typing import Callable, Iterator


@contextlib.contextmanager
def file_size_limit(max_bytes: int) -> Iterator[None]:
    """Inside: any write that would make a file of this process longer than ``max_bytes`` fails (EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def file_size_limit_in_child(max_bytes: int) -> Callable[[], None]:
    """``preexec_fn`` for ``subprocess``: the same limit for a whole command (an ignored signal stays ignored
    across exec)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply
