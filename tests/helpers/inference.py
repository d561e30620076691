"""A tiny Puffin with informative weights for inference tests, and checkpoints of it in our training format."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch

from helpers.puffin import ROOT
from megatron_puffin.distributed import process_groups

LLM_WEIGHT_STD = 0.15
"""Random LLM matrices at this scale make greedy decoding produce varied tokens (a freshly initialised tiny LLM
repeats one token, which would hide position or cache bugs)."""
CONDITIONING_STD = 0.05
"""The zero-initialised projector_1/2 (docs/puffin.md §1.7) get weights, so the text conditioning reaches the MMDiT."""


def tiny_flags(paths: Dict[str, str], *extra: str) -> List[str]:
    """``pretrain_puffin.py`` flags of the tiny model (examples/tiny/model.args) with this dataset's files."""
    return [f"@{ROOT / 'examples' / 'tiny' / 'model.args'}", "--tokenizer", paths["tokenizer"],
            "--vae-config", paths["vae_config"], "--seed", "0", *extra]


def informative_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw the LLM's matrices (std :data:`LLM_WEIGHT_STD`) and the conditioning projections, seeded."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            std = LLM_WEIGHT_STD if name.startswith("llm.") and param.dim() > 1 else \
                CONDITIONING_STD if "projector_" in name else None
            if std is not None:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def build_tiny_model(paths: Dict[str, str], *extra: str, pre_process: bool = True, post_process: bool = True):
    """The tiny model built from :func:`tiny_flags` at the current parallel layout (needs ``initialize``), with
    informative weights (TP=1, PP=1 only: other layouts get theirs from a checkpoint). Returns (model, args)."""
    from megatron_puffin.config import parse_args
    from megatron_puffin.data import PuffinTokenizer
    from megatron_puffin.config.model import puffin_config
    from megatron_puffin.models.puffin import build_puffin

    args = parse_args(tiny_flags(paths, *extra), validate=False)
    args.model.image_pad_token_id = PuffinTokenizer(paths["tokenizer"]).image_pad_id
    torch.manual_seed(0)
    model = build_puffin(puffin_config(args), pre_process=pre_process, post_process=post_process,
                         pg_collection=process_groups())
    if pre_process and post_process:
        informative_weights(model)
    return model.eval(), args


def save_model_checkpoint(model, args, directory: Path, iteration: int = 1) -> Path:
    """``model`` as a whole-model checkpoint with the sidecar training writes (collective)."""
    from megatron_puffin.data import PuffinTokenizer
    from megatron_puffin.checkpointing import save_checkpoint

    metadata = {"kind": "puffin", "iteration": iteration, "towers": ["llm", "vision", "queries", "dit"],
                "args": args.to_dict(), "tokenizer": PuffinTokenizer(args.data.tokenizer).identity()}
    save_checkpoint(model.sharded_state_dict(), str(directory), metadata=metadata)
    return Path(directory)
