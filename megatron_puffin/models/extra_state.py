"""Transformer Engine's ``_extra_state`` entries across implementations, and nothing else relaxed.

TE modules (linears, norms, attention) carry FP8 scaling metadata through torch's ``get_extra_state`` /
``set_extra_state``: their state dicts have ``<module>._extra_state`` entries that local modules lack, and
megatron-core's TE attention even leaves ``core_attention._extra_state`` out of its sharded state dict. A checkpoint
must still load local <-> TE, converted -> TE and TE -> TE. So exactly these entries are created or ignored:

* one the model has but the checkpoint lacks keeps the module's freshly initialised value (TE recomputes FP8
  scales from the first steps' amax history);
* one the checkpoint has but the model lacks (a TE checkpoint into a local model) is ignored;
* every other missing or unexpected entry is still an error that names it.

Used by the training loader (:mod:`megatron_puffin.checkpointing`) and the conversion tools.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Set

import torch

EXTRA_STATE_SUFFIX = "_extra_state"


def is_extra_state_key(key: str) -> bool:
    """Whether a state-dict or checkpoint key is a module's ``_extra_state`` (possibly with a shard suffix)."""
    name = key.split("/", 1)[0]
    return name == EXTRA_STATE_SUFFIX or name.endswith("." + EXTRA_STATE_SUFFIX)


def split_extra_state(keys: Iterable[str]) -> tuple:
    """``(extra_state_keys, other_keys)``, each sorted."""
    keys = sorted(keys)
    return [k for k in keys if is_extra_state_key(k)], [k for k in keys if not is_extra_state_key(k)]


def drop_absent_extra_state(sharded_state_dict: Dict[str, Any], stored_keys: Set[str]) -> List[str]:
    """Remove, in place, the ``_extra_state`` objects of a (nested) sharded state dict that the checkpoint lacks.

    Their modules then keep their own values (see the module docstring). Other entries are never touched: a missing
    tensor still fails the load, naming it.

    Returns:
        The removed checkpoint keys.
    """
    from megatron.core.dist_checkpointing import ShardedObject

    removed = []
    for name, value in list(sharded_state_dict.items()):
        if isinstance(value, dict):
            removed += drop_absent_extra_state(value, stored_keys)
        elif isinstance(value, ShardedObject) and is_extra_state_key(value.key) and value.key not in stored_keys:
            del sharded_state_dict[name]
            removed.append(value.key)
    return removed


def absent_tensors(sharded_state_dict: Dict[str, Any], stored_keys: Set[str]) -> List[str]:
    """Checkpoint keys of a (nested) sharded state dict's tensors and non-extra-state objects that the checkpoint
    lacks (sorted): the entries that must still fail a load."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    sharded = (ShardedTensor, ShardedObject)
    keys = {value.key for value in nested_values(sharded_state_dict) if isinstance(value, sharded)}
    return sorted(key for key in keys if key not in stored_keys and not is_extra_state_key(key))


class StateDictMismatch(RuntimeError):
    """Entries other than ``_extra_state`` are missing or unexpected (the message names them)."""


def load_model_state(module: torch.nn.Module, state_dict: Mapping[str, Any], what: str = "checkpoint") -> None:
    """``module.load_state_dict`` that is strict about everything except ``_extra_state`` entries.

    Raises:
        StateDictMismatch: a tensor is missing from ``state_dict`` or not part of ``module`` (names them).
    """
    result = module.load_state_dict(dict(state_dict), strict=False)
    _, missing = split_extra_state(result.missing_keys)
    _, unexpected = split_extra_state(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:10])}")
        raise StateDictMismatch(
            f"{what} does not match the model ({'; '.join(parts)}); only Transformer Engine _extra_state entries may "
            "differ between implementations. Give the tower flags the checkpoint was trained with."
        )
