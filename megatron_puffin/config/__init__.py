"""Configuration: one dataclass per concern, argparse groups generated from them, one validation step."""
from megatron_puffin.config.arguments import CONFIG_GROUPS, PuffinArguments
from megatron_puffin.config.parser import build_parser, parse_args
from megatron_puffin.config.schema import (
    CheckpointConfig,
    LoggingConfig,
    ParallelConfig,
    PrecisionConfig,
    TrainingConfig,
)
from megatron_puffin.config.validate import VALIDATORS, ConfigError, validate_args

__all__ = [
    "CONFIG_GROUPS",
    "CheckpointConfig",
    "ConfigError",
    "LoggingConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "PuffinArguments",
    "TrainingConfig",
    "VALIDATORS",
    "build_parser",
    "parse_args",
    "validate_args",
]
