"""The query path (connectors) and the vision tower at TP=2 against TP=1 in the same two gloo processes: outputs,
every parameter gradient and the gradient into the inputs, with and without activation recomputation, in eval
mode and with seeded train-mode CPE; the towers are whole and exact on either pipeline stage at PP=2; plus: a model built at TP=2 is the TP=1 model sharded (same initialisation
at every TP size), and both report their sharding to distributed checkpointing as their conversion tables say."""
import pytest
import torch

from helpers.multiprocess import run_distributed
from megatron_puffin.distributed import process_groups

REL_ERROR = 1e-5
LLM_HIDDEN = 24


def _configs():
    from megatron_puffin.models.connector import ConnectorConfig
    from megatron_puffin.models.vision import VisionConfig

    connector = ConnectorConfig(num_queries=6, hidden_size=32, num_layers=2, num_attention_heads=4,
                                ffn_hidden_size=64, pooled_projection_dim=12, joint_attention_dim=20)
    vision = VisionConfig(patch_size=4, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                          max_image_size=32, class_token_len=3, cpe_pos_dropout=0.3)
    return connector, vision


def _inputs():
    gen = torch.Generator().manual_seed(42)
    return torch.randn(3, 6, LLM_HIDDEN, generator=gen), torch.rand(2, 3, 16, 24, generator=gen) * 2 - 1


def _randomise_projectors(module):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for linear in (module.projector_1, module.projector_2):
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * 0.2)
            linear.bias.copy_(torch.randn(linear.bias.shape, generator=gen) * 0.2)


def _step(module, inputs, forward):
    """Outputs, parameter gradients and input gradient of a fixed random linear loss."""
    module.zero_grad(set_to_none=True)
    inputs = inputs.clone().requires_grad_(True)
    outputs = forward(module, inputs)
    gen = torch.Generator().manual_seed(3)
    sum(((out * torch.randn(out.shape, generator=gen)).sum() for out in outputs)).backward()
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}
    return [out.detach().clone() for out in outputs], grads, inputs.grad.clone()


def _connector_forward(module, states):
    return module(states)


def _vision_forward(module, images, seed=None):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return (module(images, generator=generator),)


def _vision_runs(model, images):
    return {"eval": _step(model.eval(), images, _vision_forward),
            "train": _step(model.train(), images, lambda m, x: _vision_forward(m, x, seed=11))}


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if not k.endswith("_extra_state")}


def test_towers_are_whole_on_any_pipeline_stage(tp_results):
    for rank in tp_results:
        pp = rank["pp2"]
        assert pp["layers"] == _configs()[0].num_layers
        for tower in ("connectors", "vision"):
            expected = tp_results[0]["tp1"][tower] if tower == "connectors" else tp_results[0]["tp1"]["vision"]["eval"]
            assert all(torch.equal(a, b) for a, b in zip(pp[tower], expected[0])), (pp["pp_rank"], tower)
    assert [r["pp2"]["pp_rank"] for r in tp_results] == [0, 1]


def _sharding_metadata(module):
    """(global shape, fragmentation per axis) of every tensor in the module's distributed-checkpoint view."""
    return {key: (tuple(value.global_shape), tuple(value.axis_fragmentations))
            for key, value in module.sharded_state_dict().items() if hasattr(value, "axis_fragmentations")}


def _tp_worker():
    import dataclasses

    from megatron_puffin.convert.connector import load_connector_state_dict, shard_connector_state_dict
    from megatron_puffin.convert.radio import load_vision_state_dict, shard_vision_state_dict
    from megatron_puffin.distributed import initialize
    from megatron_puffin.models.connector import build_query_conditioner
    from megatron_puffin.models.vision import build_vision

    connector_config, vision_config = _configs()
    states, images = _inputs()
    initialize(tensor_model_parallel_size=1, seed=0)
    groups = process_groups()
    connectors = build_query_conditioner(connector_config, LLM_HIDDEN, pg_collection=groups)
    vision = build_vision(vision_config, LLM_HIDDEN, pg_collection=groups)
    fresh = {"connectors": _state(connectors), "vision": _state(vision)}
    _randomise_projectors(connectors)
    results = {"tp1": {"connectors": _step(connectors, states, _connector_forward),
                       "vision": _vision_runs(vision, images)}, "fresh_tp1": fresh}
    full_connectors, full_vision = _state(connectors), _state(vision)

    context = initialize(tensor_model_parallel_size=2, seed=0)
    fresh_connectors = build_query_conditioner(connector_config, LLM_HIDDEN, pg_collection=process_groups())
    fresh_vision = build_vision(vision_config, LLM_HIDDEN, pg_collection=process_groups())
    results["fresh_tp2"] = {"connectors": _state(fresh_connectors), "vision": _state(fresh_vision)}
    rank = context.tp_rank
    connector_shard = shard_connector_state_dict(full_connectors, connector_config, LLM_HIDDEN, 2)[rank]
    for recompute in (False, True):
        module = build_query_conditioner(dataclasses.replace(connector_config, recompute=recompute), LLM_HIDDEN,
                                         pg_collection=process_groups())
        load_connector_state_dict(module, connector_shard)
        results[f"tp2_connectors_recompute={recompute}"] = _step(module.train(), states, _connector_forward)
    vision = build_vision(dataclasses.replace(vision_config, recompute=True), LLM_HIDDEN,
                          pg_collection=process_groups())
    load_vision_state_dict(vision, shard_vision_state_dict(full_vision, vision_config, LLM_HIDDEN, 2)[rank])
    results["tp2_vision"] = _vision_runs(vision, images)
    results["sharding"] = {"vision": _sharding_metadata(vision), "connectors": _sharding_metadata(module)}
    results["tp_rank"] = rank

    context = initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=2, seed=0)
    last_stage = build_query_conditioner(connector_config, LLM_HIDDEN, pre_process=False,
                                         pg_collection=process_groups())
    load_connector_state_dict(last_stage, {k: v for k, v in full_connectors.items() if k != "meta_queries"})
    first_stage = build_vision(vision_config, LLM_HIDDEN, pg_collection=process_groups())
    load_vision_state_dict(first_stage, full_vision)
    results["pp2"] = {"pp_rank": context.pp_rank, "layers": len(last_stage.connector_2.layers),
                      "connectors": _step(last_stage, states, _connector_forward)[0],
                      "vision": _step(first_stage.eval(), images, _vision_forward)[0]}
    return results


