"""The DiT at TP=2 against TP=1 in the same two gloo processes: flow-matching loss and every gradient, for a
uniform batch with condition latents and a padded mixed-size batch, with and without activation recomputation;
plus the distributed-checkpoint sharding metadata of the TP=2 model; plus a DiT that runs tensor-parallel over the
two-rank group it is given while megatron-core's global layout says TP=1 (the tower takes its groups, it does not
look them up)."""
import dataclasses

import pytest
import torch

from helpers.multiprocess import run_distributed
from megatron_puffin.convert.sd3 import dit_tensor_table, unshard_dit_state_dicts
from megatron_puffin.distributed import process_groups

LOSS_RTOL = 1e-5
GRAD_REL_ERROR = 1e-5


def _config():
    from megatron_puffin.models.dit import DiTConfig

    return DiTConfig(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
                     num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32,
                     pooled_projection_dim=12, pos_embed_max_size=24)


def _batches():
    gen = torch.Generator().manual_seed(42)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    uniform = dict(latents=randn(2, 4, 8, 8), conds=[[randn(4, 8, 8), randn(4, 8, 8)] for _ in range(2)],
                   text=randn(2, 5, 24), pooled=randn(2, 12))
    mixed = dict(latents=[randn(4, 8, 8), randn(4, 4, 12), randn(4, 6, 6)],
                 conds=[[randn(4, 8, 8)], [randn(4, 4, 12), randn(4, 8, 8)], None],
                 text=randn(3, 5, 24), pooled=randn(3, 12))
    return {"uniform": uniform, "mixed": mixed}


def _loss_and_grads(model, batch):
    """One flow-matching training step's loss and parameter gradients (noise from a fixed generator)."""
    from megatron_puffin.diffusion import FlowMatchSchedule, flow_matching_loss, make_flow_matching_inputs

    model.zero_grad(set_to_none=True)
    inputs = make_flow_matching_inputs(batch["latents"], FlowMatchSchedule(), torch.Generator().manual_seed(7))
    prediction = model(inputs.noisy, batch["text"], batch["pooled"], inputs.timesteps, batch["conds"])
    loss, _ = flow_matching_loss(prediction, inputs.target)
    loss.backward()
    # The last block's text queries are never computed (their outputs are discarded): no gradient, i.e. zero.
    return loss.item(), {name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                         for name, p in model.named_parameters()}


def _sharding_metadata(model):
    """(global shape, fragmentation per axis) of every tensor in the model's distributed-checkpoint view."""
    sharded = model.sharded_state_dict()
    return {
        key: (tuple(value.global_shape), tuple(value.axis_fragmentations))
        for key, value in sharded.items()
        if hasattr(value, "axis_fragmentations")
    }


def _tp_worker():
    from megatron_puffin.convert.sd3 import load_dit_state_dict, mcore_to_diffusers, shard_dit_state_dict
    from megatron_puffin.distributed import initialize
    from megatron_puffin.models.dit import build_dit

    config, batches = _config(), _batches()
    initialize(tensor_model_parallel_size=1, seed=0)
    reference = build_dit(config, pg_collection=process_groups()).train()
    full_state = mcore_to_diffusers(reference.state_dict(), config)
    results = {"tp1": {name: _loss_and_grads(reference, batch) for name, batch in batches.items()}}

    context = initialize(tensor_model_parallel_size=2, seed=0)
    shard = shard_dit_state_dict(full_state, config, 2)[context.tp_rank]
    for recompute in (False, True):
        model = build_dit(dataclasses.replace(config, recompute=recompute), pg_collection=process_groups()).train()
        load_dit_state_dict(model, shard)
        results[f"tp2_recompute={recompute}"] = {name: _loss_and_grads(model, b) for name, b in batches.items()}
    results["sharding"] = _sharding_metadata(model)
    results["tp_rank"] = context.tp_rank

    # Global layout TP=1 (DP=2); the tower's own TP group is the two-rank data-parallel group.
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    initialize(tensor_model_parallel_size=1, seed=0)
    own = ProcessGroupCollection(tp=parallel_state.get_data_parallel_group())
    model = build_dit(config, pg_collection=own).train()
    load_dit_state_dict(model, shard_dit_state_dict(full_state, config, 2)[own.tp.rank()])
    results["own_tp_group"] = {name: _loss_and_grads(model, b) for name, b in batches.items()}
    results["own_tp_rank"] = own.tp.rank()
    return results


def _max_rel(a, b):
    error = (a - b).abs().max()
    return 0.0 if error == 0 else (error / b.abs().max()).item()


@pytest.fixture(scope="module")
def tp_results():
    """One spawn of two ranks for every check of this module."""
    return run_distributed(_tp_worker, 2)


def test_tensor_parallel_two_equals_one_in_loss_and_gradients(tp_results):
    ranks = tp_results
    config = _config()
    assert [r["tp_rank"] for r in ranks] == [0, 1]
    for variant in ("tp2_recompute=False", "tp2_recompute=True"):
        for batch in ("uniform", "mixed"):
            ref_loss, ref_grads = ranks[0]["tp1"][batch]
            losses = [r[variant][batch][0] for r in ranks]
            assert losses[0] == losses[1], (variant, batch)
            assert abs(losses[0] - ref_loss) <= LOSS_RTOL * abs(ref_loss), (variant, batch, losses[0], ref_loss)
            # Replicated parameters must have identical gradients on both ranks (checked while unsharding).
            grads = unshard_dit_state_dicts(
                [r[variant][batch][1] for r in ranks], config, check_replicated=True, parameters_only=True
            )
            for name, expected in ref_grads.items():
                assert _max_rel(grads[name], expected) <= GRAD_REL_ERROR, (variant, batch, name)
    recomputed = [r["tp2_recompute=True"]["mixed"][1] for r in ranks]
    plain = [r["tp2_recompute=False"]["mixed"][1] for r in ranks]
    assert all(torch.equal(recomputed[k][n], plain[k][n]) for k in range(2) for n in plain[k])


def test_a_tower_runs_over_the_tensor_parallel_group_it_is_given(tp_results):
    ranks = sorted(tp_results, key=lambda r: r["own_tp_rank"])
    assert [r["own_tp_rank"] for r in ranks] == [0, 1]
    for batch in ("uniform", "mixed"):
        ref_loss, ref_grads = ranks[0]["tp1"][batch]
        losses = [r["own_tp_group"][batch][0] for r in ranks]
        assert losses[0] == losses[1] and abs(losses[0] - ref_loss) <= LOSS_RTOL * abs(ref_loss), (batch, losses)
        # Shard-shaped gradients that join back to the TP=1 ones: the layers really split over the given group.
        grads = unshard_dit_state_dicts([r["own_tp_group"][batch][1] for r in ranks], _config(),
                                        check_replicated=True, parameters_only=True)
        for name, expected in ref_grads.items():
            assert _max_rel(grads[name], expected) <= GRAD_REL_ERROR, (batch, name)


def _expected_sharding(config):
    expected = {}
    for name, (shape, axis) in dit_tensor_table(config).items():
        fragments = [1] * len(shape)
        if axis is not None:
            fragments[axis] = 2
        expected[name] = (shape, tuple(fragments))
    return expected


def test_tensor_parallel_model_reports_its_sharding_to_distributed_checkpointing(tp_results):
    expected = _expected_sharding(_config())
    for rank in tp_results:
        assert {k: rank["sharding"][k] for k in expected} == expected
