"""The parallel layout, parameter counts per tower and a per-GPU memory estimate of a configuration, computed from
the flags alone (no process group, no model), for ``pretrain_puffin.py --dry-run``: the counts are
:mod:`megatron_puffin.training.parameter_counts`' (one row of the tower registry each), the activations
:mod:`megatron_puffin.training.activations`', the pipeline balance :mod:`megatron_puffin.training.pipeline_balance`'.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional

from megatron_puffin.config.validate_pipeline import stage_layer_counts
from megatron_puffin.models.connector.config import ConnectorConfig
from megatron_puffin.models.dit.config import DiTConfig
from megatron_puffin.models.fp8 import tower_precisions
from megatron_puffin.models.llm.config import LLMConfig
from megatron_puffin.models.puffin_config import PuffinModelConfig
from megatron_puffin.models.vision.config import VisionConfig
from megatron_puffin.training.activations import activation_lines, pipeline_activation_bytes
from megatron_puffin.training.parameter_counts import (
    BYTES_ADAM_FP32,
    BYTES_GRAD_FP32,
    BYTES_MASTER_FP32,
    GIB,
    TIED_COPY,
    Tower,
    weight_bytes,
)
from megatron_puffin.training.pipeline_balance import balance_lines
from megatron_puffin.training.towers import BY_NAME, parameter_towers

if TYPE_CHECKING:
    from megatron_puffin.config.arguments import PuffinArguments


@dataclass(frozen=True)
class TowerConfigs:
    """The shapes :func:`build_towers` reads (the same attribute names as parsed flags and ``PuffinConfig``)."""

    llm: LLMConfig
    vision: VisionConfig
    connector: ConnectorConfig
    dit: DiTConfig
    model: PuffinModelConfig


def build_towers(llm: LLMConfig, vision: VisionConfig, connector: ConnectorConfig, dit: DiTConfig,
                 model: PuffinModelConfig, tensor_model_parallel_size: int = 1) -> List[Tower]:
    """Every tower the composed model builds (the rows of :data:`~megatron_puffin.training.towers.TOWERS`), with
    its trainability under the freeze flags."""
    configs = TowerConfigs(llm, vision, connector, dit, model)
    return list(parameter_towers(configs, tensor_model_parallel_size))


def towers(args: PuffinArguments) -> List[Tower]:
    """:func:`build_towers` for parsed ``pretrain_puffin.py`` flags."""
    return build_towers(args.llm, args.vision, args.connector, args.dit, args.model,
                        args.parallel.tensor_model_parallel_size)


# --- memory -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageMemory:
    """Per-GPU bytes of one pipeline stage (any TP rank of it; activations excluded)."""

    stage: int
    parameters: int
    trainable: int
    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def optimizer_bytes(args: PuffinArguments) -> float:
    """Optimizer bytes per trainable parameter on one GPU: Adam moments (+ fp32 master weights in mixed
    precision), divided over data-parallel ranks by the distributed optimizer."""
    state = optimizer_bytes_unsharded(args)
    return state / args.data_parallel_size if args.parallel.use_distributed_optimizer else state


def optimizer_bytes_unsharded(args: PuffinArguments) -> int:
    """Adam moments (+ fp32 master weights in mixed precision) per trainable parameter, before any sharding."""
    return BYTES_ADAM_FP32 + (BYTES_MASTER_FP32 if weight_bytes(args) == 2 else 0)


def llm_stage_layers(args: PuffinArguments) -> List[int]:
    """LLM decoder layers on each pipeline stage (even, or as --decoder-first/last-pipeline-num-layers place them)."""
    p = args.parallel
    return stage_layer_counts(args.llm.num_layers, p.pipeline_model_parallel_size, p.decoder_first_pipeline_num_layers,
                              p.decoder_last_pipeline_num_layers)


def memory_estimate(args: PuffinArguments, tower_list: List[Tower]) -> List[StageMemory]:
    """Weights, gradients and optimizer state per GPU for every pipeline stage."""
    tp, pp = args.parallel.tensor_model_parallel_size, args.parallel.pipeline_model_parallel_size
    layers = llm_stage_layers(args)
    stages = []
    for stage in range(pp):
        share = (layers[stage], args.llm.num_layers)
        on_rank = [(t, t.rank_parameters(tp, stage == 0, stage == pp - 1, layer_share=share)) for t in tower_list]
        parameters = sum(n for _, n in on_rank)
        trainable = sum(n for t, n in on_rank if t.trainable)
        stages.append(StageMemory(
            stage, parameters, trainable, weights=parameters * weight_bytes(args),
            gradients=trainable * BYTES_GRAD_FP32, optimizer=trainable * optimizer_bytes(args),
        ))
    return stages


# --- the summary --------------------------------------------------------------------------------------------------
def _millions(count: Optional[int]) -> str:
    return "unknown" if count is None else f"{count / 1e6:.2f} M"


def _stage_contents(args: PuffinArguments) -> List[str]:
    pp, layers = args.parallel.pipeline_model_parallel_size, args.llm.num_layers
    first = "LLM embedding, vision encoder + projector, meta queries"
    last = "LLM final norm + output layer" + (" (tied copy)" if args.llm.tie_word_embeddings and pp > 1 else "")
    last += ", connectors + projections, MMDiT, VAE"
    if pp == 1:
        return [f"  stage 0: {first}, LLM layers 0-{layers - 1}, {last}"]
    counts = llm_stage_layers(args)
    starts = [sum(counts[:stage]) for stage in range(pp)]
    lines = [f"  stage 0: {first}, LLM layers 0-{counts[0] - 1}"]
    if pp > 2:
        lines.append(f"  stages 1-{pp - 2}: LLM layers, {counts[1]} per stage (layers {starts[1]}-{starts[-1] - 1})")
    lines.append(f"  stage {pp - 1}: LLM layers {starts[-1]}-{layers - 1}, {last}")
    return lines


def _tower_lines(tower_list: List[Tower]) -> List[str]:
    lines = ["parameters per tower (M = 1e6):"]
    for tower in tower_list:
        state = "trainable" if tower.trainable else "frozen"
        note = f"  ({tower.unknown})" if tower.unknown else ""
        lines.append(f"  {tower.name:<17} {_millions(tower.parameters):>12}  {state}{note}")
    known = [t for t in tower_list if t.parameters is not None]
    trainable = sum(t.parameters for t in known if t.trainable)
    frozen = sum(t.parameters for t in known if not t.trainable)
    unknown = ", ".join(t.name for t in tower_list if t.parameters is None)
    lines.append(f"  {'total':<17} {_millions(trainable + frozen):>12}: trainable {_millions(trainable)}, "
                 f"frozen {_millions(frozen)}" + (f" ({unknown} not included)" if unknown else ""))
    return lines


def _data_lines(args: PuffinArguments) -> List[str]:
    try:
        streams = args.data.streams()
    except ValueError:
        return []
    dp = args.data_parallel_size
    cycle = sum(s.repeats for s in streams)
    per_step = args.training.micro_batches_per_step or cycle
    listed = ", ".join(f"{s.task} {s.micro_batch_size}/GPU x{s.repeats}" for s in streams)
    line = f"data: {listed}; {per_step} micro-batch(es) per optimizer step (cycle {cycle})"
    if per_step % cycle == 0:
        samples = per_step // cycle * sum(s.repeats * s.micro_batch_size for s in streams) * dp
        line += f", {samples} samples per step over DP {dp}"
    else:
        line += ", samples per step by task: " + ", ".join(f"{s.task} {s.micro_batch_size * dp}" for s in streams)
    return [line]


def _schedule_lines(args: PuffinArguments) -> List[str]:
    t, c = args.training, args.checkpoint
    lines = [
        f"schedule: {t.train_iters} optimizer steps, lr {t.lr:g} (warm-up {t.lr_warmup_iters} steps from "
        f"{t.lr_warmup_init:g}, {t.lr_decay_style} to {t.min_lr:g} at step {t.lr_decay_iters or t.train_iters}), "
        f"AdamW betas ({t.adam_beta1:g}, {t.adam_beta2:g}) wd {t.weight_decay:g}, clip {t.clip_grad:g}"
    ]
    sources = [f"{flag} {value}" for flag, value in (
        ("--load", c.load), ("--pretrained-checkpoint", c.pretrained_checkpoint),
        ("--llm-checkpoint", c.llm_checkpoint), ("--vision-checkpoint", c.vision_checkpoint),
        ("--dit-checkpoint", c.dit_checkpoint), ("--vae-path", args.model.vae_path)) if value]
    lines.append("weights from: " + ("; ".join(sources) if sources else "random initialisation"))
    if c.save:
        keep = f", keep last {c.keep_last_n}" if c.keep_last_n else ""
        lines.append(f"save: {c.save} every {c.save_interval or 'end-of-run only'} steps{keep}")
    recompute = [(name, getattr(cfg, "recompute", None)) for name, cfg in (
        ("LLM", args.llm), ("vision encoder", args.vision), ("connectors", args.connector), ("MMDiT", args.dit))]
    lines.append("activation recompute: " + ", ".join(
        f"{name} {'no flag' if on is None else 'on' if on else 'off'}" for name, on in recompute))
    return lines


def _memory_lines(args: PuffinArguments, tower_list: List[Tower]) -> List[str]:
    stages = memory_estimate(args, tower_list)
    dp, distributed = args.data_parallel_size, args.parallel.use_distributed_optimizer
    state = "fp32 master + Adam moments 12 B" if weight_bytes(args) == 2 else "Adam moments 8 B"
    shard = f"sharded over DP {dp} (distributed optimizer)" if distributed else (
        "not sharded (no --use-distributed-optimizer)")
    if args.parallel.use_torch_fsdp2:
        shard = f"shown unsharded here; --use-torch-fsdp2 shards weights, gradients and state over DP {dp} (its row below)"
    vae = next((t for t in tower_list if t.name == "VAE" and t.unknown), None)
    lines = [
        f"memory per GPU, activations excluded: weights {weight_bytes(args)} B/param, gradients fp32 4 B/trainable "
        f"param, optimizer {state}/trainable param {shard}" + ("; VAE unknown, not included" if vae else "") + ":"
    ]
    groups: List[List[StageMemory]] = []
    for s in stages:  # consecutive identical stages (the middle of a pipeline) share a line
        if groups and (groups[-1][-1].parameters, groups[-1][-1].trainable) == (s.parameters, s.trainable):
            groups[-1].append(s)
        else:
            groups.append([s])
    for group in groups:
        s = group[0]
        name = f"stage {s.stage}" if len(group) == 1 else f"stages {s.stage}-{group[-1].stage}"
        lines.append(
            f"  {name}: {_millions(s.parameters)} params ({_millions(s.trainable)} trainable) per GPU; "
            f"weights {s.weights / GIB:.2f} GiB, gradients {s.gradients / GIB:.2f} GiB, optimizer "
            f"{s.optimizer / GIB:.2f} GiB, total {s.total / GIB:.2f} GiB"
        )
    if len(stages) > 1:
        peak = max(stages, key=lambda s: s.total)
        lines.append(f"  peak: stage {peak.stage}, {peak.total / GIB:.2f} GiB")
    return lines + _activation_lines(args, stages)


def _activation_lines(args: PuffinArguments, stages: List[StageMemory]) -> List[str]:
    """Activations per stage (training.activations' estimate) and the per-GPU total for each data-parallel sharding
    choice: plain DDP, ZeRO-1 (the distributed optimizer), and what ZeRO-2/3 would hold."""
    try:
        activations = pipeline_activation_bytes(args, llm_stage_layers(args))
    except (ValueError, KeyError, OSError):
        return []
    dp, full_state = args.data_parallel_size, optimizer_bytes_unsharded(args)
    choices = {
        "DDP (no sharding)": lambda m: m.weights + m.gradients + m.trainable * full_state,
        "ZeRO-1 (--use-distributed-optimizer)": lambda m: m.weights + m.gradients + m.trainable * full_state / dp,
    }
    fsdp2 = fsdp2_bytes(args) if args.parallel.pipeline_model_parallel_size == 1 else None
    if fsdp2 is not None:
        choices["ZeRO-3 (--use-torch-fsdp2)"] = lambda m: fsdp2
    lines = ["activations per GPU (estimate at the length limits, 1F1B micro-batches in flight; see "
             "training/activations.py): " + ", ".join(
                 f"stage {m.stage} {a / GIB:.2f} GiB" for m, a in zip(stages, activations)),
             f"total per GPU with activations, by data-parallel sharding over DP {dp} (frozen towers hold no "
             "gradients or optimizer state; FSDP2 also shards frozen weights and gathers the root unit and two "
             "layers at a time):"]
    for name, total in choices.items():
        per_stage = [total(m) + a for m, a in zip(stages, activations)]
        peak = max(range(len(per_stage)), key=per_stage.__getitem__)
        lines.append(f"  {name:<44} " + ", ".join(f"{t / GIB:.1f}" for t in per_stage)
                     + f" GiB per stage; peak {per_stage[peak] / GIB:.1f} GiB (stage {peak})")
    if fsdp2 is None:
        lines.append("  ZeRO-3 (--use-torch-fsdp2): needs --pipeline-model-parallel-size 1")
    return lines


# Tower parts made of FSDP2 units (one unit per layer) and how many layers each holds; every other part belongs to
# the root unit (training/data_parallel.PuffinTorchFSDP).
def _unit_layers(args: PuffinArguments) -> Dict[str, int]:
    return {"decoder layers": args.llm.num_layers, "blocks": args.vision.num_layers,
            "connectors": 2 * args.connector.num_layers, "joint blocks": args.dit.num_layers}


def fsdp2_bytes(args: PuffinArguments) -> float:
    """Per-GPU bytes of weights, gradients and optimizer state under ``--use-torch-fsdp2`` (PP 1): every weight,
    gradient and optimizer state sharded over DP, plus what is gathered at once: the root unit's weights (and its
    trainable gradients until the end of backward) and two layer units (the one running and the prefetched one)."""
    tp, dp, wb = args.parallel.tensor_model_parallel_size, args.data_parallel_size, weight_bytes(args)
    units = _unit_layers(args)
    root = root_trainable = largest_unit = total = trainable = 0
    for tower in towers(args):
        for part in tower.parts:
            if part.placement == TIED_COPY:
                continue
            count = part.params.per_rank(tp)
            total += count
            trainable += count if tower.trainable else 0
            layers = next((n for suffix, n in units.items() if part.name.endswith(suffix)), None)
            if layers:
                largest_unit = max(largest_unit, count // layers)
            else:
                root += count
                root_trainable += count if tower.trainable else 0
    sharded = (total * wb + trainable * (wb + optimizer_bytes_unsharded(args))) / dp
    gathered = (root + 2 * largest_unit) * wb * (1 - 1 / dp) + root_trainable * wb * (1 - 1 / dp)
    return sharded + gathered


def peak_gpu_bytes(args: PuffinArguments) -> float:
    """The largest per-GPU total (weights, gradients, optimizer state as configured, activations) over the
    stages: what has to fit one GPU."""
    stages = memory_estimate(args, towers(args))
    activations = pipeline_activation_bytes(args, llm_stage_layers(args))
    if args.parallel.use_torch_fsdp2:
        return fsdp2_bytes(args) + max(activations)
    return max(m.total + a for m, a in zip(stages, activations))


def _backend_lines(args: PuffinArguments) -> List[str]:
    """Whether the Transformer Engine a run asks for is usable here (a dry run does not require it)."""
    from megatron_puffin.optional_deps import TE_INSTALL_HINT, transformer_engine_error

    precision = args.precision
    if precision.transformer_impl != "transformer_engine" and not precision.fp8_format:
        return []
    reason = transformer_engine_error()
    if reason is None:
        return ["Transformer Engine: usable on this machine"]
    return [f"Transformer Engine: not usable on this machine ({reason}); the training job needs it on its GPU nodes "
            f"({TE_INSTALL_HINT})"]


def _precision_lines(args: PuffinArguments, dtype: str) -> List[str]:
    """Each tower's precision as it will run (FP8 only on the towers --fp8-tower names)."""
    precision = args.precision
    frozen = {name: not BY_NAME[name].trainable(args.model) for name in ("llm", "vision", "dit")}
    per_tower = tower_precisions(dtype, precision.fp8_format, precision.fp8_recipe, precision.fp8_tower, frozen)
    return ["precision per tower:"] + [f"  {tower}: {text}" for tower, text in per_tower.items()] + \
        [f"  vae: {dtype}, frozen (never FP8)"]


def describe(args: PuffinArguments) -> str:
    """A human-readable summary of layout, per-tower parameter counts, data, schedule and memory."""
    p, precision = args.parallel, args.precision
    dtype = "bf16" if precision.bf16 else "fp16" if precision.fp16 else "fp32"
    tower_list = towers(args)
    lines = [
        f"parallel layout: world size {args.world_size} = TP {p.tensor_model_parallel_size} x PP "
        f"{p.pipeline_model_parallel_size} x DP {args.data_parallel_size}; {dtype}, "
        f"{precision.transformer_impl} layers" + (f", FP8 {precision.fp8_format}" if precision.fp8_format else ""),
        *_backend_lines(args),
        *_stage_contents(args),
        *_precision_lines(args, dtype),
        *_tower_lines(tower_list),
        *_data_lines(args),
        *_schedule_lines(args),
        *balance_lines(args),
        *_memory_lines(args, tower_list),
        *activation_lines(args, weight_bytes(args)),
    ]
    return "\n".join(lines)
