"""megatron_puffin: a Megatron-Core training system for Puffin, a camera-centric unified multimodal model."""
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())


def _quiet_backend_warnings() -> None:
    from megatron_puffin.optional_deps import quiet_backend_warnings

    quiet_backend_warnings()


_quiet_backend_warnings()
