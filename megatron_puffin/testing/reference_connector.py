"""A plain-PyTorch reading of Puffin's query path (docs/puffin.md §1.5-§1.7).

SigLIP-style encoder layers: pre-LN with eps 1e-6, separate q/k/v/out projections with bias, softmax scale
1/sqrt(head_dim), no mask, no positions, tanh-GELU MLP, no final norm. ``llm2connector_k`` in front, the token
mean before ``projector_1`` and ``projector_2`` on the sequence. Parameter names are the reference's state-dict
names (``meta_queries``, ``llm2connector_k.*``, ``connector_k.layers.i.*``, ``projector_k.*``), so
:func:`megatron_puffin.convert.connector.reference_to_mcore` reads them directly. Initialisation is PyTorch's
default (the reference zero-initialises ``projector_k``; weights here come from the caller).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_puffin.models.connector import ConnectorConfig


class ReferenceSelfAttention(nn.Module):
    """Bidirectional multi-head attention over all tokens, written out (no SDPA)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / (c // self.heads) ** 0.5, dim=-1)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class ReferenceMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ReferenceEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.layer_norm1, self.self_attn = nn.LayerNorm(dim, eps=eps), ReferenceSelfAttention(dim, heads)
        self.layer_norm2, self.mlp = nn.LayerNorm(dim, eps=eps), ReferenceMLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ReferenceConnector(nn.Module):
    """``connector_k``: a stack of encoder layers, no final norm."""

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            ReferenceEncoderLayer(config.hidden_size, config.num_attention_heads, config.ffn_hidden_size,
                                  config.layernorm_epsilon)
            for _ in range(config.num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ReferenceQueryPath(nn.Module):
    """Meta queries and both connector branches, under the reference's names."""

    def __init__(self, config: ConnectorConfig, llm_hidden: int) -> None:
        super().__init__()
        self.meta_queries = nn.Parameter(torch.randn(config.num_queries, llm_hidden) / llm_hidden ** 0.5)
        self.llm2connector_1 = nn.Linear(llm_hidden, config.hidden_size)
        self.llm2connector_2 = nn.Linear(llm_hidden, config.hidden_size)
        self.connector_1, self.connector_2 = ReferenceConnector(config), ReferenceConnector(config)
        self.projector_1 = nn.Linear(config.hidden_size, config.pooled_projection_dim)
        self.projector_2 = nn.Linear(config.hidden_size, config.joint_attention_dim)

    def forward(self, query_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[b, n, llm_hidden]`` query states -> (pooled ``[b, pooled_dim]``, sequence ``[b, n, joint_dim]``)."""
        pooled = self.projector_1(self.connector_1(self.llm2connector_1(query_states)).mean(dim=1))
        return pooled, self.projector_2(self.connector_2(self.llm2connector_2(query_states)))
