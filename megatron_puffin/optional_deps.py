"""Optional dependencies, probed once.

Transformer Engine (and apex) are GPU-only. They are probed at first use (ImportError, OSError and RuntimeError
all count as 'unusable', since a TE wheel without its CUDA libraries fails with OSError), never mocked, and a user
who explicitly asks for them gets an error with the exact install line.

megatron-core warns at import, four times per process, that Transformer Engine and Apex are missing;
:func:`quiet_backend_warnings` (installed when ``megatron_puffin`` is imported) silences exactly those messages,
and the entry points say once, at INFO, which backends are in use (:func:`log_backends_once`).
"""
from __future__ import annotations

import functools
import logging
import warnings
from typing import Optional

logger = logging.getLogger(__name__)

# megatron-core's import-time fallbacks (megatron.core.optimizer, ...clip_grads, ...fsdp mixed_precision): the
# fallback is numerically equivalent, so the notice belongs in one INFO line, not in four warnings per process.
BACKEND_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"Transformer Engine is not installed",
)


def quiet_backend_warnings() -> None:
    """Ignore megatron-core's "X is not installed, falling back" warnings (only those)."""
    for message in BACKEND_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


# Deprecation notices the libraries raise about their own calls into each other (megatron-core's checkpointing on
# torch.distributed.checkpoint's ShardedTensor and load_state_dict, ...): nothing a user of this project can act on.
LIBRARY_DEPRECATION_MODULES = r"(megatron\.core|torch\.distributed|diffusers|transformers)(\.|$)"


def quiet_library_deprecations() -> None:
    """Ignore the libraries' FutureWarnings about their own internals and diffusers' "CUDA is not available"
    autocast notice (entry points call this unless ``--log-level DEBUG``)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=LIBRARY_DEPRECATION_MODULES)
    warnings.filterwarnings("ignore", message="CUDA is not available")


@functools.lru_cache(maxsize=None)
def apex_available() -> bool:
    try:
        import apex  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def describe_backends() -> str:
    """One line: which layer / optimizer backends this process uses."""
    te = transformer_engine_error()
    layers = ("Transformer Engine available (--transformer-impl transformer_engine)" if te is None
              else f"Transformer Engine unusable ({te}): local PyTorch layers")
    optimizer = "Apex fused kernels" if apex_available() else "no Apex: torch optimizers and local multi-tensor ops"
    return f"backends: {layers}; {optimizer}"


_logged = False


def log_backends_once(log: Optional[logging.Logger] = None) -> None:
    """Log :func:`describe_backends` at INFO, once per process."""
    global _logged
    if not _logged:
        _logged = True
        (log or logger).info("%s", describe_backends())

TE_INSTALL_HINT = (
    'pip install --no-build-isolation "transformer-engine[pytorch]" (or: pip install -e ".[gpu]") on a machine '
    "with CUDA; never install the bare transformer-engine meta package without its PyTorch part"
)


@functools.lru_cache(maxsize=None)
def transformer_engine_error() -> Optional[str]:
    """Why Transformer Engine is unusable here, or None when it is usable (importable and CUDA present)."""
    import torch

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
