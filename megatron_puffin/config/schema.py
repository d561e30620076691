"""One configuration dataclass per concern. Tower shapes live with their towers (``LLMConfig`` in
``megatron_puffin.models.llm``); this module holds parallelism, precision, training, checkpointing, logging and
validation while training."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from megatron_puffin.models.fp8 import FP8_TOWERS


@dataclass
class ParallelConfig:
    """How the model is split over processes (data parallel size is derived: world / (TP x PP))."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size: splits attention heads, MLP and vocabulary of every tower over this many ranks."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size: splits the LLM decoder layers into this many stages."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: activations between tensor-parallel regions (norms, residuals) split along the
    sequence over the TP group, in every tower (needs --tensor-model-parallel-size > 1; docs/parallelism.md)."""
    decoder_first_pipeline_num_layers: Optional[int] = None
    """LLM decoder layers on the first pipeline stage, which also holds the vision encoder (megatron-core's
    num_layers_in_first_pipeline_stage). Default: an even split; `--dry-run` suggests a balanced placement."""
    decoder_last_pipeline_num_layers: Optional[int] = None
    """LLM decoder layers on the last pipeline stage, which also holds the connectors and the MMDiT (megatron-core's
    num_layers_in_last_pipeline_stage). The layers left over are split evenly over the middle stages."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (megatron-core DistributedOptimizer, ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient all-reduce (reduce-scatter with --use-distributed-optimizer) with the
    backward pass, bucket by bucket (megatron-core DistributedDataParallelConfig.overlap_grad_reduce)."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward pass (needs
    --use-distributed-optimizer; megatron-core DistributedDataParallelConfig.overlap_param_gather)."""
    ddp_bucket_size: Optional[int] = None
    """Parameters per data-parallel communication bucket (default: megatron-core's, max(40e6, 1e6 x DP) when
    overlapping, one bucket per gradient buffer otherwise)."""
    use_torch_fsdp2: bool = False
    """Fully sharded data parallelism (ZeRO-3: parameters, gradients and optimizer state sharded over DP) through
    megatron-core's TorchFullyShardedDataParallel (PyTorch FSDP2); frozen towers keep no gradients or optimizer
    state. Needs TP 1 and PP 1, fp32 or bf16, and no --use-distributed-optimizer (docs/parallelism.md)."""
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
    """FP8 scaling recipe (Transformer Engine); mxfp8 needs a Blackwell GPU."""
    fp8_tower: List[str] = field(default_factory=lambda: list(FP8_TOWERS))
    """A tower whose GEMMs run in FP8 when --fp8-format is given: llm, vision, connector or dit (repeat the flag;
    default all four). The others run in bf16."""
    transformer_impl: str = field(default="local", metadata={"choices": ["local", "transformer_engine"]})
    """Layer implementation: local (pure torch, runs anywhere) or transformer_engine (GPU; needed for FP8)."""


@dataclass
class TrainingConfig:
    """Batch sizes, optimiser, schedule and run length, and the host process's memory reuse."""

    micro_batch_size: int = 1
    """Samples per micro-batch per data-parallel rank, for every --task-stream that gives no MICRO_BATCH_SIZE."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step over all data-parallel ranks; must be a whole number of task-stream cycles (one
    cycle = sum over streams of REPEATS x MICRO_BATCH_SIZE x DP). Default: one cycle (see --micro-batches-per-step)."""
    micro_batches_per_step: Optional[int] = None
    """Task micro-batches accumulated into one optimizer step. Default: one cycle of the task streams (the sum of
    their REPEATS). 1 reproduces the reference's stage 4 (one task per step)."""
    train_iters: int = 1000
    """Number of optimizer steps."""
    lr: float = 1e-4
    """Peak learning rate (not multiplied by anything)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    lr_warmup_iters: int = 0
    """Linear warm-up optimizer steps from --lr-warmup-init to --lr."""
    lr_warmup_init: float = 0.0
    """Learning rate at the start of the warm-up (the reference: 1e-5 x lr)."""
    lr_decay_style: str = field(default="cosine", metadata={"choices": ["constant", "linear", "cosine"]})
    """Decay after the warm-up, down to --min-lr at --lr-decay-iters."""
    lr_decay_iters: Optional[int] = None
    """Optimizer steps over which the learning rate decays (default: --train-iters)."""
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
    max_consecutive_skipped_steps: int = 10
    """A step whose loss or gradient norm is not finite is skipped and counted; stop the run with an error after
    this many in a row."""
    exit_duration_in_mins: Optional[float] = None
    """Save a checkpoint and exit cleanly once the run has lasted this long (e.g. a little below a job's limit)."""
    exit_interval: Optional[int] = None
    """Save a checkpoint and exit cleanly after the optimizer step whose number is a multiple of this."""
    host_malloc_cache: bool = False
    """CPU training on glibc: keep freed host memory in the process for the next micro-batch (no mmap of large
    blocks, no heap trimming; training.host_memory), as CUDA's caching allocator does on a GPU: the step's buffers
    stop being faulted in again every micro-batch; resident memory stays at its peak. No effect on a GPU run."""


@dataclass
class CheckpointConfig:
    """Where checkpoints go and come from."""

    save: Optional[str] = None
    """Directory to save distributed checkpoints to."""
    save_interval: Optional[int] = None
    """Save every this many optimizer steps."""
    load: Optional[str] = None
    """Resume everything (model, optimizer, scheduler, data position, counters) from this run directory's latest
    complete checkpoint (or the iter_N directory named). Random draws are re-derived from --seed, the iteration and
    the rank, so there is no RNG state to restore."""
    pretrained_checkpoint: Optional[str] = None
    """Start from these weights with a fresh optimizer (stage hand-off)."""
    keep_last_n: Optional[int] = None
    """Keep only the newest N checkpoints of --save (older complete ones are deleted after a save)."""
    stage_name: Optional[str] = None
    """Name of this stage in the checkpoint lineage (e.g. stage2_sft); default: the directory name of --save."""
    llm_checkpoint: Optional[str] = None
    """Base weights of the LLM tower alone: a distributed checkpoint written by
    `tools/convert_checkpoint.py hf-to-mcore` (used when neither --load nor --pretrained-checkpoint supply it)."""
    vision_checkpoint: Optional[str] = None
    """Base weights of the vision tower (encoder + projector) alone, from `tools/convert_checkpoint.py radio-to-mcore`."""
    dit_checkpoint: Optional[str] = None
    """Base weights of the MMDiT alone, from `tools/convert_checkpoint.py sd3-to-mcore`."""
    overwrite_checkpoints: bool = False
    """Replace checkpoints already in --save that this run did not resume from (another run's, or ones newer
    than --load's): each new checkpoint replaces the old one of its iteration once complete, and the old run's
    later checkpoints are deleted when this run publishes its first one. Without it such a --save is refused."""
    override_opt_param_scheduler: bool = False
    """On --load, apply this run's learning-rate schedule flags (--lr, --min-lr, warm-up, decay style and
    length, --weight-decay) from the checkpoint's step on; without it a schedule that differs from the
    checkpoint's is refused."""

    def weight_sources(self) -> List[Tuple[str, Optional[str]]]:
        """(flag, path) of every checkpoint a run may start its weights from, unset ones included:
        --pretrained-checkpoint, then the tower checkpoints."""
        return [("--pretrained-checkpoint", self.pretrained_checkpoint), ("--llm-checkpoint", self.llm_checkpoint),
                ("--vision-checkpoint", self.vision_checkpoint), ("--dit-checkpoint", self.dit_checkpoint)]


@dataclass
class LoggingConfig:
    """Console and TensorBoard logging."""

    log_interval: int = 10
    """Print one log line every this many optimizer steps."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard event files here. A resumed run hides the events of the iterations after its checkpoint
    (TensorBoard's purge_step): the steps it computes again are shown once."""
    metrics_file: Optional[str] = None
    """Append each log interval's numbers as one JSON line to this file (full precision; for scripts and tests).
    At the start, lines of iterations after the loaded checkpoint's (all of them for a new run) and torn lines move
    to <file>.superseded."""
    log_memory: bool = True
    """Report peak accelerator memory (CUDA) or peak resident memory of the process (CPU) in the log line."""
    log_level: str = field(default="INFO", metadata={"choices": ["DEBUG", "INFO", "WARNING", "ERROR"]})
    """Logging level of rank 0 (other ranks log warnings and errors only). Below DEBUG, megatron-core's and torch's
    deprecation notices about their own internals (checkpointing on ShardedTensor, ...) are not printed."""


@dataclass
class ValidationConfig:
    """Held-out validation while training: per-task losses and, for understanding streams, camera errors."""

    valid_task_stream: List[str] = field(default_factory=list)
    """Repeatable. A validation stream, same syntax as --task-stream (TASK:PATH[,PATH...]:MICRO_BATCH_SIZE[:REPEATS])
    on held-out shards; one validation iteration is one cycle of these streams."""
    eval_interval: Optional[int] = None
    """Validate after every optimizer step whose number is a multiple of this (needs --valid-task-stream)."""
    eval_iters: int = 1
    """Validation iterations (cycles of the validation streams) per validation; the same samples every time."""
    eval_camera_samples: int = 8
    """Images per validation whose camera is decoded greedily from each image2text / image2text_thinking validation
    stream and scored against the ground truth (median roll / pitch / vFoV error); 0 disables."""
    eval_max_new_tokens: int = 96
    """Most tokens generated per image for the camera metric (a camera sentence needs about 40)."""
