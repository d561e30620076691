"""Meta queries and the query path into the DiT's conditioning (docs/puffin.md §1.5-1.7).

    Q = last-layer LLM states at the meta-query positions                      [b, n_q, llm_hidden]
    pooled   = projector_1(mean_tokens(connector_1(llm2connector_1(Q))))     [b, pooled_projection_dim]
    sequence = projector_2(connector_2(llm2connector_2(Q)))                   [b, n_q, joint_attention_dim]

Placement over pipeline stages: the meta queries enter the LLM's input on the first stage; the LLM's last
states reach the connectors on the last stage. :class:`QueryConditioner` therefore holds ``meta_queries`` when
``pre_process`` and the rest when ``post_process`` (both with one stage). Parameter names are the reference's
(``meta_queries``, ``llm2connector_1``, ``connector_1.layers.{i}...``, ``projector_1``) except inside the
connector layers, which are megatron-core's (:mod:`megatron_puffin.convert.connector` maps them).

Sequence parallelism (``--sequence-parallel``): each connector splits its query sequence over TP on entry and
gathers it on exit; ``llm2connector_*`` and ``projector_*`` stay outside, replicated.

Tensor parallelism: the connector layers split heads and MLP columns (megatron-core column/row-parallel
linears). ``llm2connector_*`` and ``projector_*`` are small (1.5-4 M parameters) and replicated: their inputs and
outputs are whole on every rank, so their gradients agree across ranks without communication.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_size
from torch import nn

from megatron_puffin.models.common.build import resolve_device
from megatron_puffin.models.common.parallel_init import (
    init_slice_,
    normal_init,
    uniform_init,
    xavier_bound,
    zeros_init,
)
from megatron_puffin.models.connector.config import ConnectorConfig
from megatron_puffin.models.connector.connector_layer_specs import get_connector_layer_spec
from megatron_puffin.models.sequence_parallel import gather_sequence, key_padding_mask, split_sequence

FC_BIAS_STD = 1e-6  # reference init of the connector MLP biases (§1.6)


class ConnectorEncoder(TransformerBlock):
    """One connector (§1.6): pre-LN bidirectional encoder layers with residuals, no position encoding and no final
    norm; megatron-core's ``TransformerBlock`` with ``post_process=False``. Sequence-first ``[s, b, h]``; call it
    with ``attention_mask=None``.

    Args:
        config: megatron-core config from :meth:`ConnectorConfig.to_transformer_config`.
        spec: connector layer spec (:func:`get_connector_layer_spec`).
        pg_collection: the process groups (tensor parallelism splits the layers over ``pg_collection.tp``).
    """

    def __init__(self, config: TransformerConfig, spec: ModuleSpec, pg_collection: ProcessGroupCollection) -> None:
        super().__init__(config=config, spec=spec, pre_process=True, post_process=False, pg_collection=pg_collection)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation at every TP size: q/k/v/out and fc1/fc2 weights xavier-uniform (q, k, v
        as separate square matrices), attention biases 0, MLP biases N(0, 1e-6^2), LayerNorms (1, 0)."""
        hidden, ffn = self.config.hidden_size, self.config.ffn_hidden_size
        tp_group = self.pg_collection.tp
        for layer in self.layers:
            attention, mlp = layer.self_attention, layer.mlp
            init_slice_(attention.linear_qkv.weight, uniform_init(xavier_bound(hidden, hidden)), tp_group)
            init_slice_(attention.linear_qkv.bias, zeros_init(), tp_group)
            init_slice_(attention.linear_proj.weight, uniform_init(xavier_bound(hidden, hidden)), tp_group)
            init_slice_(attention.linear_proj.bias, zeros_init(), tp_group)
            init_slice_(mlp.linear_fc1.weight, uniform_init(xavier_bound(hidden, ffn)), tp_group)
            init_slice_(mlp.linear_fc1.bias, normal_init(FC_BIAS_STD), tp_group)
            init_slice_(mlp.linear_fc2.weight, uniform_init(xavier_bound(ffn, hidden)), tp_group)
            init_slice_(mlp.linear_fc2.bias, normal_init(FC_BIAS_STD), tp_group)
            for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)


