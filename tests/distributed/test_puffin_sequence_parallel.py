"""Sequence parallelism: the composed Puffin model, all six tasks in one step, at TP=2 and TP=2 x PP=2 with
--sequence-parallel against one process (TP=1): per-task losses and every gradient within 1e-5 relative (fp32,
4 gloo ranks, one spawn). The image2image micro-batch has mixed latent sizes (a padded DiT stream).

Every tower is trainable (vision included: every data-parallel replica runs the whole batch, so the ViT's train-mode
CPE draws are the same at every layout). The ViT gets 3 class tokens, so its 3 + 36 tokens per image are odd and the sequence-parallel split
pads them (masked keys); the LLM rows are padded to a multiple of 2 whenever their length is odd. The one-process
reference runs once, in the test's own process (before, each of the 4 ranks ran it), and writes the distributed
checkpoint of the weights every layout starts from; each layout's gradients are compared by saving them as a
distributed checkpoint and reading it back at TP=1, which reshards through megatron-core's own dist-checkpointing."""
import torch

from helpers.multiprocess import run_distributed

REL_TOL = 1e-5
BATCH = 2
CLASS_TOKENS = 3
LAYOUTS = [(2, 1), (2, 2)]


def _build(paths, ctx, sequence_parallel: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from helpers.puffin import tiny_puffin_config
    from megatron_puffin.distributed import process_groups
    from megatron_puffin.models.puffin import build_puffin

    torch.manual_seed(0)
    config = tiny_puffin_config(paths)
    config.vision.class_token_len = CLASS_TOKENS
    config.vision.final_norm = True  # ln_post runs on sequence shards
    config.sequence_parallel = sequence_parallel
    model = build_puffin(config, ctx.is_first_pipeline_stage, ctx.is_last_pipeline_stage,
                         pg_collection=process_groups())
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
    from megatron_puffin.checkpointing import load_model_checkpoint

    model, _ = _build(paths, mpd.initialize(1, 1, seed=0), sequence_parallel=False)
    load_model_checkpoint(model, directory)
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}


