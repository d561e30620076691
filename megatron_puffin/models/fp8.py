"""FP8 per tower: which towers run their GEMMs in FP8, and the token counts FP8 GEMMs accept.

Every tower gets its own ``TransformerConfig.fp8`` (``--fp8-tower``, default all four): an FP8 tower runs its
Transformer Engine linears in FP8 inside its own ``fp8_autocast``; the others stay in bf16. A frozen tower chosen
for FP8 runs its forward GEMMs in FP8 as well (its weights stay bf16 and get no gradient, so only the forward
format matters). The VAE is never FP8 (a diffusers module, not Transformer Engine's).

FP8 GEMMs need the product of a tensor's leading dimensions divisible by a multiple (Transformer Engine checks
rows % 8 and columns % 16 for per-tensor scaling; MXFP8 scales blocks of 32). Token counts that vary per
micro-batch are padded where the layout makes pads free: the LLM sequence (right padding: pads after every real
token, causality keeps them out) and the MMDiT image stream (key-padded at the end of the joint sequence).

MXFP8 needs Blackwell (compute capability 10.0 or newer); it is refused before any work on older GPUs.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

FP8_TOWERS = ("llm", "vision", "connector", "dit")
MXFP8_MIN_CAPABILITY = (10, 0)


def fp8_token_multiple(fp8_recipe: str) -> int:
    """The multiple FP8 GEMM row counts must have under ``fp8_recipe`` (padding sequences to it suffices for any
    micro-batch size)."""
    return 32 if fp8_recipe == "mxfp8" else 16


def round_up(count: int, multiple: int) -> int:
    """``count`` rounded up to a multiple of ``multiple`` (``multiple`` <= 1: unchanged)."""
    return count if multiple <= 1 else -(-count // multiple) * multiple


def tower_fp8(fp8_format: Optional[str], fp8_towers: Sequence[str], tower: str) -> Optional[str]:
    """The FP8 format ``tower`` runs with (None: bf16)."""
    if tower not in FP8_TOWERS:
        raise ValueError(f"unknown tower {tower!r}; one of {', '.join(FP8_TOWERS)}")
    return fp8_format if fp8_format and tower in fp8_towers else None


def tower_precisions(dtype: str, fp8_format: Optional[str], fp8_recipe: str, fp8_towers: Sequence[str],
                     frozen: Dict[str, bool]) -> Dict[str, str]:
    """What each tower runs in, as the dry run reports it, e.g. ``{"llm": "FP8 hybrid (delayed) GEMMs, bf16
    elsewhere", "vision": "bf16, frozen"}``."""
    result = {}
    for tower in FP8_TOWERS:
        fp8 = tower_fp8(fp8_format, fp8_towers, tower)
        text = f"FP8 {fp8} ({fp8_recipe}) GEMMs, {dtype} elsewhere" if fp8 else dtype
        if frozen.get(tower):
            text += ", frozen layers (forward only)"
        result[tower] = text
    return result


def fp8_tower_problems(fp8_format: Optional[str], fp8_recipe: str, fp8_towers: Sequence[str],
                       compute_capability: Optional[Tuple[int, int]]) -> list:
    """Problems with the FP8 flags (for the one validation pass): unknown towers, MXFP8 before Blackwell.

    Args:
        compute_capability: of the GPU this process will use; None without CUDA (then FP8 is refused elsewhere).
    """
    problems = []
    unknown = [tower for tower in fp8_towers if tower not in FP8_TOWERS]
    if unknown:
        problems.append(f"--fp8-tower ({', '.join(unknown)}) must be among {', '.join(FP8_TOWERS)}")
    if fp8_format and fp8_recipe == "mxfp8" and compute_capability is not None \
            and tuple(compute_capability) < MXFP8_MIN_CAPABILITY:
        major, minor = compute_capability
        problems.append(
            f"--fp8-recipe mxfp8 needs a Blackwell GPU (compute capability >= 10.0), this one is {major}.{minor}; "
            "use --fp8-recipe delayed or tensorwise"
        )
    return problems
