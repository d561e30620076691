"""Data: the indexed multimodal format, tokenizers and chat templates, task encoders and task-stream batching."""
from megatron_puffin.data.format import DatasetFormatError, PuffinDataset, PuffinRecord, ShardWriter

__all__ = ["DatasetFormatError", "PuffinDataset", "PuffinRecord", "ShardWriter"]
