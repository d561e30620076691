"""Our query path against a plain-PyTorch reading of docs/puffin.md §1.6-1.7 (``megatron_puffin.testing.reference_connector``:
SigLIP-style encoder layers, pre-LN with eps 1e-6, separate q/k/v/out projections, softmax scale 1/sqrt(head_dim),
no mask, no positions, tanh-GELU MLP, no final norm; ``llm2connector_k``, the token mean before ``projector_1`` and
``projector_2`` on the sequence). The reference's state-dict names reach our module through the converter.
Outputs, every parameter gradient and the gradient into the LLM states are compared in fp32."""
import pytest
import torch

import megatron_puffin.distributed as dist_utils
from megatron_puffin.convert.connector import load_connector_state_dict, mcore_to_reference, reference_to_mcore
from megatron_puffin.models.connector import ConnectorConfig, build_query_conditioner
from megatron_puffin.testing.reference_connector import ReferenceQueryPath

REL_TOLERANCE = 1e-5
LLM_HIDDEN = 24
CONFIG = ConnectorConfig(num_queries=6, hidden_size=32, num_layers=3, num_attention_heads=4, ffn_hidden_size=64,
                         pooled_projection_dim=12, joint_attention_dim=20)


@pytest.fixture(scope="module")
def modules():
    dist_utils.initialize(seed=0)
    torch.manual_seed(7)
    reference = ReferenceQueryPath(CONFIG, LLM_HIDDEN)
    with torch.no_grad():  # non-trivial norms and biases (the real init leaves them 1/0)
        for name, param in reference.named_parameters():
            if "layer_norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    ours = build_query_conditioner(CONFIG, LLM_HIDDEN, pg_collection=dist_utils.process_groups())
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
