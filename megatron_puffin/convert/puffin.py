"""Released Puffin checkpoints (``Puffin-{Align,Base,Thinking,Instruct}.pth``) <-> our composed model.

The reference state dict (docs/puffin.md §1.11) names towers by prefix: ``llm.`` (HF Qwen2), ``visual_encoder.`` (HF RADIO),
``projector.{0,2}``, ``meta_queries`` / ``llm2connector_k`` / ``connector_k`` / ``projector_k`` (the query path),
``transformer.`` (diffusers SD3) and ``vae.``. Released files may hold only the modules a stage trained (stage 1
saved only the trainable ones), so every tower is optional; a tower that is present must be complete. The result
is an unsharded TP=1/PP=1 state dict of :class:`~megatron_puffin.models.puffin.PuffinModel`; saved as a
megatron-core distributed checkpoint it loads at any TP/PP layout. :func:`mcore_to_puffin` is the inverse: our
towers under the released names, for the reference's own code (``tools/convert_checkpoint.py mcore-to-puffin``).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from megatron_puffin.convert.common import ConversionError
from megatron_puffin.convert.connector import mcore_to_reference, reference_to_mcore
from megatron_puffin.convert.qwen2 import hf_to_mcore, mcore_to_hf
from megatron_puffin.convert.radio import mcore_to_projector, mcore_to_radio, projector_to_mcore, radio_to_mcore
from megatron_puffin.convert.sd3 import diffusers_to_mcore, mcore_to_diffusers
from megatron_puffin.models.extra_state import is_extra_state_key

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
QUERY_PATH_PREFIXES = ("meta_queries", "llm2connector_", "connector_", "projector_1.", "projector_2.")


def tower_of(name: str) -> str:
    """The tower a reference tensor name belongs to (``unknown`` if none)."""
    if name.startswith("llm."):
        return "llm"
    if name.startswith("visual_encoder."):
        return "vision"
    if name.startswith("projector."):
        return "projector"
    if name.startswith(QUERY_PATH_PREFIXES):
        return "queries"
    if name.startswith("transformer."):
        return "dit"
    if name.startswith("vae."):
        return "vae"
    return "unknown"


def _strip(group: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {name[len(prefix):]: tensor for name, tensor in group.items()}


def _prefixed(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {prefix + name: tensor for name, tensor in state.items()}


def puffin_to_mcore(state_dict: Mapping[str, torch.Tensor], config) -> Tuple[StateDict, List[str]]:
    """Convert a reference Puffin state dict.

    Args:
        state_dict: tensors under the reference names (``module.`` prefixes of DeepSpeed dumps removed).
        config: the :class:`~megatron_puffin.models.puffin.PuffinConfig` of the model to load into.

    Returns:
        (our unsharded state dict, towers it supplied). The VAE is reported but not converted: it is loaded from
        ``--vae-path`` and never trained.

    Raises:
        ConversionError: unknown tensors, or an incomplete / mis-shaped tower (all listed by the tower converters).
    """
    groups: Dict[str, StateDict] = {}
    for name, tensor in state_dict.items():
        name = name[len("module."):] if name.startswith("module.") else name
        groups.setdefault(tower_of(name), {})[name] = tensor
    if "unknown" in groups:
        raise ConversionError(
            f"Puffin -> mcore: {len(groups['unknown'])} tensor(s) of no known tower: {', '.join(sorted(groups['unknown']))}"
        )
    ours: StateDict = {}
    hidden = config.llm.hidden_size
    if "llm" in groups:
        ours.update(_prefixed(hf_to_mcore(_strip(groups["llm"], "llm."), config.llm), "llm."))
    if "vision" in groups:
        radio = radio_to_mcore(groups["vision"], config.vision, prefix="visual_encoder.radio_model.")
        ours.update(_prefixed(radio, "vision."))
    if "projector" in groups:
        ours.update(_prefixed(projector_to_mcore(groups["projector"], config.vision, hidden), "vision."))
    if "queries" in groups:
        ours.update(_prefixed(reference_to_mcore(groups["queries"], config.connector, hidden), "conditioner."))
    if "dit" in groups:
        ours.update(_prefixed(diffusers_to_mcore(_strip(groups["dit"], "transformer."), config.dit), "dit."))
    supplied = sorted(groups)
    logger.info("Puffin checkpoint supplied: %s", ", ".join(supplied))
    return ours, supplied


def weights_only_config(config, **changes):
    """``config`` (a :class:`~megatron_puffin.models.puffin.PuffinConfig`) for moving weights between formats: local
    fp32 layers (checkpoints load into any precision and either layer implementation) and no VAE (never trained, in
    no checkpoint); ``changes`` replace further fields."""
    return dataclasses.replace(
        config, params_dtype=torch.float32, transformer_impl="local", fp8=None,
        model=dataclasses.replace(config.model, vae_path=None, vae_config=None), **changes)


PUFFIN_TOWERS = ("llm", "vision", "queries", "dit")
"""The towers a released file can hold (the VAE is never trained, and never exported)."""


def mcore_to_puffin(state_dict: Mapping[str, torch.Tensor], config,
                    towers: Sequence[str] = PUFFIN_TOWERS) -> StateDict:
    """Our unsharded TP=1/PP=1 state dict -> ``towers`` under the released checkpoints' names, the inverse of
    :func:`puffin_to_mcore`: ``llm.`` (HF Qwen2, padded vocabulary rows dropped), ``visual_encoder.radio_model.``
    and ``projector.`` (the vision tower), the query path's names, ``transformer.`` (diffusers SD3).

    Raises:
        ConversionError: a tower's tensors that do not match its table (all listed).
    """
    def tower_state(prefix: str) -> StateDict:
        return {name[len(prefix):]: tensor for name, tensor in state_dict.items()
                if name.startswith(prefix) and not is_extra_state_key(name)}

    hidden = config.llm.hidden_size
    reference: StateDict = {}
    if "llm" in towers:
        reference.update(_prefixed(mcore_to_hf(tower_state("llm."), config.llm), "llm."))
    if "vision" in towers:
        vision = tower_state("vision.")
        reference.update(mcore_to_radio(vision, config.vision, prefix="visual_encoder.radio_model."))
        reference.update(mcore_to_projector(vision, config.vision, hidden))
    if "queries" in towers:
        reference.update(mcore_to_reference(tower_state("conditioner."), config.connector, hidden))
    if "dit" in towers:
        reference.update(_prefixed(mcore_to_diffusers(tower_state("dit."), config.dit), "transformer."))
    return reference


def load_puffin_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Load our unsharded state dict into a TP=1/PP=1 model; returns the model tensors it did NOT supply.

    Raises:
        ConversionError: tensors the model does not have.
    """
    result = model.load_state_dict(dict(state_dict), strict=False)
    if result.unexpected_keys:
        raise ConversionError(f"Puffin -> model: tensors the model does not have: {', '.join(result.unexpected_keys)}")
    return [k for k in result.missing_keys if not is_extra_state_key(k)]
