"""One configuration dataclass per concern. Tower shapes live with their towers (``LLMConfig`` in
``megatron_puffin.models.llm``); this module holds parallelism, precision, training, checkpointing and logging."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ParallelConfig:
    """How the model is split over processes (data parallel size is derived: world / (TP x PP))."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size: splits attention heads, MLP and vocabulary of every tower over this many ranks."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size: splits the LLM decoder layers into this many stages."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism inside tensor-parallel regions (needs Transformer Engine norms)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (megatron-core DistributedOptimizer, ZeRO-1)."""
    world_size: Optional[int] = None
    """Total number of processes; default: torchrun's WORLD_SIZE (1 without torchrun). Set it with --dry-run."""
    distributed_timeout_minutes: int = 10
    """Timeout of collective operations."""


@dataclass
class PrecisionConfig:
    """Numeric formats and the layer implementation."""

    bf16: bool = False
    """Train in bfloat16 with fp32 master weights (the GPU default for Puffin)."""
    fp16: bool = False
    """Train in float16 with loss scaling."""
    fp8_format: Optional[str] = field(default=None, metadata={"choices": ["e4m3", "hybrid"]})
    """FP8 compute through Transformer Engine: e4m3 everywhere, or hybrid (e4m3 forward, e5m2 backward)."""
    fp8_recipe: str = field(default="delayed", metadata={"choices": ["delayed", "tensorwise", "mxfp8", "blockwise"]})
    """FP8 scaling recipe (Transformer Engine)."""
    transformer_impl: str = field(default="local", metadata={"choices": ["local", "transformer_engine"]})
    """Layer implementation: local (pure torch, runs anywhere) or transformer_engine (GPU; needed for FP8)."""


@dataclass
class TrainingConfig:
    """Batch sizes, optimiser, schedule and run length."""

    micro_batch_size: int = 1
    """Samples per micro-batch per data-parallel rank."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all data-parallel ranks; default micro-batch size x DP size."""
    seq_length: int = 1024
    """Maximum LLM sequence length (prompt + image tokens + answer / queries)."""
    train_iters: int = 1000
    """Number of optimizer steps."""
    lr: float = 1e-4
    """Peak learning rate (not multiplied by anything)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    lr_warmup_iters: int = 0
    """Linear warm-up steps from 0 to --lr."""
    weight_decay: float = 0.05
    """AdamW weight decay on tensors with two or more dimensions."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    seed: int = 1234
    """Seed of every random stream (initialisation, data order, noise, dropout)."""


@dataclass
class CheckpointConfig:
    """Where checkpoints go and come from."""

    save: Optional[str] = None
    """Directory to save distributed checkpoints to."""
    save_interval: Optional[int] = None
    """Save every this many optimizer steps."""
    load: Optional[str] = None
    """Resume everything (model, optimizer, scheduler, RNG, data position) from this run directory."""
    pretrained_checkpoint: Optional[str] = None
    """Start from these weights with a fresh optimizer (stage hand-off)."""
    keep_last_n: Optional[int] = None
    """Keep only the newest N checkpoints."""


@dataclass
class LoggingConfig:
    """Console and TensorBoard logging."""

    log_interval: int = 10
    """Print one log line every this many optimizer steps."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard event files here."""
    log_level: str = field(default="INFO", metadata={"choices": ["DEBUG", "INFO", "WARNING", "ERROR"]})
    """Logging level of rank 0 (other ranks log warnings and errors only)."""