@pytest.fixture(scope="module")
def tp_results():
    """One spawn of two ranks for every check of this module."""
    return run_distributed(_tp_worker, 2)


def _max_rel(a, b):
    error = (a - b).abs().max()
    return 0.0 if error == 0 else (error / b.abs().max()).item()


def _check_against_tp1(ranks, variant_of, reference, unshard):
    """Outputs equal on both ranks and within REL_ERROR of TP=1; unsharded gradients too."""
    ref_outputs, ref_grads, ref_input_grad = reference
    outputs = [variant_of(r)[0] for r in ranks]
    for index, expected in enumerate(ref_outputs):
        assert torch.equal(outputs[0][index], outputs[1][index])
        assert _max_rel(outputs[0][index], expected) <= REL_ERROR
    for rank in ranks:
        assert _max_rel(variant_of(rank)[2], ref_input_grad) <= REL_ERROR
    grads = unshard([variant_of(r)[1] for r in ranks])  # also checks replicated gradients agree across ranks
    assert set(grads) == set(ref_grads)
    for name, expected in ref_grads.items():
        assert _max_rel(grads[name], expected) <= REL_ERROR, name


def test_connectors_at_tp2_equal_tp1(tp_results):
    from megatron_puffin.convert.connector import unshard_connector_state_dicts

    connector_config, _ = _configs()
    assert [r["tp_rank"] for r in tp_results] == [0, 1]
    reference = tp_results[0]["tp1"]["connectors"]

    def unshard(shards):  # the meta queries are not on this path (they feed the LLM's input)
        return unshard_connector_state_dicts(shards, connector_config, LLM_HIDDEN, pre_process=False)

    for recompute in (False, True):
        _check_against_tp1(tp_results, lambda r: r[f"tp2_connectors_recompute={recompute}"], reference, unshard)


def test_vision_at_tp2_equals_tp1_in_eval_and_seeded_train_mode(tp_results):
    from megatron_puffin.convert.radio import unshard_vision_state_dicts

    _, vision_config = _configs()
    for mode in ("eval", "train"):
        reference = tp_results[0]["tp1"]["vision"][mode]
        _check_against_tp1(
            tp_results, lambda r: r["tp2_vision"][mode], reference,
            lambda shards: unshard_vision_state_dicts(shards, vision_config, LLM_HIDDEN, parameters_only=True),
        )
    eval_out, train_out = (tp_results[0]["tp1"]["vision"][m][0][0] for m in ("eval", "train"))
    assert not torch.equal(eval_out, train_out)


def test_initialisation_is_the_same_at_every_tensor_parallel_size(tp_results):
    from megatron_puffin.convert.connector import unshard_connector_state_dicts
    from megatron_puffin.convert.radio import unshard_vision_state_dicts

    connector_config, vision_config = _configs()
    tp1 = tp_results[0]["fresh_tp1"]
    connectors = unshard_connector_state_dicts([r["fresh_tp2"]["connectors"] for r in tp_results], connector_config,
                                               LLM_HIDDEN)
    vision = unshard_vision_state_dicts([r["fresh_tp2"]["vision"] for r in tp_results], vision_config, LLM_HIDDEN)
    assert all(torch.equal(connectors[k], tp1["connectors"][k]) for k in tp1["connectors"])
    assert all(torch.equal(vision[k], tp1["vision"][k]) for k in tp1["vision"])


def _expected_sharding(table, num_layers):
    """megatron-core saves a TransformerBlock's layers as one tensor with a leading layer axis."""
    expected = {}
    for name, (shape, axis) in table.items():
        fragments = [1] * len(shape)
        if axis is not None:
            fragments[axis] = 2
        if ".layers." in name:
            shape, fragments = (num_layers, *shape), [num_layers, *fragments]
        expected[name] = (shape, tuple(fragments))
    return expected


def test_distributed_checkpoint_sharding_matches_the_conversion_tables(tp_results):
    from megatron_puffin.convert.connector import connector_tensor_table
    from megatron_puffin.convert.radio import vision_tensor_table

    connector_config, vision_config = _configs()
    for rank in tp_results:
        vision = _expected_sharding(vision_tensor_table(vision_config, LLM_HIDDEN), vision_config.num_layers)
        connectors = _expected_sharding(connector_tensor_table(connector_config, LLM_HIDDEN),
                                        connector_config.num_layers)
        assert rank["sharding"]["vision"] == vision
        assert rank["sharding"]["connectors"] == connectors
