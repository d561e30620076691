"""Uneven pipeline stages and overlapped data-parallel communication, 4 gloo ranks in one spawn.

1. All six tasks in one step with the LLM's 6 decoder layers placed unevenly: PP=2 with 1 + 5 layers and PP=4 with
   1 + 2 + 2 + 1 (megatron-core's num_layers_in_first/last_pipeline_stage) against one process: per-task losses
   and every gradient within 1e-5 relative (fp32; the reference runs once, in the test's own process). Gradients
   are compared through a distributed checkpoint read back at PP=1, which also shows that checkpoints of uneven
   stages reshard.
2. Two optimizer steps at PP=2 (uneven) x DP=2 with the distributed optimizer, all six tasks: per-task losses with
   --overlap-grad-reduce --overlap-param-gather and a small --ddp-bucket-size (several buckets) equal the
   losses without overlap within 1e-6 relative, and the reduced-gradient norms and the trained weights agree as well.
   The last micro-batch is image2text, which leaves trainable parameters unused (meta queries, connectors, MMDiT):
   the overlapped reductions must still start for them.
3. The same at TP=2 x DP=2 (every tower on the bucketed stage) with cam2image then image2text.
(One pair of runs per layout covers both the six-task overlap and the unused-parameter case; they were separate
runs at PP=2 before.)
"""
import dataclasses

import torch

from helpers.multiprocess import run_distributed

REL_TOL = 1e-5
OVERLAP_TOL = 1e-6
GLOBAL_BATCH = 2
NUM_LAYERS = 6
PLACEMENTS = {(1, 2): (1, None), (1, 4): (1, 1)}  # (TP, PP) -> (first-stage layers, last-stage layers)
OVERLAP_STEPS = 2


def _config(paths, first=None, last=None):
    from helpers.puffin import tiny_puffin_config

    config = tiny_puffin_config(paths, freeze_vision=True)  # a frozen (eval-mode) RADIO: no per-rank CPE draw
    llm = dataclasses.replace(config.llm, num_layers=NUM_LAYERS)
    return dataclasses.replace(config, llm=llm, llm_layers_in_first_stage=first, llm_layers_in_last_stage=last)


def _build(config, ctx, **ddp_flags):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_puffin.distributed import process_groups
    from megatron_puffin.models.puffin import build_puffin
    from megatron_puffin.training.towers import freeze_towers

    torch.manual_seed(0)
    model = build_puffin(config, ctx.is_first_pipeline_stage, ctx.is_last_pipeline_stage, pg_collection=process_groups())
    freeze_towers(model, config.model)
    model.train()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, **ddp_flags),
                                  model)
    model.config.finalize_model_grads_func = finalize_model_grads
    return model, ddp


def _cycle(paths, ctx, whole_batch: bool, step: int = 0):
    from helpers.puffin import TASK_STREAMS, task_batches

    dp = 1 if whole_batch else ctx.data_parallel_size
    batches = task_batches(paths, micro_batch_size=GLOBAL_BATCH // dp, data_parallel_rank=0 if whole_batch else ctx.dp_rank,
                           data_parallel_size=dp, steps=step + 1)
    return [batches[task][step] for task in TASK_STREAMS]


def _grads_as_weights(model):
    for param in model.parameters():
        grad = getattr(param, "main_grad", None)
        param.data.copy_(grad if grad is not None else torch.zeros_like(param))


def _full_state(config, directory):
    import megatron_puffin.distributed as mpd
    from megatron_puffin.checkpointing import load_model_checkpoint

    model, _ = _build(config, mpd.initialize(1, 1, seed=0))
    load_model_checkpoint(model, directory)
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}


def _reference(paths, root):
    """The one-process reference, run once in the test's own process (world size 1): writes the weights checkpoint
    every placement starts from; returns the task losses and every gradient under the PP=1 state-dict names."""
    import megatron_puffin.distributed as mpd
    from helpers.puffin import unblock_generation_gradients
    from megatron_puffin.checkpointing import save_checkpoint
    from megatron_puffin.training.step import forward_backward

    ctx = mpd.initialize(1, 1, seed=0)
    try:
        model, ddp = _build(_config(paths), ctx)
        unblock_generation_gradients(model)  # trained-like projector_1/2 (they start at zero)
        save_checkpoint(model.sharded_state_dict(), f"{root}/weights")
        reference = forward_backward(ddp, _cycle(paths, ctx, whole_batch=True))
        _grads_as_weights(model)
        grads = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}
        return reference.task_losses, grads
    finally:
        mpd.destroy()


