"""Host (CPU) memory reuse for CPU training: glibc's ``malloc`` told to keep freed memory in the process.

On a GPU, torch's caching allocator keeps freed device memory for the next allocation of the same size. On CPU,
torch allocates through the C library, and glibc's defaults hand large blocks back to the kernel: a block above
``mmap_threshold`` (128 KiB, raised dynamically up to 32 MiB) is a private ``mmap`` released by ``free``, and the
top of the heap is trimmed once more than ``trim_threshold`` is free. A training step allocates and frees the same
activation, attention and gradient buffers every micro-batch, so every step maps them again and the kernel zeroes
every page on first touch (a minor page fault per 4 KiB). Measured at the real proportions
(``benchmarks/bench_ours_ab.py --compare host-malloc-cache``, one thread, same process, 9 optimizer steps per
round): 1.63 million minor faults and 8.7 s of system time per round with glibc's defaults, 600 faults with this
setting; the time effect (2-8 % less in two such A/Bs) is close to this shared host's drift
(``docs/performance.md``).

:func:`retain_freed_memory` sets, through ``mallopt``: ``M_MMAP_MAX = 0`` (no block of the main heap is a private
mapping; a thread's arena still falls back to ``mmap`` when its heap cannot grow, glibc does so regardless) and
``M_TRIM_THRESHOLD`` = the largest value (the heap is never trimmed). The numbers computed do not change; the
process's resident memory stays at its peak instead of shrinking between steps, as on a GPU. Process-wide, for the
rest of the process (data-loader workers forked later inherit it). ``--host-malloc-cache``
(``TrainingConfig.host_malloc_cache``, off by default) switches it on in training; ``tools/cache_latents.py`` applies
it by default with ``--device cpu`` (1.48x through the tool at 512², ``docs/performance.md``). Nothing happens where
the C library is not glibc (macOS, musl) or on a GPU run, where the large buffers live in CUDA's caching allocator
anyway.
"""
from __future__ import annotations

import ctypes
import logging
import sys
from typing import Optional

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
"""glibc's ``mallopt`` parameter numbers (``<malloc.h>``)."""

INT_MAX = 2**31 - 1


def _glibc() -> Optional[ctypes.CDLL]:
    """The process's C library when it is glibc (it has ``gnu_get_libc_version`` and ``mallopt``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):  # musl and others: no gnu_get_libc_version
        return None


def retain_freed_memory() -> bool:
    """Keep freed memory in this process for reuse (see the module docstring). True when glibc accepted both
    settings; False (and a one-line log) where the C library is not glibc or refused one."""
    libc = _glibc()
    if libc is None:
        logger.info("host memory cache: the C library is not glibc; its malloc defaults stay")
        return False
    accepted = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1
    if accepted:
        logger.info("host memory cache: glibc %s keeps freed memory for reuse (M_MMAP_MAX 0, no trimming)",
                    libc.gnu_get_libc_version().decode())
    else:
        logger.warning("host memory cache: glibc refused mallopt; its malloc defaults stay")
    return accepted


def cache_for_device(enabled: bool, device_type: str) -> bool:
    """``--host-malloc-cache`` for a run on ``device_type`` (training, ``tools/cache_latents.py``): on a CPU
    :func:`retain_freed_memory` when ``enabled``; on a GPU a request only warns (CUDA's caching allocator keeps the
    large buffers already). True when the setting took effect."""
    if not enabled:
        return False
    if device_type != "cpu":
        logger.warning("--host-malloc-cache has no effect on a %s run (CUDA's allocator caches already)", device_type)
        return False
    return retain_freed_memory()


def trim_heap() -> bool:
    """Hands the free memory of the C library's heap back to the kernel now (glibc's ``malloc_trim(0)``); True
    when glibc released some. Nothing happens elsewhere."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
