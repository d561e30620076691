"""Parse flags (command line and ``@flagfile``\\ s) into the per-concern dataclasses, then validate once."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_puffin.config.dataclass_args import (
    FlagFileParser,
    InvalidValue,
    add_dataclass_group,
    build_dataclass,
)
from megatron_puffin.config.schema import (
    CheckpointConfig,
    LoggingConfig,
    ParallelConfig,
    PrecisionConfig,
    TrainingConfig,
)
from megatron_puffin.data.config import DataConfig
from megatron_puffin.diffusion.config import FlowMatchingConfig
from megatron_puffin.models.dit.config import DiTConfig
from megatron_puffin.models.connector.config import ConnectorConfig
from megatron_puffin.models.compile import CompileConfig
from megatron_puffin.models.llm.config import LLMConfig
from megatron_puffin.models.puffin_config import PuffinModelConfig
from megatron_puffin.models.vision.config import VisionConfig
from megatron_puffin.training.validation_config import ValidationConfig

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


def build_parser(prog: Optional[str] = None) -> FlagFileParser:
    """The parser of ``pretrain_puffin.py``: one group per configuration dataclass."""
    parser = FlagFileParser(
        prog=prog,
        description="Train Puffin on megatron-core. Flags may come from @flagfiles (# comments, several flags per "
        "line); later flags override earlier ones.",
    )
    for _, cls, title in CONFIG_GROUPS:
        add_dataclass_group(parser, cls, title)
    run = parser.add_argument_group("run")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the configuration, print the parallel layout, parameter counts and a memory estimate, "
        "and exit without creating process groups or models",
    )
    return parser


def with_default_micro_batch(spec: str, micro_batch_size: int) -> str:
    """``TASK:PATH`` (no MICRO_BATCH_SIZE) -> ``TASK:PATH:<--micro-batch-size>``; complete specs are unchanged."""
    task, separator, rest = spec.partition(":")
    if not separator or not rest or rest.rsplit(":", 1)[-1].lstrip("+-").isdigit():
        return spec
    return f"{spec}:{micro_batch_size}"


def parse_args(argv: Optional[Sequence[str]] = None, validate: bool = True) -> PuffinArguments:
    """Parse ``argv`` (default ``sys.argv[1:]``) and, unless ``validate=False``, run :func:`validate_args`,
    which raises one ``ValueError`` listing every mistake."""
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    invalid: List[InvalidValue] = []
    groups = {name: build_dataclass(cls, namespace, invalid) for name, cls, _ in CONFIG_GROUPS}
    args = PuffinArguments(**groups, dry_run=namespace.dry_run, unknown=tuple(unknown), invalid=tuple(invalid),
                           flag_file_problems=tuple(parser.flag_file_problems))
    args.data.task_stream = [
        with_default_micro_batch(spec, args.training.micro_batch_size) for spec in args.data.task_stream
    ]
    args.validation.valid_task_stream = [
        with_default_micro_batch(spec, args.training.micro_batch_size) for spec in args.validation.valid_task_stream
    ]
    if validate:
        from megatron_puffin.config.validate import validate_args

        validate_args(args)
    return args
