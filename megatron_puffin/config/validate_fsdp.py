"""Validation of ``--use-torch-fsdp2`` (fully sharded data parallelism through megatron-core's
``TorchFullyShardedDataParallel``): the combinations it has been verified in, and the flags that would have no
effect or conflict with it. What each rule protects is in docs/parallelism.md ("Sharded data parallelism")."""
from __future__ import annotations

from typing import List

FLAG = "--use-torch-fsdp2"


def _layout_problems(parallel) -> List[str]:
    problems = []
    if parallel.pipeline_model_parallel_size > 1:
        problems.append(f"{FLAG} needs --pipeline-model-parallel-size 1 (got {parallel.pipeline_model_parallel_size}): "
                        "megatron-core's pipeline grad finalisation (tied-embedding sum across stages) reads DDP's "
                        "main_grad, which FSDP2 does not keep; use --use-distributed-optimizer with PP instead")
    if parallel.tensor_model_parallel_size > 1:
        problems.append(f"{FLAG} is verified at --tensor-model-parallel-size 1 only (got "
                        f"{parallel.tensor_model_parallel_size}); use --use-distributed-optimizer with TP instead")
    return problems


def _flag_problems(args) -> List[str]:
    parallel, problems = args.parallel, []
    if parallel.use_distributed_optimizer:
        problems.append(f"{FLAG} already shards the optimizer state over DP; drop --use-distributed-optimizer")
    for name, value in (("--overlap-grad-reduce", parallel.overlap_grad_reduce),
                        ("--overlap-param-gather", parallel.overlap_param_gather),
                        ("--ddp-bucket-size", parallel.ddp_bucket_size is not None)):
        if value:
            problems.append(f"{name} configures megatron-core's DDP buckets, which {FLAG} does not use (FSDP2 "
                            f"gathers and reduce-scatters per layer, overlapped by itself); drop {name}")
    if args.precision.fp16:
        problems.append(f"{FLAG} does not support --fp16 (megatron-core's loss scaler expects DDP gradients); use "
                        "--bf16")
    if args.compile.compile:
        problems.append(f"{FLAG} with --compile is not supported (FSDP2's per-layer hooks and in-place compiled "
                        "layers are untested together); drop one of them")
    return problems


def check_torch_fsdp2(args) -> List[str]:
    """``--use-torch-fsdp2`` against the layout, the optimizer and the DDP flags."""
    if not args.parallel.use_torch_fsdp2:
        return []
    return _layout_problems(args.parallel) + _flag_problems(args)


FSDP_VALIDATORS = [check_torch_fsdp2]