def _relative_errors(reference, ours):
    return {name: ((ours[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
            for name, ref in reference.items()}


def _run_step(paths, root, batches, tp, pp, sequence_parallel):
    """One step on the weights of ``root/weights``: (the model holding its gradients, its results)."""
    import megatron_puffin.distributed as mpd
    from megatron_puffin.checkpointing import load_model_checkpoint

    ctx = mpd.initialize(tp, pp, seed=0)
    model, ddp = _build(paths, ctx, sequence_parallel=sequence_parallel)
    load_model_checkpoint(model, f"{root}/weights")
    losses = _step(ddp, batches)
    marked = sorted(n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False))
    text = _decode(paths, model, batches[0]) if pp == 1 else None
    _grads_as_weights(model)
    return model, {"losses": losses, "marked": marked, "last": ctx.is_last_pipeline_stage, "text": text}


def _run(paths, root, name, batches, tp, pp, sequence_parallel):
    """One step on the weights of ``root/weights``; saves its gradients as ``root/name`` (a checkpoint)."""
    from megatron_puffin.checkpointing import save_checkpoint

    model, results = _run_step(paths, root, batches, tp, pp, sequence_parallel)
    save_checkpoint(model.sharded_state_dict(), f"{root}/{name}")
    return results


def _decode(paths, model, batch):
    """Greedy answer for one image with a KV cache (one token per step), as the camera validation decodes with the
    training model: sequence parallelism is switched off around it."""
    from megatron_puffin.data import PuffinTokenizer
    from megatron_puffin.inference import understand
    from megatron_puffin.models.sequence_parallel import sequence_parallel_disabled

    model.eval()
    with torch.no_grad(), sequence_parallel_disabled(model):
        (output,) = understand(model, PuffinTokenizer(paths["tokenizer"]), [batch["vision_images"][0]],
                               max_new_tokens=6)
    model.train()
    return output.text


def _reference(paths, root):
    """One process (this one): writes ``root/weights``; returns the micro-batches of every layout, the reference's
    results and its gradients (frozen or unused parameters: zeros) under the TP=1 state-dict names."""
    import megatron_puffin.distributed as mpd
    from helpers.puffin import TASK_STREAMS, mixed_size_batch, task_batches, unblock_generation_gradients
    from megatron_puffin.checkpointing import save_checkpoint

    try:
        model, _ = _build(paths, mpd.initialize(1, 1, seed=0), sequence_parallel=False)
        unblock_generation_gradients(model)  # trained-like projector_1/2 (they start at zero)
        save_checkpoint(model.sharded_state_dict(), f"{root}/weights")
        # Every rank runs the whole batch (data-parallel replicas of identical data average to the same gradient),
        # so the trainable ViT's train-mode CPE draws are the same at every layout.
        batches = task_batches(paths, micro_batch_size=BATCH)
        ordered = [batches[task][0] for task in TASK_STREAMS]
        ordered[-1] = mixed_size_batch(ordered[-1])  # image2image with mixed latent sizes: a padded DiT stream
        model, results = _run_step(paths, root, ordered, 1, 1, sequence_parallel=False)
        grads = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}
        return ordered, results, grads
    finally:
        mpd.destroy()


def _worker(paths, root, ordered, reference_grads):
    results = {}
    for tp, pp in LAYOUTS:
        results[(tp, pp)] = _run(paths, root, f"grads_{tp}{pp}", ordered, tp, pp, sequence_parallel=True)
    for tp, pp in LAYOUTS:
        results[(tp, pp)]["grad_errors"] = _relative_errors(reference_grads, _full_state(paths, f"{root}/grads_{tp}{pp}"))
    return results


def test_sequence_parallel_at_tp2_and_tp2pp2_matches_one_process_on_all_tasks(tmp_path):
    from helpers.puffin import TASK_STREAMS, assert_layout_matches_reference, make_tiny_dataset

    paths = make_tiny_dataset(tmp_path / "data")
    root = str(tmp_path / "ckpt")
    ordered, reference_results, reference_grads = _reference(paths, root)
    seq_lengths = [int(batch["input_ids"].shape[1]) for batch in ordered]
    assert any(length % 2 for length in seq_lengths), "no odd LLM row: the padding path is untested"
    reference = reference_results["losses"]
    assert sorted(reference) == sorted(TASK_STREAMS)
    assert sum(int(ref.abs().max() > 0) for ref in reference_grads.values()) > 20
    per_rank = run_distributed(_worker, 4, paths, root, ordered, reference_grads)
    worst_loss, worst_grad = 0.0, 0.0
    for rank, result in enumerate(per_rank):
        for layout in LAYOUTS:
            loss_error, grad_error = assert_layout_matches_reference(result[layout], reference, REL_TOL,
                                                                     (rank, layout))
            worst_loss, worst_grad = max(worst_loss, loss_error), max(worst_grad, grad_error)
        assert result[(2, 1)]["text"] == reference_results["text"]  # decoding the SP model works, unchanged
        # Every norm weight of every tower (and the row-parallel biases) is marked for the TP all-reduce.
        marked = result[(2, 1)]["marked"]
        for fragment in ("llm.decoder.layers.0.input_layernorm.weight", "llm.decoder.final_layernorm.weight",
                         "vision.encoder.decoder.layers.0.pre_mlp_layernorm.bias", "vision.encoder.ln_post.weight",
                         "conditioner.connector_1.layers.0.input_layernorm.weight",
                         "dit.transformer_blocks.0.ff.net.2.bias"):
            assert fragment in marked, (fragment, marked)
    print(f"TP=2 + SP, TP=2 x PP=2 + SP vs one process: max relative loss error {worst_loss:.2e}, "
          f"max relative gradient error {worst_grad:.2e}")
