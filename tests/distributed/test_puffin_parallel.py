"""The composed Puffin model, all six tasks in one step, at TP=2, PP=2, TP=2 x PP=2 and DP=2 (same global batch)
against one process: per-task losses and every gradient within 1e-5 relative (fp32, 4 gloo ranks, one spawn).

The one-process reference runs once, in the test's own process (before, each of the 4 ranks ran it as a data-parallel
replica); it writes the distributed checkpoint of its weights that every layout starts from. Each layout's gradients
are compared by saving them as a distributed checkpoint and reading it back at TP=1/PP=1, which reshards through
megatron-core's own dist-checkpointing."""
import torch

from helpers.multiprocess import run_distributed

REL_TOL = 1e-5
GLOBAL_BATCH = 2
LAYOUTS = [(2, 1), (1, 2), (2, 2)]


def _build(paths, ctx):
    from megatron_puffin.distributed import process_groups
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from helpers.puffin import tiny_puffin_config
    from megatron_puffin.models.puffin import build_puffin
    from megatron_puffin.training.towers import freeze_towers

    torch.manual_seed(0)
    # RADIO's train-mode CPE window is drawn per micro-batch, so a trainable encoder sees another augmentation when
    # the global batch is split over DP ranks: the encoder is frozen here (eval mode); the projector trains.
    config = tiny_puffin_config(paths, freeze_vision=True)
    model = build_puffin(config, ctx.is_first_pipeline_stage, ctx.is_last_pipeline_stage,
                         pg_collection=process_groups())
    freeze_towers(model, config.model)
    model.train()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    return model, ddp


def _step(paths, ctx, ddp, whole_batch: bool):
    from helpers.puffin import TASK_STREAMS, task_batches
    from megatron_puffin.training.step import forward_backward

    dp = 1 if whole_batch else ctx.data_parallel_size
    batches = task_batches(paths, micro_batch_size=GLOBAL_BATCH // dp, data_parallel_rank=0 if whole_batch else ctx.dp_rank,
                           data_parallel_size=dp)
    ddp.zero_grad_buffer()
    ordered = [batches[task][0] for task in TASK_STREAMS]
    result = forward_backward(ddp, ordered)  # the schedule ends with finalize_model_grads (DP + tied embedding)
    return result, sorted(i for b in ordered for i in b["sample_indices"].tolist())


def _grads_as_weights(model):
    """Put every gradient into its parameter (frozen or unused parameters: zeros)."""
    for param in model.parameters():
        grad = getattr(param, "main_grad", None)
        param.data.copy_(grad if grad is not None else torch.zeros_like(param))


def _full_state(paths, directory):
    import megatron_puffin.distributed as mpd
    from megatron_puffin.checkpointing import load_model_checkpoint

    ctx = mpd.initialize(1, 1, seed=0)
    model, _ = _build(paths, ctx)
    load_model_checkpoint(model, directory)
    return _full_floats(model)


def _full_floats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}


def _reference(paths, root):
    """One process (this one): saves the weights checkpoint of every layout; returns the task losses, the sample
    indices and every gradient (frozen or unused parameters: zeros) under the TP=1/PP=1 state-dict names."""
    import megatron_puffin.distributed as mpd
    from helpers.puffin import unblock_generation_gradients
    from megatron_puffin.checkpointing import save_checkpoint

    ctx = mpd.initialize(1, 1, seed=0)
    try:
        model, ddp = _build(paths, ctx)
        unblock_generation_gradients(model)  # trained-like projector_1/2 (they start at zero)
        save_checkpoint(model.sharded_state_dict(), f"{root}/weights")
        result, indices = _step(paths, ctx, ddp, whole_batch=True)
        _grads_as_weights(model)
        return {"losses": result.task_losses, "indices": indices, "grads": _full_floats(model)}
    finally:
        mpd.destroy()


def _worker(paths, root, reference_grads):
    import megatron_puffin.distributed as mpd
    from megatron_puffin.checkpointing import load_model_checkpoint, save_checkpoint

    results = {}
    for tp, pp in LAYOUTS:
        ctx = mpd.initialize(tp, pp, seed=0)
        model, ddp = _build(paths, ctx)
        load_model_checkpoint(model, f"{root}/weights")
        result, indices = _step(paths, ctx, ddp, whole_batch=False)
        meta_grad = model.conditioner.meta_queries.main_grad.abs().sum().item() if ctx.is_first_pipeline_stage else None
        _grads_as_weights(model)
        save_checkpoint(model.sharded_state_dict(), f"{root}/grads_{tp}{pp}")
        results[(tp, pp)] = {"losses": result.task_losses, "indices": indices, "meta_grad": meta_grad,
                             "dp": ctx.data_parallel_size, "last": ctx.is_last_pipeline_stage}
    for tp, pp in LAYOUTS:
        grads = _full_state(paths, f"{root}/grads_{tp}{pp}")
        errors = {}
        for name, ref in reference_grads.items():
            scale = ref.abs().max().clamp_min(1e-30)
            errors[name] = ((grads[name] - ref).abs().max() / scale).item()
        results[(tp, pp)]["grad_errors"] = errors
    return results


def test_all_tasks_match_one_process_at_tp2_pp2_tp2pp2_and_dp2(tmp_path):
    from helpers.puffin import TASK_STREAMS, assert_layout_matches_reference, make_tiny_dataset

    paths = make_tiny_dataset(tmp_path / "data")
    root = str(tmp_path / "ckpt")
    reference = _reference(paths, root)
    assert sorted(reference["losses"]) == sorted(TASK_STREAMS)
    assert sum(int(ref.abs().max() > 0) for ref in reference["grads"].values()) > 20
    per_rank = run_distributed(_worker, 4, paths, root, reference["grads"])
    for layout in LAYOUTS:  # the data-parallel ranks split the reference's global batch
        assert set().union(*(result[layout]["indices"] for result in per_rank)) == set(reference["indices"]), layout
    for rank, result in enumerate(per_rank):
        for layout in LAYOUTS:
            values = result[layout]
            assert_layout_matches_reference(values, reference["losses"], REL_TOL, (rank, layout))
            if values["meta_grad"] is not None:  # first stage: the diffusion loss reached the queries across PP
                assert values["meta_grad"] > 0, (rank, layout)
