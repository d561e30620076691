"""FP8 shapes: the GEMM widths and the token rows of every tower chosen by ``--fp8-tower``, checked before any work.

Transformer Engine's FP8 linears need a GEMM's input width (per tensor-parallel rank) to be a multiple of 16 and its
output width a multiple of 8 (MXFP8: 32 for both), and the rows (tokens) a multiple as well. Rows that vary per
micro-batch are padded by the towers (LLM sequence, ViT tokens, MMDiT image stream; ``megatron_puffin.models.fp8``);
the query stream (``--connector-num-queries`` tokens per sample, through the connectors and the MMDiT's text stream)
is not, so its length must be a multiple itself. Without this check a run would stop at its first micro-batch with
Transformer Engine's assertion.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, TYPE_CHECKING

from megatron_puffin.models.fp8 import fp8_token_multiple

if TYPE_CHECKING:  # for annotations only
    from megatron_puffin.config.arguments import PuffinArguments

#: (flag expression, per-rank width) of the GEMMs' input and output sides.
Widths = Tuple[List[Tuple[str, int]], List[Tuple[str, int]]]


def _per_rank(width: int, tp: int) -> int:
    """``width / tp``, or 0 (no FP8 problem reported) when TP does not divide it: the TP rules report that."""
    return width // tp if width % tp == 0 else 0


def fp8_gemm_width_multiples(fp8_recipe: str) -> Tuple[int, int]:
    """``(input width, output width)`` multiples of an FP8 GEMM under ``fp8_recipe``."""
    return (32, 32) if fp8_recipe == "mxfp8" else (16, 8)


def _llm_widths(llm, tp: int) -> Widths:
    kv = llm.kv_channels or llm.hidden_size // llm.num_attention_heads
    inputs = [("--hidden-size", llm.hidden_size),
              ("--num-attention-heads x --kv-channels / --tensor-model-parallel-size", _per_rank(llm.num_attention_heads * kv, tp)),
              ("--ffn-hidden-size / --tensor-model-parallel-size", _per_rank(llm.ffn_hidden_size, tp))]
    outputs = [("(--num-attention-heads + 2 x --num-query-groups) x --kv-channels / --tensor-model-parallel-size",
                _per_rank((llm.num_attention_heads + 2 * llm.num_query_groups) * kv, tp))]
    return inputs, outputs


def _encoder_widths(prefix: str, hidden: int, ffn: int, tp: int) -> Widths:
    inputs = [(f"--{prefix}-hidden-size", hidden),
              (f"--{prefix}-hidden-size / --tensor-model-parallel-size", _per_rank(hidden, tp)),
              (f"--{prefix}-ffn-hidden-size / --tensor-model-parallel-size", _per_rank(ffn, tp))]
    return inputs, [(f"--{prefix}-hidden-size / --tensor-model-parallel-size", _per_rank(hidden, tp))]


def _vision_widths(vision, llm_hidden: int, tp: int) -> Widths:
    inputs, outputs = _encoder_widths("vision", vision.hidden_size, vision.ffn_hidden_size, tp)
    inputs += [("--vision-fold-size^2 x --vision-hidden-size (projector)", vision.folded_hidden_size),
               ("--hidden-size / --tensor-model-parallel-size (projector)", _per_rank(llm_hidden, tp))]
    return inputs, outputs


def _dit_widths(dit, tp: int) -> Widths:
    hidden = "--dit-num-attention-heads x --dit-attention-head-dim"
    inputs = [(hidden, dit.hidden_size), (f"{hidden} / --tensor-model-parallel-size", _per_rank(dit.hidden_size, tp)),
              (f"4 x {hidden} / --tensor-model-parallel-size (feed-forward)", _per_rank(dit.ffn_hidden_size, tp))]
    return inputs, [(f"{hidden} / --tensor-model-parallel-size", _per_rank(dit.hidden_size, tp))]


def _width_problems(tower: str, widths: Widths, multiples: Tuple[int, int]) -> List[str]:
    problems = []
    for (side, entries), multiple in zip((("input", widths[0]), ("output", widths[1])), multiples):
        for expression, value in dict(entries).items():
            if value % multiple:
                problems.append(
                    f"--fp8-tower {tower}: {expression} ({value}) is an FP8 GEMM {side} width and must be a multiple "
                    f"of {multiple}; change the width or leave {tower} out of --fp8-tower"
                )
    return problems


def fp8_shape_problems(args: PuffinArguments, towers: Sequence[str]) -> List[str]:
    """Every width and row count of the FP8 towers that Transformer Engine's FP8 GEMMs cannot take.

    Args:
        args: parsed flags (tower configs, ``--fp8-recipe``, ``--tensor-model-parallel-size``).
        towers: the towers that run FP8 (empty without ``--fp8-format``).
    """
    tp = args.parallel.tensor_model_parallel_size
    if not towers or tp < 1:
        return []
    multiples = fp8_gemm_width_multiples(args.precision.fp8_recipe)
    widths = {
        "llm": lambda: _llm_widths(args.llm, tp),
        "vision": lambda: _vision_widths(args.vision, args.llm.hidden_size, tp),
        "connector": lambda: _encoder_widths("connector", args.connector.hidden_size,
                                             args.connector.ffn_hidden_size, tp),
        "dit": lambda: _dit_widths(args.dit, tp),
    }
    problems = [p for tower in towers if tower in widths for p in _width_problems(tower, widths[tower](), multiples)]
    query_towers = [tower for tower in ("connector", "dit") if tower in towers]
    rows = fp8_token_multiple(args.precision.fp8_recipe)
    queries = args.connector.num_queries
    if query_towers and queries % rows:
        lower = rows * (queries // rows)
        options = " or ".join(str(n) for n in (lower, lower + rows) if n)
        names = " and ".join(query_towers)
        problems.append(
            f"--connector-num-queries ({queries}) must be a multiple of {rows} when --fp8-tower includes {names} (the "
            f"query tokens are FP8 GEMM rows and are not padded); use {options}, or leave {names} out of --fp8-tower"
        )
    return problems
