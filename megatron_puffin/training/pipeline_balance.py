"""Per-stage work of a pipeline placement, and the placement that balances the stages, from the flags alone (for
``pretrain_puffin.py --dry-run``; no process group, no model).

Work per stage: the training FLOPs of one micro-batch of every task stream (:mod:`megatron_puffin.training.flops`,
3x forward for trainable towers, 1x for frozen ones) at the length limits of the flags (``--image-size`` square
images, ``--max-understanding-text-tokens`` / ``--max-generation-text-tokens`` text tokens), placed as the model
builds them (docs/puffin.md §1.0): the first stage runs the vision encoder and projector, the LLM decoder layers run
where they are placed, the last stage runs the output layer, the connectors, the MMDiT and the VAE encoder. A cycle
of the task streams weighs each task by its REPEATS. With 1F1B and enough micro-batches, a step lasts about as long
as the busiest stage's work, so the suggested placement minimises the largest per-stage sum over the cycle.

The activation memory of each stage under a placement is :mod:`megatron_puffin.training.activations`' estimate
(``pipeline_activation_bytes``), the one the dry run's memory table prints.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from megatron_puffin.config.validate_pipeline import (
    FIRST_FLAG,
    LAST_FLAG,
    placement_problems,
    stage_layer_counts,
)
from megatron_puffin.models.vae_config import load_vae_config, vae_downsample_factor
from megatron_puffin.tasks import GENERATION_TASKS, TASK_VARIANTS
from megatron_puffin.training import flops
from megatron_puffin.training.towers import trainable_towers

if TYPE_CHECKING:  # annotations only
    from megatron_puffin.config.arguments import PuffinArguments

UNDERSTANDING_WITH_IMAGE = ("image2text", "image2text_cross_view")


@dataclass(frozen=True)
class TaskWork:
    """Training FLOPs of one micro-batch of a task by placement."""

    task: str
    micro_batch_size: int
    repeats: int
    first: float
    """Vision encoder + projector (first stage)."""
    per_layer: float
    """One LLM decoder layer."""
    last: float
    """Output layer, connectors, MMDiT, VAE encoder (last stage)."""
    llm_tokens: int


# The VAE of Puffin (SD3-medium's AutoencoderKL), assumed for FLOPs when --vae-path/--vae-config is not readable
# here (a dry run on a login node): 8x downsampling, 16 latent channels.
SD3_VAE_CONFIG: Dict[str, Any] = {
    "in_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "mid_block_add_attention": True, "use_quant_conv": False,
}


def vae_config_for_estimate(args: PuffinArguments) -> Tuple[Dict[str, Any], bool]:
    """(the VAE config of the flags, True) or (:data:`SD3_VAE_CONFIG`, False) when it cannot be read here."""
    try:
        config = load_vae_config(args.model)
    except (OSError, ValueError):
        config = None
    return (config, True) if config is not None else (SD3_VAE_CONFIG, False)


def _sequence(args: PuffinArguments, task: str) -> Tuple[int, int]:
    """(LLM tokens, images through the vision tower) of one sample of ``task`` at the length limits."""
    size = args.data.image_size
    vision_tokens = args.vision.num_tokens(size, size)
    if task == "text2text":
        return args.data.max_understanding_text_tokens, 0
    if task in UNDERSTANDING_WITH_IMAGE:
        return args.data.max_understanding_text_tokens + vision_tokens, 1
    tokens = args.data.max_generation_text_tokens + args.connector.num_queries
    return (tokens + vision_tokens, 1) if task == "image2image" else (tokens, 0)


def task_work(args: PuffinArguments, task: str, micro_batch_size: int, repeats: int) -> TaskWork:
    """The FLOPs of one micro-batch of ``task`` split by pipeline placement (see the module docstring)."""
    b, size = micro_batch_size, args.data.image_size
    factor = {tower: 3.0 if on else 1.0 for tower, on in trainable_towers(args.model).items()}
    tokens, images = _sequence(args, task)
    generation = task in GENERATION_TASKS
    decoder = flops.llm_flops(args.llm, [tokens] * b, 0, tokens, False).total
    # The output layer runs on the supervised (answer) positions only: at most every text token of each sample.
    logit_rows = 0 if generation else b * min(args.data.max_understanding_text_tokens, tokens - 1)
    output = flops.llm_flops(args.llm, [tokens] * b, logit_rows, tokens, False).total - decoder
    sizes = [(size, size)] * (b * images)
    first = factor["vision"] * flops.vision_flops(args.vision, sizes).total
    first += factor["projector"] * flops.projector_flops(args.vision, args.llm.hidden_size, sizes).total
    last = factor["llm"] * output
    if generation:
        vae_config, _ = vae_config_for_estimate(args)
        side = size // vae_downsample_factor(vae_config)
        per_sample = 1 + (task in ("cam2image", "image2image")) + (task == "image2image")
        last += factor["queries"] * flops.query_flops(args.connector, args.llm.hidden_size, b).total
        last += factor["dit"] * flops.dit_flops(args.dit, [[(side, side)] * per_sample] * b,
                                                args.connector.num_queries, False).total
        last += flops.vae_encoder_flops(vae_config, [(size, size)] * (b * per_sample)).total
    return TaskWork(
        task=task, micro_batch_size=b, repeats=repeats, first=first,
        per_layer=factor["llm"] * decoder / args.llm.num_layers, last=last, llm_tokens=tokens,
    )


def workload(args: PuffinArguments) -> List[TaskWork]:
    """One :class:`TaskWork` per task stream (stream variants count as their loss task)."""
    return [task_work(args, TASK_VARIANTS[s.task], s.micro_batch_size, s.repeats) for s in args.data.streams()]


def stage_flops(work: List[TaskWork], layers: List[int]) -> List[float]:
    """Training FLOPs of one task-stream cycle on each stage for ``layers`` decoder layers per stage."""
    last = len(layers) - 1
    totals = []
    for stage, count in enumerate(layers):
        total = 0.0
        for task in work:
            cost = task.per_layer * count + (task.first if stage == 0 else 0.0) + (task.last if stage == last else 0.0)
            total += task.repeats * cost
        totals.append(total)
    return totals


def imbalance(totals: List[float]) -> float:
    """Busiest stage over the mean stage (1.0: perfectly balanced)."""
    return max(totals) / (sum(totals) / len(totals)) if sum(totals) else 1.0


def suggest_placement(args: PuffinArguments, work: List[TaskWork]) -> Tuple[Optional[int], Optional[int], List[int]]:
    """(first-stage layers, last-stage layers, layers per stage) minimising the busiest stage's work; ``None`` where
    megatron-core's even share is the same count."""
    pp, num_layers = args.parallel.pipeline_model_parallel_size, args.llm.num_layers
    best: Optional[Tuple[float, int, int]] = None
    for first in range(1, num_layers + 1):
        for last in range(1, num_layers + 1 - first):
            if placement_problems(num_layers, pp, first, last):
                continue
            cost = max(stage_flops(work, stage_layer_counts(num_layers, pp, first, last)))
            if best is None or cost < best[0] * (1 - 1e-12):
                best = (cost, first, last)
    if best is None:
        return None, None, stage_layer_counts(num_layers, pp)
    layers = stage_layer_counts(num_layers, pp, best[1], best[2])
    if num_layers % pp == 0 and layers == stage_layer_counts(num_layers, pp):
        return None, None, layers
    return best[1], best[2], layers


