"""Our query path against a plain-PyTorch reading of spec §1.6-1.7: SigLIP-style encoder layers (pre-LN with eps
1e-6, separate q/k/v/out projections, softmax scale 1/sqrt(head_dim), no mask, no positions, tanh-GELU MLP, no
final norm), ``llm2connector_k``, the token mean before ``projector_1`` and ``projector_2`` on the sequence. The
reference's state-dict names reach our module through the converter. Outputs, every parameter gradient and the
gradient into the LLM states are compared in fp32."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import megatron_puffin.distributed as dist_utils
from megatron_puffin.convert.connector import load_connector_state_dict, mcore_to_reference, reference_to_mcore
from megatron_puffin.models.connector import ConnectorConfig, build_query_conditioner

REL_TOLERANCE = 1e-5
LLM_HIDDEN = 24
CONFIG = ConnectorConfig(num_queries=6, hidden_size=32, num_layers=3, num_attention_heads=4, ffn_hidden_size=64,
                         pooled_projection_dim=12, joint_attention_dim=20)


class RefSelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, c = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        weights = torch.softmax(q @ k.transpose(-1, -2) / (c // self.heads) ** 0.5, dim=-1)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class RefMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class RefEncoderLayer(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.layer_norm1, self.self_attn = nn.LayerNorm(dim, eps=1e-6), RefSelfAttention(dim, heads)
        self.layer_norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), RefMLP(dim, hidden)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class RefConnector(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(
            RefEncoderLayer(config.hidden_size, config.num_attention_heads, config.ffn_hidden_size)
            for _ in range(config.num_layers)
        )

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class RefQueryPath(nn.Module):
    def __init__(self, config, llm_hidden):
        super().__init__()
        self.meta_queries = nn.Parameter(torch.randn(config.num_queries, llm_hidden) / llm_hidden ** 0.5)
        self.llm2connector_1 = nn.Linear(llm_hidden, config.hidden_size)
        self.llm2connector_2 = nn.Linear(llm_hidden, config.hidden_size)
        self.connector_1, self.connector_2 = RefConnector(config), RefConnector(config)
        self.projector_1 = nn.Linear(config.hidden_size, config.pooled_projection_dim)
        self.projector_2 = nn.Linear(config.hidden_size, config.joint_attention_dim)

    def forward(self, q):
        pooled = self.projector_1(self.connector_1(self.llm2connector_1(q)).mean(dim=1))
        return pooled, self.projector_2(self.connector_2(self.llm2connector_2(q)))


@pytest.fixture(scope="module")
def modules():
    dist_utils.initialize(seed=0)
    torch.manual_seed(7)
    reference = RefQueryPath(CONFIG, LLM_HIDDEN)
    with torch.no_grad():  # non-trivial norms and biases (the real init leaves them 1/0)
        for name, param in reference.named_parameters():
            if "layer_norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    ours = build_query_conditioner(CONFIG, LLM_HIDDEN)
    load_connector_state_dict(ours, reference_to_mcore(reference.state_dict(), CONFIG, LLM_HIDDEN))
    yield reference, ours
    dist_utils.destroy()


def _max_rel(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def _run(module, states):
    module.zero_grad(set_to_none=True)
    states = states.clone().requires_grad_(True)
    pooled, sequence = module(states)
    gen = torch.Generator().manual_seed(3)
    loss = (pooled * torch.randn(pooled.shape, generator=gen)).sum() + (
        sequence * torch.randn(sequence.shape, generator=gen)).sum()
    loss.backward()
    return pooled, sequence, states.grad


def test_outputs_and_gradients_match_the_reference(modules):
    reference, ours = modules
    states = torch.randn(3, CONFIG.num_queries, LLM_HIDDEN, generator=torch.Generator().manual_seed(11))
    ref_pooled, ref_sequence, ref_input_grad = _run(reference, states)
    pooled, sequence, input_grad = _run(ours, states)
    assert _max_rel(pooled, ref_pooled) < REL_TOLERANCE
    assert _max_rel(sequence, ref_sequence) < REL_TOLERANCE
    assert _max_rel(input_grad, ref_input_grad) < REL_TOLERANCE
    grads = {name: param.grad for name, param in ours.named_parameters() if param.grad is not None}
    grads["meta_queries"] = torch.zeros_like(ours.meta_queries)  # not on this path (used at the LLM input)
    mapped = mcore_to_reference(grads, CONFIG, LLM_HIDDEN)
    for name, param in reference.named_parameters():
        if name.endswith("k_proj.bias"):  # a key bias shifts every score of a query equally: gradient 0 + rounding
            assert mapped[name].abs().max() < 1e-6 and param.grad.abs().max() < 1e-6
        elif name != "meta_queries":
            assert _max_rel(mapped[name], param.grad) < REL_TOLERANCE, name


def test_meta_queries_are_the_reference_parameter(modules):
    reference, ours = modules
    assert torch.equal(ours.queries(2)[1], reference.meta_queries)
