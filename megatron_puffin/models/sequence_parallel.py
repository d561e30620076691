"""Sequence parallelism (``--sequence-parallel``) for every tower: the local norm, and where sequences are split.

Megatron sequence parallelism keeps the activations *between* tensor-parallel regions (norms, residual adds,
dropout) split along the sequence over the TP group instead of replicated: a column-parallel linear all-gathers
its ``[s/TP, b, h]`` input, a row-parallel linear reduce-scatters its output back to ``[s/TP, b, h]``. What a
model has to do is enter and leave that layout (docs/parallelism.md, "Sequence parallelism"):

* **enter** where a tower's tokens reach its first TP block: :func:`split_sequence` pads the sequence to a multiple
  of TP (pads at the end, outside every loss and attention) and scatters it
  (``tensor_parallel.scatter_to_sequence_parallel_region``);
* **leave** where replicated code reads the tokens again: :func:`gather_sequence` all-gathers and drops the pads.
  Its backward *splits* the gradient (``tensor_parallel_output_grad=False``), right because everything after it
  is replicated compute whose gradients are identical on every TP rank.

Parameters applied to sequence shards (norm weights, row-parallel biases) get only their shard's gradient; they
carry ``param.sequence_parallel = True`` and megatron-core's ``finalize_model_grads`` all-reduces them over TP.
megatron-core's ``WrappedTorchNorm`` refuses sequence parallelism, so the local specs use :class:`LocalNorm`,
which builds the same torch module (same checkpoint entries) and marks its weights.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterator, Optional, Tuple

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_config import TransformerConfig

NORM_CLASSES = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class LocalNorm:
    """Pure-torch LayerNorm/RMSNorm for the local specs (megatron-core's norm constructor signature).

    Returns a ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` (``config.normalization``), exactly what
    ``WrappedTorchNorm`` returns, but allowed under sequence parallelism: every parameter gets
    ``sequence_parallel = config.sequence_parallel``, the mark megatron-core's DDP/``finalize_model_grads`` reads
    to all-reduce its gradient over the tensor-parallel group (each rank saw only its sequence shard).
    """

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma or config.persist_layer_norm or config.memory_efficient_layer_norm:
            raise ValueError("the local norm supports neither zero-centred gamma, persistent nor memory-efficient "
                             "layer norm; use --transformer-impl transformer_engine")
        norm_class = NORM_CLASSES.get(config.normalization)
        if norm_class is None:
            raise ValueError(f"the local norm supports {', '.join(NORM_CLASSES)}, not {config.normalization}")
        norm = norm_class(hidden_size, eps=eps)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))
        return norm


def sequence_parallel_size(config: TransformerConfig) -> int:
    """How many shards the sequence is split into under ``config``: TP with sequence parallelism, else 1."""
    return config.tensor_model_parallel_size if config.sequence_parallel else 1


def token_multiple(*multiples: int) -> int:
    """The least common multiple of sequence-length requirements (FP8 rows, sequence-parallel shards)."""
    return math.lcm(*[max(1, m) for m in multiples])


def with_sequence_parallel(config: Optional[TransformerConfig], enabled: bool) -> Optional[TransformerConfig]:
    """``config`` with ``sequence_parallel`` set to ``enabled`` (a shallow copy when it changes; None stays None).

    A copy, not ``dataclasses.replace``: re-running ``TransformerConfig.__post_init__`` would redo its derived
    fields (init methods are already bound)."""
    if config is None or bool(config.sequence_parallel) == enabled:
        return config
    if enabled and config.tensor_model_parallel_size == 1:
        return config  # megatron-core turns it off at TP=1 anyway (with a warning per layer)
    changed = copy.copy(config)
    changed.sequence_parallel = enabled
    return changed


def replicated_input_linear(linear: torch.nn.Module) -> torch.nn.Module:
    """Make a megatron-core ``ColumnParallelLinear`` built under a sequence-parallel config take a replicated input
    (not a sequence shard), as it does without sequence parallelism: it all-reduces its input gradient instead of
    all-gathering its input. For linears whose input is not ``[s, b, h]`` (the ViT's patch embedder)."""
    if getattr(linear, "sequence_parallel", False):
        linear.sequence_parallel = False
        tp_size = torch.distributed.get_world_size(linear.tp_group)
        linear.allreduce_dgrad = tp_size > 1 and not linear.disable_grad_reduce
    return linear


def pad_sequence(hidden_states: torch.Tensor, multiple: int) -> Tuple[torch.Tensor, int]:
    """``[s, b, h]`` padded with zeros at the end to a multiple of ``multiple``; returns (padded, number of pads)."""
    extra = -hidden_states.shape[0] % multiple
    if not extra:
        return hidden_states, 0
    pads = hidden_states.new_zeros((extra, *hidden_states.shape[1:]))
    return torch.cat([hidden_states, pads]), extra


def key_padding_mask(num_real: int, num_pads: int, batch_size: int, device: torch.device) -> Optional[torch.Tensor]:
    """``[b, 1, 1, s]`` bool, True on the ``num_pads`` keys at the end (megatron's convention); None without pads."""
    if not num_pads:
        return None
    mask = torch.zeros(batch_size, 1, 1, num_real + num_pads, dtype=torch.bool, device=device)
    mask[..., num_real:] = True
    return mask


def split_sequence(hidden_states: torch.Tensor, config: TransformerConfig, group=None) -> Tuple[torch.Tensor, int]:
    """Enter the sequence-parallel layout: ``[s, b, h]`` -> ``[s'/TP, b, h]`` of this rank (``s'`` = s padded to a
    multiple of TP at the end); returns (shard, number of pads). The identity without sequence parallelism."""
    shards = sequence_parallel_size(config)
    if shards == 1:
        return hidden_states, 0
    padded, num_pads = pad_sequence(hidden_states, shards)
    return tensor_parallel.scatter_to_sequence_parallel_region(padded, group=group), num_pads


def gather_sequence(
    hidden_states: torch.Tensor, config: TransformerConfig, num_pads: int = 0, group=None
) -> torch.Tensor:
    """Leave the sequence-parallel layout: ``[s'/TP, b, h]`` -> ``[s' - num_pads, b, h]`` on every rank, for
    replicated code after it (its backward splits the gradient). The identity without sequence parallelism."""
    if sequence_parallel_size(config) == 1:
        return hidden_states
    gathered = tensor_parallel.gather_from_sequence_parallel_region(
        hidden_states, tensor_parallel_output_grad=False, group=group
    )
    return gathered[: gathered.shape[0] - num_pads] if num_pads else gathered


def sum_partial_gradients(tensor: torch.Tensor, config: TransformerConfig, group=None) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient over TP in backward, under sequence parallelism.

    For a replicated tensor that acts on sequence shards (the DiT's per-sample AdaLN shift/scale/gate): each rank's
    gradient covers its own tokens only, and their sum is the gradient of the whole sequence."""
    if sequence_parallel_size(config) == 1:
        return tensor
    return tensor_parallel.copy_to_tensor_model_parallel_region(tensor, group=group)


@contextlib.contextmanager
def sequence_parallel_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` as plain tensor parallelism inside the block (restored after, also on errors).

    Decoding with a KV cache feeds one token per step, which no TP size splits; the camera validation decodes with
    the training model. Every module's ``sequence_parallel`` flag (megatron-core's and Transformer Engine's linears
    read it at run time) and every tower's ``TransformerConfig`` (read by the towers' split/gather points) are set
    to False. Gradients of a step inside the block would not be reduced as sequence parallelism expects: use it
    for forward-only work."""
    saved = []
    for module in model.modules():
        if getattr(module, "sequence_parallel", None) is True:
            saved.append((module, "sequence_parallel"))
        config = getattr(module, "config", None)
        if isinstance(config, TransformerConfig) and config.sequence_parallel:
            saved.append((config, "sequence_parallel"))
    try:
        for owner, name in saved:
            setattr(owner, name, False)
        yield
    finally:
        for owner, name in saved:
            setattr(owner, name, True)
