"""How a change to megatron-core is applied, undone and checked, and which changes this process holds.

The table of the changes themselves, with their reasons, is :mod:`megatron_puffin.platform`; its ``setup()``
applies them through :func:`apply`. The modules that hold replacements (CPU compatibility, the distributed
optimizer's checkpoint fixes, ...) import this module, not the table, so the table can name them all.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

# (owner, attribute name, replacement): owner is a module, a class or torch.cuda.
Replacement = Tuple[Any, str, Any]

_MISSING = object()


@dataclass(frozen=True)
class MegatronPatch:
    """One change to megatron-core (or to a torch function megatron-core calls).

    Attributes:
        name: the patch's name in logs and tests.
        reason: what megatron-core does that needs it, and what the replacement does instead.
        needed: whether this process needs it (e.g. only without CUDA); evaluated once by :func:`apply`.
        replacements: builds the ``(owner, attribute, replacement)`` triples; called once, while the originals
            are still in place (a replacement may wrap the original).
    """

    name: str
    reason: str
    needed: Callable[[], bool]
    replacements: Callable[[], List[Replacement]]


# name -> [(owner, attribute, original)] of every applied patch.
_APPLIED: Dict[str, List[Tuple[Any, str, Any]]] = {}
_STATE = {"set_up": False}


def _current(owner: Any, attribute: str) -> Any:
    """The attribute as the owner itself holds it (a staticmethod stays a staticmethod; an inherited method is
    _MISSING, so restoring it removes the override)."""
    if isinstance(owner, type):
        return vars(owner).get(attribute, _MISSING)
    return getattr(owner, attribute, _MISSING)


def _assign(owner: Any, attribute: str, value: Any) -> None:
    if value is _MISSING:
        delattr(owner, attribute)
    else:
        setattr(owner, attribute, value)


def _apply(patch: MegatronPatch) -> None:
    replacements = patch.replacements()
    _APPLIED[patch.name] = [(owner, attribute, _current(owner, attribute)) for owner, attribute, _ in replacements]
    for owner, attribute, value in replacements:
        _assign(owner, attribute, value)


def applied() -> List[str]:
    """The names of the patches :func:`setup` applied in this process."""
    return list(_APPLIED)


def in_place(name: str) -> bool:
    """Whether the patch ``name`` was applied and its replacements are in place now (not inside :func:`unpatched`)."""
    return name in _APPLIED and all(_current(owner, attribute) is not original
                                    for owner, attribute, original in _APPLIED[name])


def is_set_up() -> bool:
    """Whether :func:`setup` ran in this process."""
    return _STATE["set_up"]


def require_setup(caller: str) -> None:
    """Raise if :func:`setup` has not run in this process.

    Args:
        caller: the function that needs the patches, named in the error.
    """
    if not _STATE["set_up"]:
        raise RuntimeError(
            f"{caller} needs megatron-core's patches, which are not applied in this process: call "
            "megatron_puffin.platform.setup() once at the start of the program (a new process, e.g. a spawned "
            "rank, needs its own call)"
        )


@contextlib.contextmanager
def unpatched(*names: str) -> Iterator[None]:
    """Run a block with the named patches' originals in place, then put back what was there before.

    Raises:
        KeyError: a name that is not an applied patch.
    """
    missing = [name for name in names if name not in _APPLIED]
    if missing:
        raise KeyError(f"not applied in this process: {missing}; applied: {applied()}")
    saved = [(owner, attribute, _current(owner, attribute)) for name in names for owner, attribute, _ in _APPLIED[name]]
    try:
        for name in names:
            for owner, attribute, original in _APPLIED[name]:
                _assign(owner, attribute, original)
        yield
    finally:
        for owner, attribute, value in saved:
            _assign(owner, attribute, value)


def apply(patches: Sequence[MegatronPatch]) -> bool:
    """Apply each of ``patches`` this process needs (:attr:`MegatronPatch.needed`), once per process: returns False
    (and changes nothing) when a set of patches was applied before."""
    if _STATE["set_up"]:
        return False
    for patch in patches:
        if patch.needed():
            _apply(patch)
    _STATE["set_up"] = True
    return True
