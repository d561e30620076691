"""The local LLM spec's copy-free SwiGLU computes megatron-core's GLU bit for bit (forward and backward)."""
import pytest
import torch

import megatron_puffin.distributed as mpd
from helpers.llm import tiny_llm_config
from megatron_puffin.models.llm import build_llm
from megatron_puffin.models.llm.swiglu import SwiGLU
from megatron.core.transformer.mlp import MLP


@pytest.fixture()
def single_process():
    mpd.initialize(seed=0)
    yield mpd.process_groups()
    mpd.destroy()


def _llm_grads(model, input_ids, position_ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids, position_ids=position_ids)
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_local_llm_uses_swiglu_with_megatron_core_numbers(single_process):
    """The tiny LLM built with the local spec runs every MLP through SwiGLU; switching the same model back to
    megatron-core's GLU (config.use_te_activation_func off, the config's silu) gives identical logits and
    gradients of every parameter (torch.equal)."""
    model = build_llm(tiny_llm_config(num_layers=2), pg_collection=single_process)
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    assert len(mlps) == 2 and all(isinstance(m.activation_func, SwiGLU) for m in mlps)
    assert model.config.use_te_activation_func
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 250, (3, 17), generator=generator)
    position_ids = torch.arange(17).expand(3, 17)
    ours = _llm_grads(model, input_ids, position_ids)
    checkpoint_keys = set(model.sharded_state_dict())
    model.config.use_te_activation_func = False  # megatron-core's glu: chunk, silu, + glu_linear_offset, mul
    for m in mlps:
        del m.activation_func
        m.activation_func = m.config.activation_func
    megatron = _llm_grads(model, input_ids, position_ids)
    assert checkpoint_keys == set(model.sharded_state_dict())  # SwiGLU holds no state
    assert torch.equal(ours[0], megatron[0])
    assert ours[1].keys() == megatron[1].keys()
    for name in ours[1]:
        assert torch.equal(ours[1][name], megatron[1][name]), name


def test_swiglu_under_torch_compile_traces_the_plain_formulation():
    """Inside a compiled region SwiGLU is silu(gate) * up (no custom autograd.Function); same values."""
    module = SwiGLU(build_config())
    x = torch.randn(5, 2, 12)
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module.code)
        return graph_module.forward

    compiled = torch.compile(module, backend=backend, fullgraph=True)
    assert torch.equal(compiled(x), module(x))
    assert len(graphs) == 1 and "silu" in graphs[0] and "autograd_function" not in graphs[0], graphs


def build_config():
    return tiny_llm_config(num_layers=1).to_transformer_config()


def test_swiglu_rejects_a_config_it_would_not_reproduce():
    config = build_config()
    config.glu_linear_offset = 1.0
    with pytest.raises(ValueError, match="glu_linear_offset 0"):
        SwiGLU(config)
