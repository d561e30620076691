"""The composed model's configuration (:class:`~megatron_puffin.models.puffin.PuffinConfig`) from parsed flags.

Kept out of :mod:`megatron_puffin.config`'s package face: it imports the model (torch, megatron-core), which parsing
and checking flags do not need."""
from __future__ import annotations

import torch

from megatron_puffin.config.arguments import PuffinArguments
from megatron_puffin.models.puffin import PuffinConfig


def puffin_config(args: PuffinArguments) -> PuffinConfig:
    """The model ``pretrain_puffin.py`` flags describe: the tower configs as parsed, the parameter dtype of
    --bf16 / --fp16 (else fp32), the Transformer Engine and FP8 choices, sequence parallelism and the pipeline
    placement of the LLM's layers."""
    precision = args.precision
    dtype = torch.bfloat16 if precision.bf16 else torch.float16 if precision.fp16 else torch.float32
    return PuffinConfig(
        llm=args.llm, vision=args.vision, connector=args.connector, dit=args.dit, flow=args.flow,
        model=args.model, seed=args.training.seed, params_dtype=dtype,
        transformer_impl=precision.transformer_impl, fp8=precision.fp8_format, fp8_recipe=precision.fp8_recipe,
        fp8_towers=tuple(precision.fp8_tower), sequence_parallel=args.parallel.sequence_parallel,
        llm_layers_in_first_stage=args.parallel.decoder_first_pipeline_num_layers,
        llm_layers_in_last_stage=args.parallel.decoder_last_pipeline_num_layers,
    )
