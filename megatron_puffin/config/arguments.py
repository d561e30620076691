"""All configuration of one run: the per-concern dataclasses, gathered in :class:`PuffinArguments`. The command
line and ``@flagfile``\\ s are parsed into them by :mod:`megatron_puffin.config.parser`."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Sequence, Tuple

from megatron_puffin.config.dataclass_args import InvalidValue
from megatron_puffin.config.schema import (
    CheckpointConfig,
    LoggingConfig,
    ParallelConfig,
    PrecisionConfig,
    TrainingConfig,
    ValidationConfig,
)
from megatron_puffin.data.config import DataConfig
from megatron_puffin.diffusion.config import FlowMatchingConfig
from megatron_puffin.models.dit.config import DiTConfig
from megatron_puffin.models.connector.config import ConnectorConfig
from megatron_puffin.models.compile import CompileConfig
from megatron_puffin.models.llm.config import LLMConfig
from megatron_puffin.models.puffin_config import PuffinModelConfig
from megatron_puffin.models.vision.config import VisionConfig

# (typed field of PuffinArguments, dataclass, argparse group title): a new concern adds a row here and a field there.
CONFIG_GROUPS: List[Tuple[str, type, str]] = [
    ("llm", LLMConfig, "LLM tower (Qwen2.5)"),
    ("vision", VisionConfig, "vision tower (RADIO)"),
    ("connector", ConnectorConfig, "meta queries and connectors"),
    ("dit", DiTConfig, "DiT tower (SD3 MMDiT)"),
    ("model", PuffinModelConfig, "model composition (freezing, VAE)"),
    ("flow", FlowMatchingConfig, "flow matching"),
    ("data", DataConfig, "data"),
    ("parallel", ParallelConfig, "parallelism"),
    ("precision", PrecisionConfig, "precision"),
    ("training", TrainingConfig, "training"),
    ("checkpoint", CheckpointConfig, "checkpointing"),
    ("logging", LoggingConfig, "logging"),
    ("validation", ValidationConfig, "validation (held-out losses and camera errors while training)"),
    ("compile", CompileConfig, "speed: compiled layers"),
]


@dataclass
class PuffinArguments:
    """All configuration of one run, one dataclass per concern (the fields named as in ``CONFIG_GROUPS``)."""

    llm: LLMConfig
    vision: VisionConfig
    connector: ConnectorConfig
    dit: DiTConfig
    model: PuffinModelConfig
    flow: FlowMatchingConfig
    data: DataConfig
    parallel: ParallelConfig
    precision: PrecisionConfig
    training: TrainingConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    validation: ValidationConfig
    compile: CompileConfig
    dry_run: bool = False
    unknown: Sequence[str] = ()
    invalid: Sequence[InvalidValue] = ()
    flag_file_problems: Sequence[str] = ()

    @property
    def groups(self) -> Dict[str, Any]:
        """The per-concern configs by ``CONFIG_GROUPS`` name, in that order."""
        return {name: getattr(self, name) for name, _, _ in CONFIG_GROUPS}

    @property
    def world_size(self) -> int:
        if self.parallel.world_size is not None:
            return self.parallel.world_size
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def data_parallel_size(self) -> int:
        model_parallel = self.parallel.tensor_model_parallel_size * self.parallel.pipeline_model_parallel_size
        return max(1, self.world_size // max(1, model_parallel))

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        """Resolved flags by concern (stored beside checkpoints)."""
        return {name: {f.name: getattr(cfg, f.name) for f in fields(cfg)} for name, cfg in self.groups.items()}


def micro_batches_per_step(args: PuffinArguments) -> int:
    """Micro-batches per optimizer step from the flags (validated by :func:`~megatron_puffin.config.validate.check_step`)."""
    specs = args.data.streams()
    cycle = sum(spec.repeats for spec in specs)
    if args.training.micro_batches_per_step is not None:
        return args.training.micro_batches_per_step
    if args.training.global_batch_size is not None:
        cycle_samples = sum(spec.repeats * spec.micro_batch_size for spec in specs) * args.data_parallel_size
        return args.training.global_batch_size // cycle_samples * cycle
    return cycle
