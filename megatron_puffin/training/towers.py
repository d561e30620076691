"""The tower registry: one row per tower of the composed model, read by every part that treats towers one by one.

A row says where the tower lives in :class:`~megatron_puffin.models.puffin.PuffinModel` (its module path and the
builder that makes it), which ``--freeze-*`` flag freezes it, which unit of a checkpoint carries it (the names
``puffin_meta.json`` lists and ``--pretrained-checkpoint`` loads), which module of :mod:`megatron_puffin.convert`
converts its public weights, and its analytic parameter count (``--dry-run``, :mod:`.layout`) and forward FLOPs
(:mod:`.flops`). The training loop, the dry run, the FLOPs count, conversion/export/inference loading and freezing
read this table; tower names are spelled as here everywhere (``label`` is only for humans).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from megatron_puffin.models.connector import build_query_conditioner
from megatron_puffin.models.dit import build_dit
from megatron_puffin.models.llm import build_llm
from megatron_puffin.models.vae import FrozenVAE
from megatron_puffin.models.vision import build_vision
from megatron_puffin.training import flops, parameter_counts as counts


@dataclass(frozen=True)
class TowerSpec:
    """One tower.

    Attributes:
        name: the tower's one spelling (flags, metadata, logs, FLOPs and parameter tables).
        label: how ``--dry-run`` prints it.
        module: attribute path on a PuffinModel stage (None: held outside the module tree, the frozen VAE).
        builder: what builds the module ``module`` names (the part of it this row describes).
        freeze_flag: the :class:`~megatron_puffin.models.puffin_config.PuffinModelConfig` field that freezes it;
            None: it always trains (``trains``) or never does.
        trains: whether it trains when no freeze flag is set.
        checkpoint: the checkpoint unit carrying its weights (several rows may share one), None: never saved.
        converter: the :mod:`megatron_puffin.convert` module for its public weights (None: loaded as published).
        parameters: ``(configs, tensor_model_parallel_size) -> counts.Tower parts`` (configs: anything with
            ``llm``, ``vision``, ``connector``, ``dit`` and ``model``, e.g. parsed flags or a PuffinConfig).
        forward_flops: ``(PuffinConfig, collated batch, as_executed) -> flops.TowerFlops`` of one micro-batch.
    """

    name: str
    label: str
    module: Optional[str]
    builder: Callable[..., Any]
    freeze_flag: Optional[str]
    trains: bool
    checkpoint: Optional[str]
    converter: Optional[str]
    parameters: Callable[[Any, int], Tuple[Tuple[counts.TowerPart, ...], Optional[str]]]
    forward_flops: Callable[[Any, Mapping[str, Any], bool], flops.TowerFlops]

    def trainable(self, model_config) -> bool:
        """Whether the tower trains under the freeze flags of ``model_config`` (a ``PuffinModelConfig``)."""
        if self.freeze_flag is None:
            return self.trains
        return not getattr(model_config, self.freeze_flag)


def _known(parts: Tuple[counts.TowerPart, ...]) -> Tuple[Tuple[counts.TowerPart, ...], Optional[str]]:
    return parts, None


TOWERS: Tuple[TowerSpec, ...] = (
    TowerSpec("llm", "LLM", "llm", build_llm, "freeze_llm", True, "llm", "megatron_puffin.convert.qwen2",
              lambda c, tp: _known(counts.llm_parts(c.llm, tp)), flops.llm_tower_flops),
    TowerSpec("vision", "vision encoder", "vision.encoder", build_vision, "freeze_vision", True, "vision",
              "megatron_puffin.convert.radio",
              lambda c, tp: _known(counts.vision_encoder_parts(c.vision)), flops.vision_tower_flops),
    TowerSpec("projector", "vision projector", "vision.projector", build_vision, None, True, "vision", None,
              lambda c, tp: _known(counts.vision_projector_parts(c.vision, c.llm.hidden_size)),
              flops.projector_tower_flops),
    TowerSpec("queries", "query path", "conditioner", build_query_conditioner, None, True, "queries",
              "megatron_puffin.convert.connector",
              lambda c, tp: _known(counts.query_path_parts(c.connector, c.llm.hidden_size)), flops.query_tower_flops),
    TowerSpec("dit", "MMDiT", "dit", build_dit, "freeze_dit", True, "dit", "megatron_puffin.convert.sd3",
              lambda c, tp: _known(counts.dit_parts(c.dit)), flops.dit_tower_flops),
    TowerSpec("vae", "VAE", None, FrozenVAE.from_config, None, False, None, None,
              lambda c, tp: counts.vae_parts(c.model), flops.vae_tower_flops),
)
"""Every tower, in model order (first stage to last)."""

TOWER_NAMES: Tuple[str, ...] = tuple(spec.name for spec in TOWERS)
BY_NAME: Dict[str, TowerSpec] = {spec.name: spec for spec in TOWERS}

CHECKPOINT_TOWERS: Tuple[str, ...] = tuple(dict.fromkeys(s.checkpoint for s in TOWERS if s.checkpoint))
"""The units a whole-model checkpoint lists (``puffin_meta.json`` ``towers``): llm, vision, queries, dit."""
# Each unit's rows live in the PuffinModel submodule megatron_puffin.models.puffin.CHECKPOINT_MODULES names for it
# (tests/unit/test_towers.py holds the two together).


def trainable_towers(model_config) -> Dict[str, bool]:
    """Tower name -> whether it trains under the freeze flags of ``model_config`` (a ``PuffinModelConfig``)."""
    return {spec.name: spec.trainable(model_config) for spec in TOWERS}


def tower_module(model: torch.nn.Module, spec: TowerSpec) -> Optional[torch.nn.Module]:
    """The module of ``spec`` on this pipeline stage of ``model``, or None where the stage does not hold it."""
    module: Optional[torch.nn.Module] = model if spec.module is not None else None
    for attribute in (spec.module or "").split("."):
        module = getattr(module, attribute, None) if module is not None else None
    return module


def freeze_towers(model: torch.nn.Module, model_config) -> None:
    """``requires_grad`` of every tower on this stage as the freeze flags say (the one place freezing is applied;
    before DDP wraps the model, so frozen towers get no gradient buffers and no optimizer state)."""
    for spec in TOWERS:
        module = tower_module(model, spec)
        if module is not None:
            module.requires_grad_(spec.trainable(model_config))


def parameter_towers(configs, tensor_model_parallel_size: int = 1) -> Tuple[counts.Tower, ...]:
    """Analytic parameter counts of every tower with its trainability (``--dry-run``; see :mod:`.layout`)."""
    towers = []
    for spec in TOWERS:
        parts, unknown = spec.parameters(configs, tensor_model_parallel_size)
        towers.append(counts.Tower(spec.label, spec.trainable(configs.model), parts, unknown=unknown))
    return tuple(towers)


def forward_flops(config, batch: Mapping[str, Any], as_executed: bool = False) -> Dict[str, flops.TowerFlops]:
    """Forward FLOPs of every tower of :data:`TOWERS` (zero for towers the task does not run; each row's formula is
    :mod:`megatron_puffin.training.flops`').

    Args:
        config: :class:`~megatron_puffin.models.puffin.PuffinConfig`.
        batch: a collated task micro-batch (``task``, ``attention_mask`` [B, S], ``vision_images``,
            ``target_images``, ``camera_maps``, ``init_images`` where the task has them).
        as_executed: count padded tokens and dense attention (see :mod:`megatron_puffin.training.flops`).
    """
    return {spec.name: spec.forward_flops(config, batch, as_executed) for spec in TOWERS}


def micro_batch_flops(
    config, batch: Mapping[str, Any], trainable: Mapping[str, bool], as_executed: bool = False
) -> Dict[str, float]:
    """Training FLOPs of one task micro-batch per tower, plus ``total``.

    A trainable tower counts 3x its forward FLOPs (forward + backward), a frozen one 1x (its activation-gradient
    backward is not counted; see :mod:`megatron_puffin.training.flops`).

    Args:
        config: :class:`~megatron_puffin.models.puffin.PuffinConfig`.
        batch: a collated task micro-batch as the loader yields it.
        trainable: tower name -> whether it trains (every tower of the registry; see :func:`trainable_towers`).
        as_executed: count padded tokens and dense attention instead of model FLOPs.

    Returns:
        ``{tower: FLOPs of each registry tower, "total": their sum}``.
    """
    missing = [tower for tower in TOWER_NAMES if tower not in trainable]
    if missing:
        raise ValueError(f"trainable must name every tower {TOWER_NAMES}; missing {missing} "
                         "(use megatron_puffin.training.towers.trainable_towers(config.model))")
    forward = forward_flops(config, batch, as_executed=as_executed)
    result = {tower: forward[tower].total * (3.0 if trainable[tower] else 1.0) for tower in TOWER_NAMES}
    result["total"] = sum(result.values())
    return result
