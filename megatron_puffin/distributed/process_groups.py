"""The process groups a model is built with, read once from megatron-core's ``parallel_state``.

Towers take their groups at construction (megatron-core's :class:`ProcessGroupCollection`, which its
``GPTModel``, ``TransformerBlock``, attention and linear layers accept as ``pg_collection`` / ``tp_group``); model
code never looks them up. The caller (training loop, inference loader, converters, tests) builds the collection
once, after :func:`megatron_puffin.distributed.initialize`, and passes it down.
"""
from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

MODEL_PROCESS_GROUPS = ("tp", "pp", "mp", "cp", "tp_cp", "embd", "pos_embd", "dp", "dp_cp")
"""What the towers and megatron-core's model classes read: tensor, pipeline, model, context parallel (size 1
here), the tied-embedding groups, and data parallel."""


def process_groups() -> ProcessGroupCollection:
    """This process's groups from the initialised ``parallel_state``.

    Raises:
        RuntimeError: megatron-core's parallel state is not initialised yet.
    """
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron-core's parallel state is not initialised; call "
            "megatron_puffin.distributed.initialize(tensor_model_parallel_size=...) before building a model"
        )
    return ProcessGroupCollection.use_mpu_process_groups(required_pgs=list(MODEL_PROCESS_GROUPS))
