"""Optional dependencies, probed once.

Transformer Engine (and apex) are GPU-only. They are probed at first use (ImportError, OSError and RuntimeError
all count as 'unusable', since a TE wheel without its CUDA libraries fails with OSError), never mocked, and a user
who explicitly asks for them gets an error with the exact install line.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

logger = logging.getLogger(__name__)

TE_INSTALL_HINT = (
    'pip install --no-build-isolation "transformer-engine[pytorch]" (or: pip install -e ".[gpu]") on a machine '
    "with CUDA; never install the bare transformer-engine meta package without its PyTorch part"
)


@functools.lru_cache(maxsize=None)
def transformer_engine_error() -> Optional[str]:
    """Why Transformer Engine is unusable here, or None when it is usable (importable and CUDA present)."""
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError) as exc:
        return f"transformer_engine.pytorch cannot be imported ({type(exc).__name__}: {exc})"
    return None


def transformer_engine_available() -> bool:
    return transformer_engine_error() is None


def require_transformer_engine(what: str) -> None:
    """Raise a clear error when ``what`` (a flag the user gave) needs Transformer Engine and it is unusable."""
    reason = transformer_engine_error()
    if reason is not None:
        raise RuntimeError(f"{what} needs Transformer Engine with CUDA, but {reason}. Install: {TE_INSTALL_HINT}")