class QueryConditioner(MegatronModule):
    """Meta queries (first pipeline stage) and the two connector branches (last pipeline stage).

    Args:
        connector_config: shapes of the query path.
        llm_hidden_size: the LLM's hidden size (meta-query width, ``llm2connector`` input).
        config: megatron-core config of the connector encoders.
        layer_spec: connector layer spec.
        pre_process: hold ``meta_queries`` (the stage that builds the LLM input).
        post_process: hold ``llm2connector_*``, ``connector_*`` and ``projector_*`` (the stage with the LLM's
            last layer).
        pg_collection: the process groups of the connector layers.
    """

    def __init__(
        self,
        connector_config: ConnectorConfig,
        llm_hidden_size: int,
        config: TransformerConfig,
        layer_spec: ModuleSpec,
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ) -> None:
        super().__init__(config=config)
        if post_process and pg_collection is None:
            raise ValueError("QueryConditioner with post_process=True needs pg_collection (the connectors' groups)")
        self.connector_config = connector_config
        self.llm_hidden_size = llm_hidden_size
        self.pre_process, self.post_process = pre_process, post_process
        hidden = connector_config.hidden_size
        if pre_process:
            self.meta_queries = nn.Parameter(torch.empty(connector_config.num_queries, llm_hidden_size))
            nn.init.normal_(self.meta_queries, std=1.0 / math.sqrt(llm_hidden_size))
        if post_process:
            self.llm2connector_1 = nn.Linear(llm_hidden_size, hidden)
            self.connector_1 = ConnectorEncoder(config, layer_spec, pg_collection)
            self.projector_1 = self._zero_linear(hidden, connector_config.pooled_projection_dim)
            self.llm2connector_2 = nn.Linear(llm_hidden_size, hidden)
            self.connector_2 = ConnectorEncoder(config, layer_spec, pg_collection)
            self.projector_2 = self._zero_linear(hidden, connector_config.joint_attention_dim)

    @staticmethod
    def _zero_linear(in_features: int, out_features: int) -> nn.Linear:
        """A linear with weight and bias zero (§1.7: the DiT starts from all-zero text conditioning)."""
        linear = nn.Linear(in_features, out_features)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        return linear

    def queries(self, batch_size: int) -> torch.Tensor:
        """The meta queries for a batch: ``[b, num_queries, llm_hidden]`` (a broadcast view; first stage)."""
        if not self.pre_process:
            raise RuntimeError("QueryConditioner.queries needs pre_process=True (the meta queries live there)")
        return self.meta_queries.unsqueeze(0).expand(batch_size, -1, -1)

    @staticmethod
    def _branch(project_in: nn.Linear, connector: ConnectorEncoder, query_states: torch.Tensor) -> torch.Tensor:
        """``llm2connector`` then the connector: ``[b, n, llm_hidden] -> [b, n, hidden]``."""
        hidden = project_in(query_states).transpose(0, 1).contiguous()  # [n, b, hidden]
        # Under sequence parallelism the queries are split over TP inside the connector. Validation asks for a
        # query count that TP divides (Transformer Engine's unmasked attention); the local SDPA masks any pads.
        num_queries, batch_size = hidden.shape[:2]
        hidden, num_pads = split_sequence(hidden, connector.config, group=connector.pg_collection.tp)
        mask = key_padding_mask(num_queries, num_pads, batch_size, hidden.device)
        hidden = connector(hidden, attention_mask=mask)
        return gather_sequence(hidden, connector.config, num_pads, group=connector.pg_collection.tp).transpose(0, 1)

    def forward(self, query_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The DiT's conditioning from the LLM's meta-query states (last stage).

        Args:
            query_states: ``[b, num_queries, llm_hidden]`` last-layer LLM states at the meta-query positions
                (cast to the parameter dtype).

        Returns:
            ``(pooled [b, pooled_projection_dim], sequence [b, num_queries, joint_attention_dim])``.
        """
        if not self.post_process:
            raise RuntimeError("QueryConditioner.forward needs post_process=True (the connectors live there)")
        query_states = query_states.to(self.llm2connector_1.weight.dtype)
        pooled = self.projector_1(self._branch(self.llm2connector_1, self.connector_1, query_states).mean(dim=1))
        sequence = self.projector_2(self._branch(self.llm2connector_2, self.connector_2, query_states))
        return pooled, sequence


def build_query_conditioner(
    config: ConnectorConfig,
    llm_hidden_size: int,
    pre_process: bool = True,
    post_process: bool = True,
    transformer_config: Optional[TransformerConfig] = None,
    transformer_impl: str = "local",
    params_dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    *,
    pg_collection: ProcessGroupCollection,
) -> QueryConditioner:
    """Build this pipeline stage's part of the query path for the tensor-parallel layout of ``pg_collection``.

    Args:
        config: shapes of the query path.
        llm_hidden_size: the LLM's hidden size.
        pre_process: hold the meta queries (first pipeline stage).
        post_process: hold the connectors and projections (last pipeline stage).
        transformer_config: megatron-core config of the connectors; default ``config.to_transformer_config`` at
            the TP size of ``pg_collection.tp`` in ``params_dtype``.
        transformer_impl: ``local`` or ``transformer_engine``.
        params_dtype: parameter dtype when ``transformer_config`` is not given (default fp32).
        device: where the module lives; default the current CUDA device when available, else the CPU.
        pg_collection: the process groups (from :func:`megatron_puffin.distributed.process_groups`).
    """
    device = resolve_device(device)
    if transformer_config is None:
        transformer_config = config.to_transformer_config(
            tensor_model_parallel_size=get_pg_size(pg_collection.tp),
            params_dtype=params_dtype or torch.float32,
            use_cpu_initialization=device.type == "cpu",
        )
    module = QueryConditioner(
        config, llm_hidden_size, transformer_config, get_connector_layer_spec(transformer_impl),
        pre_process=pre_process, post_process=post_process, pg_collection=pg_collection,
    )
    return module.to(device=device, dtype=transformer_config.params_dtype)