# --- the dry-run lines --------------------------------------------------------------------------------------------
def _placement_text(first: Optional[int], last: Optional[int]) -> str:
    flags = [f"{flag} {value}" for flag, value in ((FIRST_FLAG, first), (LAST_FLAG, last)) if value is not None]
    return " ".join(flags) if flags else "the even split (no flag)"


def _flops_line(name: str, layers: List[int], totals: List[float]) -> str:
    stages = ", ".join(f"{count} layers {flops / 1e12:.1f}" for count, flops in zip(layers, totals))
    return f"  {name}: {stages} TFLOP; busiest/mean {imbalance(totals):.2f}"


def balance_lines(args: PuffinArguments) -> List[str]:
    """Per-task FLOPs per stage, the current placement's balance and the suggested one."""
    try:
        work = workload(args)
    except (ValueError, KeyError, OSError) as error:  # malformed streams are reported by validation
        return [f"pipeline balance: not estimated ({error})"]
    parallel = args.parallel
    pp = parallel.pipeline_model_parallel_size
    current = stage_layer_counts(args.llm.num_layers, pp, parallel.decoder_first_pipeline_num_layers,
                                 parallel.decoder_last_pipeline_num_layers)
    lines = [] if vae_config_for_estimate(args)[1] else [
        "pipeline FLOPs: the VAE config is not readable here; SD3-medium's VAE (8x, 16 channels) assumed"]
    lines += ["training FLOPs per micro-batch at the length limits (TFLOP; first stage: vision, per LLM layer, "
             "last stage: output layer + connectors + MMDiT + VAE):"]
    for task in work:
        per_stage = stage_flops([dataclasses.replace(task, repeats=1)], current)
        lines.append(f"  {task.task} x{task.micro_batch_size} (repeats {task.repeats}): first {task.first / 1e12:.2f}, "
                     f"per LLM layer {task.per_layer / 1e12:.3f}, last {task.last / 1e12:.2f}; per stage now "
                     + ", ".join(f"{f / 1e12:.2f}" for f in per_stage))
    if pp == 1:
        return lines
    lines.append("pipeline balance over one task-stream cycle (per stage: LLM layers, training TFLOP):")
    lines.append(_flops_line(f"now ({_placement_text(parallel.decoder_first_pipeline_num_layers, parallel.decoder_last_pipeline_num_layers)})",
                             current, stage_flops(work, current)))
    first, last, best = suggest_placement(args, work)
    totals = stage_flops(work, best)
    lines.append(_flops_line(f"suggested: {_placement_text(first, last)}", best, totals))
    fixed = stage_flops(work, [0] * (pp - 1) + [1])[-1] - sum(t.repeats * t.per_layer for t in work)
    if fixed > sum(totals) / pp * 1.05:
        lines.append(f"  the last stage's own towers (output layer, connectors, MMDiT, VAE: {fixed / 1e12:.1f} TFLOP) "
                     f"exceed a balanced share ({sum(totals) / pp / 1e12:.1f}) with any LLM placement: fewer pipeline "
                     "stages (or more tensor parallelism) balance this mix better")
    return lines
