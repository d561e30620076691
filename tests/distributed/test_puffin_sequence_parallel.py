"""Sequence parallelism: the composed Puffin model, all six tasks in one step, at TP=2 with --sequence-parallel
against one process (TP=1): per-task losses and every gradient within 1e-5 relative (fp32, 2 gloo ranks, one
spawn). A second TP=2 + SP step runs a generation micro-batch with mixed latent sizes (a padded DiT stream).

Every tower is trainable (vision included: no data-parallel split here, so its train-mode CPE draws are the same in
both runs). The ViT gets 3 class tokens, so its 3 + 36 tokens per image are odd and the sequence-parallel split
pads them (masked keys); the LLM rows are padded to a multiple of 2 whenever their length is odd. Weights come from
one distributed checkpoint of the reference; gradients are compared by saving them as a distributed checkpoint and
reading it back at TP=1, which reshards through megatron-core's own dist-checkpointing."""
import torch

from helpers.multiprocess import run_distributed

REL_TOL = 1e-5
BATCH = 2
CLASS_TOKENS = 3


def _build(paths, ctx, sequence_parallel: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from helpers.puffin import tiny_puffin_config
    from megatron_puffin.models.puffin import build_puffin

    torch.manual_seed(0)
    config = tiny_puffin_config(paths)
    config.vision.class_token_len = CLASS_TOKENS
    config.vision.final_norm = True  # ln_post runs on sequence shards
    config.sequence_parallel = sequence_parallel
    model = build_puffin(config, ctx.is_first_pipeline_stage, ctx.is_last_pipeline_stage)
    model.train()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    return model, ddp


def _step(ddp, batches):
    from megatron_puffin.training.step import forward_backward

    ddp.zero_grad_buffer()
    return forward_backward(ddp, batches).task_losses  # the schedule ends with finalize_model_grads


def _grads_as_weights(model):
    """Put every gradient into its parameter (frozen or unused parameters: zeros)."""
    for param in model.parameters():
        grad = getattr(param, "main_grad", None)
        param.data.copy_(grad if grad is not None else torch.zeros_like(param))


def _full_state(paths, directory):
    import megatron_puffin.distributed as mpd
    from megatron_puffin.training.checkpointing import load_model_checkpoint

    model, _ = _build(paths, mpd.initialize(1, 1, seed=0), sequence_parallel=False)
    load_model_checkpoint(model, directory)
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}


def _relative_errors(reference, ours):
    return {name: ((ours[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
            for name, ref in reference.items()}


def _run_both(paths, root, name, batches):
    """One step at TP=1 and one at TP=2 + SP on the same weights; returns (losses, gradient errors, checks)."""
    import megatron_puffin.distributed as mpd
    from megatron_puffin.training.checkpointing import load_model_checkpoint, save_checkpoint

    ctx = mpd.initialize(1, 1, seed=0)
    model, ddp = _build(paths, ctx, sequence_parallel=False)
    load_model_checkpoint(model, f"{root}/weights")
    reference = _step(ddp, batches)
    _grads_as_weights(model)
    save_checkpoint(model.sharded_state_dict(), f"{root}/{name}_ref")
    ctx = mpd.initialize(2, 1, seed=0)
    model, ddp = _build(paths, ctx, sequence_parallel=True)
    load_model_checkpoint(model, f"{root}/weights")
    ours = _step(ddp, batches)
    marked = sorted(n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False))
    _grads_as_weights(model)
    save_checkpoint(model.sharded_state_dict(), f"{root}/{name}_sp")
    reference_grads = _full_state(paths, f"{root}/{name}_ref")
    errors = _relative_errors(reference_grads, _full_state(paths, f"{root}/{name}_sp"))
    nonzero = sum(int(ref.abs().max() > 0) for ref in reference_grads.values())
    return {"reference": reference, "ours": ours, "grad_errors": errors, "nonzero": nonzero, "marked": marked}


def _worker(paths, root):
    import megatron_puffin.distributed as mpd
    from helpers.puffin import TASK_STREAMS, mixed_size_batch, task_batches
    from megatron_puffin.training.checkpointing import save_checkpoint

    model, _ = _build(paths, mpd.initialize(1, 1, seed=0), sequence_parallel=False)
    # projector_1/2 start at zero (docs/puffin.md §1.7), which blocks every gradient into the connectors, queries and
    # LLM from the diffusion loss; give them the values of a trained model so the test sees that path.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "projector_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    save_checkpoint(model.sharded_state_dict(), f"{root}/weights")
    batches = task_batches(paths, micro_batch_size=BATCH)
    results = {"tasks": _run_both(paths, root, "tasks", [batches[task][0] for task in TASK_STREAMS]),
               "mixed": _run_both(paths, root, "mixed", [mixed_size_batch(batches["image2image"][0])])}
    results["seq_lengths"] = [int(batches[task][0]["input_ids"].shape[1]) for task in TASK_STREAMS]
    return results


def test_sequence_parallel_tp2_matches_one_process_on_all_tasks(tmp_path):
    from helpers.puffin import TASK_STREAMS, make_tiny_dataset

    paths = make_tiny_dataset(tmp_path / "data")
    per_rank = run_distributed(_worker, 2, paths, str(tmp_path / "ckpt"))
    assert any(length % 2 for length in per_rank[0]["seq_lengths"]), "no odd LLM row: the padding path is untested"
    for rank, result in enumerate(per_rank):
        assert sorted(result["tasks"]["reference"]) == sorted(TASK_STREAMS)
        for case in ("tasks", "mixed"):
            values = result[case]
            for task, (ref,) in values["reference"].items():
                (ours,) = values["ours"][task]
                assert abs(ours - ref) <= REL_TOL * abs(ref), (rank, case, task, ours, ref)
            worst = max(values["grad_errors"].items(), key=lambda kv: kv[1])
            assert worst[1] <= REL_TOL, f"rank {rank} {case}: gradient {worst[0]} rel error {worst[1]:.2e}"
            assert values["nonzero"] > 20
            # Every norm weight of every tower (and the row-parallel biases) is marked for the TP all-reduce.
            marked = values["marked"]
            for fragment in ("llm.decoder.layers.0.input_layernorm.weight", "llm.decoder.final_layernorm.weight",
                             "vision.encoder.decoder.layers.0.pre_mlp_layernorm.bias", "vision.encoder.ln_post.weight",
                             "conditioner.connector_1.layers.0.input_layernorm.weight",
                             "dit.transformer_blocks.0.ff.net.2.bias"):
                assert fragment in marked, (fragment, marked)
    tasks = per_rank[0]["tasks"]
    print(f"max relative loss error {max(abs(tasks['ours'][t][0] - r[0]) / abs(r[0]) for t, r in tasks['reference'].items()):.2e}, "
          f"max relative gradient error {max(tasks['grad_errors'].values()):.2e}")
