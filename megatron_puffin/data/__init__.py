"""Data: the indexed multimodal format, tokenizers and chat templates, task encoders and task-stream batching.

Main entry points:
    * :class:`PuffinDataset` - random access to preprocessed shards (``dataset[i] -> dict`` of typed fields);
    * :class:`PuffinTokenizer` - HF tokenizer directory or SentencePiece model with the chat special tokens;
    * :class:`TaskEncoder` / :class:`Collator` - samples -> model inputs of one task, task-homogeneous batches;
    * :func:`build_data_loader` / :class:`PuffinDataLoader` - task streams with an exact, resumable order;
    * :class:`DataConfig` - the data flags.

See docs/data.md.
"""
from megatron_puffin.data.collate import Collator
from megatron_puffin.data.config import DataConfig, TaskStreamSpec, parse_task_stream, validate_data_config
from megatron_puffin.data.format import DatasetFormatError, PuffinDataset, PuffinRecord, ShardWriter
from megatron_puffin.data.loader import PuffinDataLoader, build_data_loader, build_streams
from megatron_puffin.data.task_encoders import EncodedSample, TaskEncoder, TaskEncoderConfig
from megatron_puffin.tasks import TASK_VARIANTS
from megatron_puffin.data.tokenizer import PuffinTokenizer

__all__ = [
    "Collator",
    "DataConfig",
    "DatasetFormatError",
    "EncodedSample",
    "PuffinDataLoader",
    "PuffinDataset",
    "PuffinRecord",
    "PuffinTokenizer",
    "ShardWriter",
    "TASK_VARIANTS",
    "TaskEncoder",
    "TaskEncoderConfig",
    "TaskStreamSpec",
    "build_data_loader",
    "build_streams",
    "parse_task_stream",
    "validate_data_config",
]
