"""Query path on CPU: shapes, zero-initialised projectors, the reference initialisation, bidirectional attention
without position encoding, pipeline roles, recomputation, flags and validation."""
import argparse
import dataclasses
import math

import pytest
import torch

import megatron_puffin.distributed as dist_utils
from megatron_puffin.config.dataclass_args import add_dataclass_group, field_docstrings
from megatron_puffin.models.connector import ConnectorConfig, build_query_conditioner, get_connector_layer_spec

LLM_HIDDEN = 24


@pytest.fixture(scope="module", autouse=True)
def single_process():
    dist_utils.initialize(seed=0)
    yield
    dist_utils.destroy()


def _config(**overrides):
    values = dict(num_queries=6, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                  pooled_projection_dim=12, joint_attention_dim=20)
    values.update(overrides)
    return ConnectorConfig(**values)


def _randomise_projectors(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in (module.projector_1, module.projector_2):
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * 0.2)
            linear.bias.copy_(torch.randn(linear.bias.shape, generator=gen) * 0.2)


def _states(batch=3, seed=1):
    return torch.randn(batch, 6, LLM_HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_defaults_are_puffin_and_flags_are_generated():
    config = ConnectorConfig()
    assert (config.num_queries, config.hidden_size, config.num_layers, config.num_attention_heads,
            config.ffn_hidden_size, config.pooled_projection_dim, config.joint_attention_dim) == (
        64, 1024, 6, 16, 4096, 2048, 4096)
    docs = field_docstrings(ConnectorConfig)
    assert all(docs.get(f.name) for f in dataclasses.fields(ConnectorConfig))
    parser = argparse.ArgumentParser()
    add_dataclass_group(parser, ConnectorConfig, "connectors")
    args = parser.parse_args(["--connector-num-layers", "3", "--connector-recompute"])
    assert getattr(args, "ConnectorConfig.num_layers") == 3 and getattr(args, "ConnectorConfig.recompute")


def test_validation_lists_every_problem():
    problems = "\n".join(_config(num_attention_heads=5, hidden_size=32, ffn_hidden_size=66, num_queries=0).validate(2))
    assert "--connector-num-queries (0) must be at least 1" in problems
    problems = "\n".join(ConnectorConfig(num_attention_heads=6, hidden_size=32, ffn_hidden_size=66).validate(4))
    assert "--connector-hidden-size (32) must be divisible by --connector-num-attention-heads (6)" in problems
    assert "--connector-num-attention-heads (6) must be divisible by --tensor-model-parallel-size (4)" in problems
    assert "--connector-ffn-hidden-size (66) must be divisible" in problems and "size of 1, 2, 3, 6" in problems
    with pytest.raises(ValueError, match="invalid connector configuration"):
        ConnectorConfig(num_attention_heads=6).check(4)


def test_transformer_config_is_a_pre_ln_tanh_gelu_encoder():
    transformer = _config(recompute=True).to_transformer_config()
    assert transformer.layernorm_epsilon == 1e-6 and transformer.normalization == "LayerNorm"
    x = torch.linspace(-3, 3, 7)
    assert torch.equal(transformer.activation_func(x), torch.nn.functional.gelu(x, approximate="tanh"))
    assert transformer.recompute_granularity == "full" and transformer.pipeline_model_parallel_size == 1


def test_shapes_and_all_zero_conditioning_at_initialisation():
    module = build_query_conditioner(_config(), LLM_HIDDEN, pg_collection=dist_utils.process_groups())
    pooled, sequence = module(_states())
    assert pooled.shape == (3, 12) and sequence.shape == (3, 6, 20)
    assert not pooled.any() and not sequence.any()
    assert module.queries(4).shape == (4, 6, LLM_HIDDEN)


def test_reference_initialisation():
    torch.manual_seed(0)
    config = _config(hidden_size=64, ffn_hidden_size=256, num_queries=64)
    module = build_query_conditioner(config, 96, pg_collection=dist_utils.process_groups())
    assert abs(module.meta_queries.std().item() - 1 / math.sqrt(96)) < 0.002
    layer = module.connector_1.layers[0]
    for weight, fan_in, fan_out in ((layer.self_attention.linear_qkv.weight, 64, 64),
                                    (layer.self_attention.linear_proj.weight, 64, 64),
                                    (layer.mlp.linear_fc1.weight, 64, 256), (layer.mlp.linear_fc2.weight, 256, 64)):
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert bound * 0.95 < weight.abs().max() <= bound
    assert not layer.self_attention.linear_qkv.bias.any() and not layer.self_attention.linear_proj.bias.any()
    assert 0 < layer.mlp.linear_fc1.bias.std().item() < 2e-6
    assert torch.equal(layer.input_layernorm.weight, torch.ones(64)) and not layer.pre_mlp_layernorm.bias.any()
    assert not module.projector_2.weight.any() and not module.projector_2.bias.any()
    assert not torch.equal(module.connector_1.layers[0].mlp.linear_fc1.weight,
                           module.connector_2.layers[0].mlp.linear_fc1.weight)


def test_attention_is_bidirectional_and_order_only_matters_through_the_input():
    module = build_query_conditioner(_config(), LLM_HIDDEN, pg_collection=dist_utils.process_groups())
    _randomise_projectors(module)
    states = _states()
    pooled, sequence = module(states)
    changed = states.clone()
    changed[:, -1] += 1.0
    _, sequence_changed = module(changed)
    assert not torch.allclose(sequence_changed[:, 0], sequence[:, 0])  # the first token sees the last one
    permutation = torch.tensor([3, 0, 5, 1, 4, 2])
    pooled_perm, sequence_perm = module(states[:, permutation])
    torch.testing.assert_close(sequence_perm, sequence[:, permutation], rtol=1e-5, atol=1e-6)  # no positions
    torch.testing.assert_close(pooled_perm, pooled, rtol=1e-5, atol=1e-6)


def test_pipeline_roles_hold_their_parts():
    first = build_query_conditioner(_config(), LLM_HIDDEN, pre_process=True, post_process=False,
                                    pg_collection=dist_utils.process_groups())
    last = build_query_conditioner(_config(), LLM_HIDDEN, pre_process=False, post_process=True,
                                   pg_collection=dist_utils.process_groups())
    assert set(first.state_dict()) == {"meta_queries"}
    assert "meta_queries" not in last.state_dict() and "projector_1.weight" in last.state_dict()
    with pytest.raises(RuntimeError, match="needs post_process=True"):
        first(_states())
    with pytest.raises(RuntimeError, match="needs pre_process=True"):
        last.queries(2)


def _grads(module, states):
    module.zero_grad(set_to_none=True)
    states = states.clone().requires_grad_(True)
    pooled, sequence = module(states)
    (pooled.square().sum() + sequence.square().sum()).backward()
    grads = {name: param.grad.clone() for name, param in module.named_parameters() if param.grad is not None}
    return grads, states.grad


def test_recompute_reruns_each_layer_and_gives_the_same_gradients():
    module = build_query_conditioner(_config(), LLM_HIDDEN, pg_collection=dist_utils.process_groups()).train()
    _randomise_projectors(module)
    recomputed = build_query_conditioner(_config(recompute=True), LLM_HIDDEN,
                                         pg_collection=dist_utils.process_groups()).train()
    recomputed.load_state_dict(module.state_dict())
    calls = []
    recomputed.connector_2.layers[1].register_forward_hook(lambda *args: calls.append(1))
    expected, expected_input = _grads(module, _states())
    grads, input_grad = _grads(recomputed, _states())
    assert len(calls) == 2
    assert set(grads) == set(expected) and "meta_queries" not in grads
    # megatron-core's recomputation is reentrant (a nested backward per layer): sums may round differently, so the
    # tolerance is relative to each gradient's scale (an element near zero may differ by a few ulps of the largest).
    for name, grad in grads.items():
        _assert_close_to_scale(grad, expected[name], name)
    _assert_close_to_scale(input_grad, expected_input, "input")


def _assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


def test_transformer_engine_spec_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match=r"transformer_engine \(connectors\) needs Transformer Engine"):
        get_connector_layer_spec("transformer_engine")