def _parity(paths, root, reference_grads):
    import megatron_puffin.distributed as mpd
    from megatron_puffin.checkpointing import load_model_checkpoint, save_checkpoint
    from megatron_puffin.training.step import forward_backward

    config = _config(paths)
    results = {}
    for (tp, pp), (first, last) in PLACEMENTS.items():
        ctx = mpd.initialize(tp, pp, seed=0)
        model, ddp = _build(_config(paths, first, last), ctx)
        load_model_checkpoint(model, f"{root}/weights")
        result = forward_backward(ddp, _cycle(paths, ctx, whole_batch=False))
        layers = len(model.llm.decoder.layers)
        _grads_as_weights(model)
        save_checkpoint(model.sharded_state_dict(), f"{root}/grads_{tp}{pp}")
        results[(tp, pp)] = {"losses": result.task_losses, "last": ctx.is_last_pipeline_stage, "layers": layers}
    for tp, pp in PLACEMENTS:
        grads = _full_state(config, f"{root}/grads_{tp}{pp}")
        results[(tp, pp)]["grad_errors"] = {
            name: ((grads[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
            for name, ref in reference_grads.items()}
    return results


SIX_TASK_ORDER = ("image2text_cross_view", "text2text", "text2image", "cam2image", "image2image", "image2text")
"""The overlap runs' order of all six tasks: image2text last, so its micro-batch (the one whose backward starts the
overlapped reductions) leaves trainable parameters unused (meta queries, connectors, MMDiT)."""
ANY_ORDER = ("cam2image", "image2text")  # image2text last, at the layout that does not run all six tasks
# (TP, PP) -> task order, at DP 2 (DP 2 keeps the reductions' sums order-free: bitwise equal). PP=2 (1 + 5 layers)
# runs all six tasks; TP=2 (PP=1) buckets every tower on one stage.
OVERLAP_RUNS = {(1, 2): SIX_TASK_ORDER, (2, 1): ANY_ORDER}


def _train(paths, tp: int, pp: int, tasks, overlap: bool):
    """OVERLAP_STEPS optimizer steps of ``tasks`` at (tp, pp) x DP=2 with the distributed optimizer, with or without
    --overlap-grad-reduce --overlap-param-gather (small buckets): the per-step losses and reduced-gradient norms, the
    trained weights, the number of buckets, and how many parameters the overlapped run registered as ready after its
    last backward (0 would mean nothing was unused)."""
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads

    import megatron_puffin.distributed as mpd
    from helpers.puffin import task_batches, unblock_generation_gradients
    from megatron_puffin.config.schema import ParallelConfig, PrecisionConfig, TrainingConfig
    from megatron_puffin.distributed import process_groups
    from megatron_puffin.models.puffin import build_puffin
    from megatron_puffin.training import data_parallel
    from megatron_puffin.training.optimizer import build_optimizer
    from megatron_puffin.training.step import train_step
    from megatron_puffin.training.towers import freeze_towers

    ctx = mpd.initialize(tp, pp, seed=0)
    parallel = ParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=overlap,
                              overlap_param_gather=overlap, ddp_bucket_size=2000 if overlap else None)
    config = _config(paths, 1 if pp > 1 else None)
    torch.manual_seed(0)
    model = build_puffin(config, ctx.is_first_pipeline_stage, ctx.is_last_pipeline_stage,
                         pg_collection=process_groups())
    freeze_towers(model, config.model)
    model.train()
    unblock_generation_gradients(model)  # the last stage's diffusion loss reaches the queries and the LLM
    ddp = DistributedDataParallel(model.config, data_parallel.data_parallel_config(parallel), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    data_parallel.wire_overlap(model.config, ddp)
    registered = []
    if overlap:  # count what the mechanism under test registers (the wrapped finalize calls the module's name)
        original = data_parallel.register_unused_parameters_ready
        data_parallel.register_unused_parameters_ready = lambda d: registered.append(original(d)) or registered[-1]
    optimizer = build_optimizer([ddp], TrainingConfig(lr=1e-3, weight_decay=0.0), PrecisionConfig(), True)
    batches = task_batches(paths, micro_batch_size=GLOBAL_BATCH // ctx.data_parallel_size,
                           data_parallel_rank=ctx.dp_rank, data_parallel_size=ctx.data_parallel_size,
                           steps=OVERLAP_STEPS)
    losses, grad_norms = [], []
    try:
        for step in range(OVERLAP_STEPS):
            result = train_step(ddp, optimizer, [batches[task][step] for task in tasks])
            losses.append(result.task_losses)
            grad_norms.append(result.grad_norm)  # of the reduced gradients, over all ranks
    finally:
        if overlap:
            data_parallel.register_unused_parameters_ready = original
    with data_parallel.gathered_parameters(ddp):
        weights = {name: param.detach().clone() for name, param in model.named_parameters()}
    return {"losses": losses, "grad_norms": grad_norms, "weights": weights, "registered": sum(registered),
            "buckets": sum(len(group.buckets) for group in ddp.bucket_groups),
            "first": ctx.is_first_pipeline_stage, "last": ctx.is_last_pipeline_stage}


def _overlap(paths):
    """Per layout of OVERLAP_RUNS, the run without and the run with overlap, compared: the largest relative
    differences of the losses, of the reduced-gradient norms and of the trained weights, whether the losses moved,
    and what the overlapped run registered and bucketed against the plain one."""

    def relative(ours, ref):
        return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()

    results = {}
    for (tp, pp), tasks in OVERLAP_RUNS.items():
        plain, overlapped = _train(paths, tp, pp, tasks, False), _train(paths, tp, pp, tasks, True)
        loss_error = max((abs(o - r) / abs(r) for step, ref in enumerate(plain["losses"]) for task, (r,) in ref.items()
                          for o in overlapped["losses"][step][task]), default=0.0) if plain["last"] else 0.0
        results[(tp, pp)] = {
            "loss": loss_error, "trained": plain["losses"][0] != plain["losses"][-1] if plain["last"] else True,
            "tasks": sorted(plain["losses"][0]) if plain["last"] else None,
            "grad_norm": max(abs(o - r) / r for o, r in zip(overlapped["grad_norms"], plain["grad_norms"])),
            "weight": max(relative(overlapped["weights"][name], ref) for name, ref in plain["weights"].items()),
            "registered": overlapped["registered"], "first": plain["first"],
            "buckets": (plain["buckets"], overlapped["buckets"]),
        }
    return results


def _worker(paths, root, reference_grads):
    return {"parity": _parity(paths, root, reference_grads), "overlap": _overlap(paths)}


def test_uneven_pipeline_stages_and_overlapped_communication(tmp_path):
    from helpers.puffin import TASK_STREAMS, make_tiny_dataset

    assert sorted(SIX_TASK_ORDER) == sorted(TASK_STREAMS) and SIX_TASK_ORDER[-1] == "image2text"
    paths = make_tiny_dataset(tmp_path / "data")
    root = str(tmp_path / "ckpt")
    reference, reference_grads = _reference(paths, root)
    assert sorted(reference) == sorted(TASK_STREAMS)
    per_rank = run_distributed(_worker, 4, paths, root, reference_grads)
    layers = {layout: [r["parity"][layout]["layers"] for r in per_rank] for layout in PLACEMENTS}
    assert layers[(1, 2)] == [1, 1, 5, 5]  # ranks 0,1 first stage (DP 2), ranks 2,3 last
    assert layers[(1, 4)] == [1, 2, 2, 1]
    for rank, result in enumerate(per_rank):
        for layout in PLACEMENTS:
            values = result["parity"][layout]
            if values["last"]:
                for task, (ref,) in reference.items():
                    (ours,) = values["losses"][task]
                    assert abs(ours - ref) <= REL_TOL * abs(ref), (rank, layout, task, ours, ref)
            worst = max(values["grad_errors"].items(), key=lambda kv: kv[1])
            assert worst[1] <= REL_TOL, f"rank {rank} layout {layout}: gradient {worst[0]} rel error {worst[1]:.2e}"
        for layout, errors in result["overlap"].items():  # overlapped against plain (see _overlap)
            assert max(errors["loss"], errors["grad_norm"], errors["weight"]) <= OVERLAP_TOL, (rank, layout, errors)
            assert errors["trained"], (rank, layout)  # the steps trained: the losses moved
            # megatron-core buckets the first stage only (later stages are off the critical path)
            if errors["first"]:
                plain_buckets, overlap_buckets = errors["buckets"]
                assert overlap_buckets > plain_buckets, "the small --ddp-bucket-size must split the buffers"
        six = result["overlap"][(1, 2)]
        if rank >= 2:  # the last stage at PP=2 ran every task
            assert six["tasks"] == sorted(TASK_STREAMS), (rank, six["tasks"])
        assert result["overlap"][(2, 1)]["registered"] > 0  # the MMDiT, connectors and queries were unused
        if rank < 2:  # the first stage at PP=2 (ranks 0, 1): the meta queries are unused by image2text
            assert six["registered"] > 0
