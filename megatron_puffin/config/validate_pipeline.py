"""Validation of the pipeline placement (uneven LLM layers per stage) and of overlapped data-parallel communication.

Uneven placement follows megatron-core's rules for ``num_layers_in_first_pipeline_stage`` /
``num_layers_in_last_pipeline_stage``: the stages without an explicit count share the remaining decoder layers
evenly, at least one each. The layer counts per stage are computed by :func:`stage_layer_counts` (the dry run and
the balance suggestion use the same function).
"""
from __future__ import annotations

from typing import List, Optional, TYPE_CHECKING

if TYPE_CHECKING:  # for annotations only
    from megatron_puffin.config.arguments import PuffinArguments

FIRST_FLAG, LAST_FLAG = "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers"


def stage_layer_counts(num_layers: int, pipeline_model_parallel_size: int, first: Optional[int] = None,
                       last: Optional[int] = None) -> List[int]:
    """LLM decoder layers on each pipeline stage, as megatron-core's ``get_num_layers_to_build`` builds them.

    Args:
        num_layers: decoder layers of the LLM.
        pipeline_model_parallel_size: number of stages.
        first, last: explicit counts of the first/last stage (None: the even share).

    Raises:
        ValueError: when the layers cannot be placed (see :func:`placement_problems`).
    """
    problems = placement_problems(num_layers, pipeline_model_parallel_size, first, last)
    if problems:
        raise ValueError("; ".join(problems))
    pp = pipeline_model_parallel_size
    if pp == 1:
        return [num_layers]
    explicit = {0: first, pp - 1: last}
    rest = num_layers - sum(v for v in explicit.values() if v is not None)
    free = sum(1 for stage in range(pp) if explicit.get(stage) is None)
    share = rest // free if free else 0
    return [explicit[stage] if explicit.get(stage) is not None else share for stage in range(pp)]


def _placeable(num_layers: int, pp: int, first: int, last: int) -> bool:
    """Whether explicit first/last counts (both >= 1) leave a positive multiple of the middle stages."""
    rest, middle = num_layers - first - last, pp - 2
    return rest == 0 if middle == 0 else (rest >= middle and rest % middle == 0)


def _even_placements(num_layers: int, pp: int) -> List[str]:
    """A few valid (first, last) pairs to suggest in a message."""
    options = []
    for first in range(1, num_layers):
        last = num_layers - first if pp == 2 else first
        if last >= 1 and _placeable(num_layers, pp, first, last):
            options.append(f"{FIRST_FLAG} {first} {LAST_FLAG} {last}")
    return options[:: max(1, len(options) // 3)][:3]


def placement_problems(num_layers: int, pipeline_model_parallel_size: int, first: Optional[int],
                       last: Optional[int]) -> List[str]:
    """Why ``first``/``last`` cannot place ``num_layers`` decoder layers on the stages (empty when they can)."""
    pp = pipeline_model_parallel_size
    if first is None and last is None:
        return []
    if pp < 2:
        named = " and ".join(f for f, v in ((FIRST_FLAG, first), (LAST_FLAG, last)) if v is not None)
        return [f"{named} need(s) --pipeline-model-parallel-size 2 or more (got {pp}); drop it"]
    problems = [f"{flag} ({value}) must be at least 1"
                for flag, value in ((FIRST_FLAG, first), (LAST_FLAG, last)) if value is not None and value < 1]
    if problems:
        return problems
    rest = num_layers - (first or 0) - (last or 0)
    free = pp - (first is not None) - (last is not None)
    given = ", ".join(f"{flag} {value}" for flag, value in ((FIRST_FLAG, first), (LAST_FLAG, last))
                      if value is not None)
    if free == 0 and rest != 0:
        fix = "; ".join(_even_placements(num_layers, pp)) or "an even split (drop both flags)"
        return [f"{given} place {num_layers - rest} decoder layers on {pp} stages, but --num-layers is {num_layers}; "
                f"they must add up to it: try {fix}"]
    if free and (rest < free or rest % free):
        fix = "; ".join(_even_placements(num_layers, pp)) or "an even split (drop both flags)"
        return [f"{given} leave {rest} decoder layers (--num-layers {num_layers}) for the other {free} stage(s), "
                f"which need a positive multiple of {free}; try {fix}"]
    return []


def check_pipeline_placement(args: PuffinArguments) -> List[str]:
    """--decoder-first/last-pipeline-num-layers against --num-layers and --pipeline-model-parallel-size."""
    parallel, num_layers = args.parallel, args.llm.num_layers
    if parallel.pipeline_model_parallel_size < 1 or num_layers < 1:
        return []  # reported by check_positive
    return placement_problems(num_layers, parallel.pipeline_model_parallel_size,
                              parallel.decoder_first_pipeline_num_layers, parallel.decoder_last_pipeline_num_layers)


def check_overlap(args: PuffinArguments) -> List[str]:
    """--overlap-grad-reduce, --overlap-param-gather and --ddp-bucket-size only act in these combinations."""
    parallel, problems = args.parallel, []
    if parallel.overlap_param_gather and not parallel.use_distributed_optimizer:
        problems.append("--overlap-param-gather needs --use-distributed-optimizer (only the distributed optimizer "
                        "all-gathers parameters); add it or drop --overlap-param-gather")
    if parallel.overlap_param_gather and not parallel.overlap_grad_reduce:
        problems.append("--overlap-param-gather needs --overlap-grad-reduce (megatron-core overlaps the gather only "
                        "together with the reduce-scatter); add --overlap-grad-reduce")
    if parallel.ddp_bucket_size is not None:
        if parallel.ddp_bucket_size < 1:
            problems.append(f"--ddp-bucket-size ({parallel.ddp_bucket_size}) must be at least 1")
        elif not parallel.overlap_grad_reduce:
            problems.append(f"--ddp-bucket-size ({parallel.ddp_bucket_size}) has no effect without "
                            "--overlap-grad-reduce (megatron-core then uses one bucket per buffer); add "
                            "--overlap-grad-reduce or drop --ddp-bucket-size")
    return problems


PIPELINE_VALIDATORS = [check_pipeline_placement, check_overlap]
