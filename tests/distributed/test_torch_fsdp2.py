"""``--use-torch-fsdp2`` (megatron-core's TorchFullyShardedDataParallel, parameters + gradients + optimizer state
sharded over DP) through the real training loop on 2 gloo ranks, one spawn:

* the losses of 3 steps equal plain DDP's (same flags, same ranks) within 1e-5 relative;
* every parameter is a DTensor holding half of its rows on each rank, and the optimizer holds state for the
  trainable parameters only (the frozen vision tower has none);
* a run resumed from its iteration-2 checkpoint (same DP size) repeats the uninterrupted iteration 3 within 1e-6
  relative.

Not covered because it does not work yet (docs/parallelism.md): resuming an FSDP2 checkpoint unsharded or at
another DP size (megatron-core 0.16.1 stores parameters whose first dimension is smaller than DP with a wrong
global shape)."""
import os

from helpers.multiprocess import run_distributed

REL_TOL = 1e-5
RESUME_TOL = 1e-6


def _run(flags):
    from megatron_puffin.config import parse_args
    from megatron_puffin.training import loop

    from helpers.puffin import RESUME_FLAGS

    # Trainer + train + close is loop.run without its process-group teardown (the next run reuses the group).
    trainer = loop.Trainer(parse_args([*RESUME_FLAGS, "--micro-batch-size", "1", "--train-iters", "3",
                                       "--lr-warmup-iters", "1", *flags]))
    try:
        assert trainer.train() == loop.EXIT_FINISHED
    finally:
        trainer.close()


def _shard_facts(flags):
    """Build the trainer as the loop does (no steps) and report how FSDP2 sharded the model."""
    from torch.distributed.tensor import DTensor

    from megatron_puffin.config import parse_args
    from megatron_puffin.training.loop import Trainer

    from helpers.puffin import RESUME_FLAGS

    trainer = Trainer(parse_args([*RESUME_FLAGS, "--micro-batch-size", "1", *flags]))
    try:
        params = dict(trainer.model.named_parameters())
        halves = all(isinstance(p, DTensor) and p.to_local().shape[0] == (p.shape[0] + 1) // 2 for p in params.values()
                     if p.shape[0] % 2 == 0)
        states = [p for sub in trainer.optimizer.chained_optimizers for g in sub.optimizer.param_groups
                  for p in g["params"]]
        trainable = {id(p) for p in params.values() if p.requires_grad}
        return {"halves": halves, "optimizer_params": len(states), "trainable": len(trainable),
                "all_trainable": all(id(p) in trainable for p in states),
                "frozen_vision": sum(1 for n, p in params.items() if n.startswith("vision.encoder") and not p.requires_grad)}
    finally:
        trainer.close()


def _worker(root):
    from helpers.puffin import metrics_losses

    os.chdir(root)
    _run(["--metrics-file", "ddp.jsonl"])
    _run(["--use-torch-fsdp2", "--save", "fsdp", "--save-interval", "2", "--metrics-file", "fsdp.jsonl"])
    _run(["--use-torch-fsdp2", "--load", "fsdp/iter_0000002", "--save", "resumed", "--metrics-file", "resumed.jsonl"])
    facts = _shard_facts(["--use-torch-fsdp2"])
    losses = {name: metrics_losses(f"{name}.jsonl") for name in ("ddp", "fsdp", "resumed")}
    return {"losses": losses, "facts": facts}


def _close(ours, ref, tol):
    return all(abs(ours[task] - ref[task]) <= tol * abs(ref[task]) for task in ref)


def test_fsdp2_matches_ddp_shards_trainable_state_and_resumes_exactly(tmp_path):
    from helpers.puffin import make_tiny_dataset

    make_tiny_dataset(tmp_path / "tiny", num_samples=16)
    result = run_distributed(_worker, 2, str(tmp_path))[0]
    losses, facts = result["losses"], result["facts"]
    assert sorted(losses["fsdp"]) == [1, 2, 3]
    for iteration in (1, 2, 3):
        assert _close(losses["fsdp"][iteration], losses["ddp"][iteration], REL_TOL), (iteration, losses)
    assert losses["fsdp"][3] != losses["fsdp"][1]  # the steps changed the weights
    assert sorted(losses["resumed"]) == [3] and _close(losses["resumed"][3], losses["fsdp"][3], RESUME_TOL), losses
    assert facts["halves"], facts
    assert facts["frozen_vision"] > 0 and facts["all_trainable"], facts
    assert facts["optimizer_params"] == facts["trainable"], facts
