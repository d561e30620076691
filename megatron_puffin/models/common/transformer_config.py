"""What every tower's megatron-core ``TransformerConfig`` shares: layout, precision, fusions and recomputation;
the encoder towers' (ViT, connectors) common arguments; the tensor-parallel divisibility messages; and
:class:`CheckedConfig`, the ``check`` of the tower configs that validate themselves."""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Optional

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
        cuda_graph_scope=[],  # no CUDA graphs; megatron-core's default, "full", is the deprecated spelling and warns
    )


def encoder_transformer_kwargs(
    layernorm_epsilon: float,
    tensor_model_parallel_size: int,
    params_dtype: torch.dtype,
    fp8: Optional[str],
    fp8_recipe: str,
    recompute: bool,
    use_cpu_initialization: Optional[bool],
) -> dict:
    """``TransformerConfig`` arguments shared by the bidirectional pre-LN encoders (ViT and connectors).

    Biased linears, LayerNorm, no dropout, no fusions (the fused bias-GELU would change exact GELU), fp32
    softmax, pipeline size 1 (a tower is never split over pipeline stages), and ``recompute`` as full per-layer
    recomputation.
    """
    return dict(
        normalization="LayerNorm",
        layernorm_epsilon=layernorm_epsilon,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        **runtime_transformer_kwargs(
            tensor_model_parallel_size, 1, params_dtype, fp8, fp8_recipe, recompute, use_cpu_initialization
        ),
    )


def tensor_parallel_problems(tower: str, tensor_model_parallel_size: int, **sizes: int) -> List[str]:
    """Messages for every size (flag ``--{tower}-{name}``) the tensor-parallel size does not divide, naming the
    sizes that would divide all of them."""
    tp = tensor_model_parallel_size
    bad = {name: value for name, value in sizes.items() if value % tp}
    if not bad:
        return []
    smallest = min(sizes.values())
    valid = [d for d in range(1, smallest + 1) if all(v % d == 0 for v in sizes.values())]
    return [
        f"--{tower}-{name.replace('_', '-')} ({value}) must be divisible by --tensor-model-parallel-size ({tp}); "
        f"use a --tensor-model-parallel-size of {', '.join(map(str, valid))}"
        for name, value in bad.items()
    ]


class CheckedConfig:
    """Base of the tower configs with a ``validate(tensor_model_parallel_size) -> problems`` method: :meth:`check`
    raises them all at once, each naming its flag."""

    TOWER: ClassVar[str] = ""
    """The tower's name in the error: ``"DiT"`` gives ``invalid DiT configuration``."""

    def validate(self, tensor_model_parallel_size: int = 1) -> List[str]:
        """Every rule of the tower's flags as flag-naming messages (empty when valid); each config has its own."""
        raise NotImplementedError

    def check(self, tensor_model_parallel_size: int = 1) -> None:
        """Raise ``ValueError`` listing every problem of :meth:`validate`."""
        problems = self.validate(tensor_model_parallel_size)
        if problems:
            raise ValueError(f"invalid {self.TOWER} configuration:\n" + "\n".join(f"  - {p}" for p in problems))
