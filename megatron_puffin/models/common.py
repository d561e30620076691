"""What every tower's megatron-core ``TransformerConfig`` shares: layout, precision, fusions and recomputation."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch


def runtime_transformer_kwargs(
    tensor_model_parallel_size: int,
    pipeline_model_parallel_size: int,
    params_dtype: torch.dtype,
    fp8: Optional[str],
    fp8_recipe: str,
    recompute: bool,
    use_cpu_initialization: Optional[bool],
    fuse_bias_ops: bool = False,
) -> Dict[str, Any]:
    """``TransformerConfig`` arguments that depend on the run, not on a tower's shape.

    No dropout; fp32 softmax; no softmax/RoPE/norm/grad-accumulation fusions (they need CUDA extensions);
    ``fuse_bias_ops`` enables megatron's fused bias-activation and bias-dropout kernels on a GPU only; variable
    sequence lengths (micro-batches of different tasks differ in shape); ``recompute`` as full per-layer
    recomputation; CPU initialisation exactly when CUDA is absent unless ``use_cpu_initialization`` says otherwise.
    """
    on_gpu = torch.cuda.is_available()
    return dict(
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        fp8=fp8,
        fp8_recipe=fp8_recipe if fp8 else "delayed",
        use_cpu_initialization=(not on_gpu) if use_cpu_initialization is None else use_cpu_initialization,
        bias_activation_fusion=fuse_bias_ops and on_gpu,
        masked_softmax_fusion=False,
        bias_dropout_fusion=fuse_bias_ops and on_gpu,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # megatron rejects variable lengths with the default, even without MoE
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )
