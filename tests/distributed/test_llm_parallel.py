"""The LLM tower at TP=2, PP=2 and TP=2 x PP=2 (4 gloo ranks, one spawn) against one process (the test's own, run
once): equal loss and gradients within 1e-5 relative, through megatron-core's schedules, DDP and
finalize_model_grads; and a distributed checkpoint saved at TP=2 loading at TP=1 and PP=2 with identical weights and outputs."""
import functools

import torch

from helpers.multiprocess import run_distributed

REL_TOL = 1e-5
LAYOUTS = [(2, 1), (1, 2), (2, 2)]  # against TP=1 x PP=1 in the test's own process
SEQ, MBS, NUM_MICROBATCHES = 10, 2, 2


def _config():
    from helpers.llm import tiny_llm_config

    # Qwen2.5's exact 6:1 ratio (12 heads, 2 KV groups) so TP=2 splits whole groups.
    return tiny_llm_config(tied=True, num_attention_heads=12, num_query_groups=2, kv_channels=8, vocab_size=251)


def _full_state_dict(config):
    from helpers.llm import hf_qwen2
    from megatron_puffin.convert.qwen2 import hf_to_mcore

    return hf_to_mcore(hf_qwen2(config, seed=11).state_dict(), config)


def _microbatches(config):
    from helpers.llm import left_padded_batch

    return [left_padded_batch(config.vocab_size, [SEQ, SEQ - 3 - i], SEQ, seed=20 + i) for i in range(NUM_MICROBATCHES)]


def _loss_func(labels, mask, output):
    from megatron_puffin.models.llm import shift_labels, vocab_parallel_token_losses

    target = shift_labels(labels)
    losses = vocab_parallel_token_losses(output, target)
    loss = losses.sum() / (target >= 0).sum()
    return loss, {"loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    input_ids, mask, position_ids, labels = next(data_iterator)
    output = model(input_ids=input_ids, position_ids=position_ids, padding_mask=mask)
    return output, functools.partial(_loss_func, labels, mask)


def _build(config, ctx, state_dict=None):
    from megatron_puffin.distributed import process_groups
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron_puffin.convert.qwen2 import load_llm_state_dict
    from megatron_puffin.models.llm import build_llm

    model = build_llm(config, pre_process=ctx.is_first_pipeline_stage, post_process=ctx.is_last_pipeline_stage,
                      pg_collection=process_groups())
    if state_dict is not None:
        load_llm_state_dict(model, state_dict, config)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    return model, DistributedDataParallel(model.config, ddp_config, model)


def _train_step(ddp):
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = _config()
    ddp.zero_grad_buffer()
    ddp.module.config.finalize_model_grads_func = finalize_model_grads
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(_microbatches(config)),
        model=[ddp],
        num_microbatches=NUM_MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MBS,
    )
    return [d["loss"].item() for d in losses]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _layout_step(config, full, tp, pp):
    """One training step at (tp, pp) from the full weights: the losses, this rank's gradients, its context."""
    import megatron_puffin.distributed as mpd

    ctx = mpd.initialize(tp, pp, seed=0)
    model, ddp = _build(config, ctx, full)
    losses = _train_step(ddp)
    return losses, {name: p.main_grad.detach().clone() for name, p in model.named_parameters()}, ctx


def _reference():
    """The one-process reference (TP=1, PP=1), run once in the test's own process: losses and gradients."""
    import megatron_puffin.distributed as mpd

    config = _config()
    try:
        losses, grads, _ = _layout_step(config, _full_state_dict(config), 1, 1)
    finally:
        mpd.destroy()
    return losses, grads


def _layouts_worker(reference_grads):
    from megatron_puffin.convert.qwen2 import shard_llm_state_dict

    config = _config()
    full = _full_state_dict(config)
    out = {}
    for tp, pp in LAYOUTS:
        losses, grads, ctx = _layout_step(config, full, tp, pp)
        expected = shard_llm_state_dict(reference_grads, config, ctx.tp_rank, tp, ctx.pp_rank, pp)
        errors = {name: _rel(grads[name], expected[name]) for name in grads}
        out[(tp, pp)] = {"losses": losses, "grad_errors": errors, "last_stage": ctx.is_last_pipeline_stage}
    return out


def _forward_logits(model, batch):
    """Logits through megatron-core's forward-only schedule (works on every pipeline stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        input_ids, mask, position_ids = next(data_iterator)
        output = model(input_ids=input_ids, position_ids=position_ids, padding_mask=mask)
        return output, lambda out: (out.sum() * 0, {"logits": out.detach().clone()})

    with torch.no_grad():
        results = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
            seq_length=SEQ, micro_batch_size=MBS, forward_only=True,
        )
    return results[0]["logits"] if results else None


def _real_rows(name, tensor, tp_rank):
    """Drop padded vocabulary rows (their values are arbitrary and never reach an output)."""
    if "word_embeddings" not in name and not name.startswith("output_layer"):
        return tensor
    rows = tensor.shape[0]
    return tensor[: max(0, min(rows, _config().vocab_size - tp_rank * rows))]


def _checkpoint_worker(directory):
    import megatron_puffin.distributed as mpd
    from megatron_puffin.convert.qwen2 import shard_llm_state_dict
    from megatron_puffin.checkpointing import load_model_checkpoint, save_checkpoint

    config = _config()
    input_ids, mask, position_ids, _ = _microbatches(config)[1]
    ctx = mpd.initialize(2, 1, seed=7)
    tp2_model, _ = _build(config, ctx)  # random weights, different from every other model below
    tp2_shard = {k: v.clone() for k, v in tp2_model.state_dict().items() if not k.endswith("_extra_state")}
    save_checkpoint(tp2_model.sharded_state_dict(), directory)
    tp2_rank = ctx.tp_rank

    results = {}
    for tp, pp in [(1, 1), (1, 2)]:
        ctx = mpd.initialize(tp, pp, seed=99)
        model, _ = _build(config, ctx)
        load_model_checkpoint(model, directory)
        logits = _forward_logits(model, (input_ids, mask, position_ids))
        results[(tp, pp)] = logits if ctx.is_last_pipeline_stage else None
        if (tp, pp) == (1, 1):
            state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
            resharded = shard_llm_state_dict(state, config, tp2_rank, 2, 0, 1)
            results["mismatched"] = [
                k for k in tp2_shard if not torch.equal(_real_rows(k, resharded[k], tp2_rank), _real_rows(k, tp2_shard[k], tp2_rank))
            ]
            results["bitwise"] = not results["mismatched"]
            results["keys"] = sorted(tp2_shard) == sorted(resharded)
    ctx = mpd.initialize(2, 1, seed=0)
    results["tp2_logits"] = _forward_logits(tp2_model, (input_ids, mask, position_ids))
    results["tp_rank"] = ctx.tp_rank
    return results


def test_tp_pp_layouts_match_one_process_in_loss_and_gradients():
    reference, reference_grads = _reference()
    assert len(reference) == NUM_MICROBATCHES
    per_rank = run_distributed(_layouts_worker, 4, reference_grads)
    for rank, result in enumerate(per_rank):
        assert sorted(result) == sorted(LAYOUTS)
        for layout, values in result.items():
            if values["last_stage"]:
                for ours, ref in zip(values["losses"], reference):
                    assert abs(ours - ref) <= REL_TOL * abs(ref), (rank, layout, ours, ref)
            worst = max(values["grad_errors"].items(), key=lambda kv: kv[1])
            assert worst[1] <= REL_TOL, f"rank {rank} layout {layout}: gradient {worst[0]} rel error {worst[1]:.2e}"


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_pp2(tmp_path):
    directory = str(tmp_path / "ckpt")
    per_rank = run_distributed(_checkpoint_worker, 2, directory)
    for result in per_rank:
        assert result["keys"] and result["bitwise"], f"TP=1 weights resharded to TP=2 differ from the saved TP=2 shard: {result['mismatched']}"
    tp1 = per_rank[0][(1, 1)]
    pp2_last = per_rank[1][(1, 2)]
    assert torch.equal(pp2_last, tp1), "PP=2 outputs differ from TP=1 outputs of the same checkpoint"
    tp2_full = torch.cat([per_rank[r]["tp2_logits"] for r in sorted(range(2), key=lambda r: per_rank[r]["tp_rank"])], -1)
    tp2_full = tp2_full[..., : tp1.shape[-1]]
    assert _rel(tp1, tp2_full) <= REL_TOL
