"""Small helpers that let plain torch containers take part in megatron-core's distributed checkpointing."""
from __future__ import annotations

from typing import Optional, Tuple

from megatron.core.transformer.utils import sharded_state_dict_default
from torch import nn


class ShardedModuleList(nn.ModuleList):
    """``nn.ModuleList`` whose ``sharded_state_dict`` recurses into its children.

    megatron-core's default treats a module without ``sharded_state_dict`` as replicated and would save
    tensor-parallel shards inside a plain ``ModuleList`` as if they were full tensors. Keeping diffusers' names
    (``transformer_blocks.3``, ``to_out.0``, ``ff.net.2``) needs lists, so they carry this method.
    """

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: Tuple = (), metadata: Optional[dict] = None
    ) -> dict:
        """Union of the children's sharded state dicts under ``{prefix}{index}.``."""
        result = {}
        for index, module in enumerate(self):
            result.update(sharded_state_dict_default(module, f"{prefix}{index}.", sharded_offsets, metadata))
        return result
