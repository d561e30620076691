"""``--use-torch-fsdp2`` (megatron-core's TorchFullyShardedDataParallel, parameters + gradients + optimizer state
sharded over DP) through the real training loop, one spawn of 2 gloo ranks and one of 1 rank:

* the losses of 3 steps equal plain DDP's (same flags, same ranks) within 1e-5 relative;
* every parameter is a DTensor holding half of its rows on each rank, and the optimizer holds state for the
  trainable parameters only (the frozen vision tower has none);
* its iteration-1 checkpoint (DP 2) resumes and repeats iterations 2 and 3 (iteration 3 follows an optimizer step
  taken with the loaded Adam moments; zeroed moments move it by 2e-4 to 2e-3): with FSDP2 at DP 2 exactly (the same
  sums in the same order), with plain DDP at DP 2 within 1e-6 relative (its optimizer step on whole tensors
  can round differently from FSDP2's on shards), with FSDP2 at DP 1 within 1e-6 relative (the checkpoint's global batch of 4 samples is 2
  micro-batches per rank instead of 1, so the gradient sum and the logged mean are taken in another order;
  measured 5.5e-8);
* every record of the model's sharded state dict holds its parameter's rows at its place in the parameter's real
  shape (factories built), and with each FSDP2 row of megatron_puffin.platform off megatron-core's own call site is
  still wrong: ``make_sharded_tensor_for_checkpoint`` records wrong global shapes (FSDP2_CHECKPOINT_SHARDS),
  ``apply_swiglu_sharded_factory`` places the fc1 rows wrong (FSDP2_SWIGLU_SHARDS), and the optimizer's sharded
  state dict matches no parameter (FSDP2_OPTIMIZER_LOCAL_TENSOR)."""
import os

from helpers.multiprocess import run_distributed

REL_TOL = 1e-5
RESUME_TOL = 1e-6
# An odd connector FFN width: the connector layers' fc1 weight and bias (33 rows) split 17 + 16 over DP 2, next to
# RADIO's 1-row position embedding (1 + 0), so uneven slices of stacked layers are saved and loaded too.
FLAGS = ["--micro-batch-size", "1", "--connector-ffn-hidden-size", "33"]


def _run(flags):
    from megatron_puffin.training import loop
    from megatron_puffin.training.preflight import parse_run_args

    from helpers.puffin import RESUME_FLAGS

    # Trainer + train + close is loop.run without its process-group teardown (the next run reuses the group).
    trainer = loop.Trainer(parse_run_args([*RESUME_FLAGS, *FLAGS, "--train-iters", "3",
                                           "--lr-warmup-iters", "1", *flags]))
    try:
        assert trainer.train() == loop.EXIT_FINISHED
    finally:
        trainer.close()


def _records(model):
    """``[(parameter local shard, ShardedTensor)]`` of every tensor record the model's sharded state dict writes
    (factories such as the SwiGLU one built)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    records = []
    for value in nested_values(model.sharded_state_dict()):
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            built = nested_values(built) if isinstance(built, (dict, list)) else [built]
            records += [(value.data, record) for record in built if isinstance(record, ShardedTensor)]
        elif isinstance(value, ShardedTensor):
            records.append((value.data, value))
    return records


def _misplaced(model, full, shapes):
    """(records checked, records whose global shape is not their parameter's, records whose data is not the
    parameter's rows at their global offset). ``full``: each parameter's gathered tensor by its local shard's id;
    ``shapes``: each key's parameter shape, for records holding a tensor of their own (megatron-core records a
    parameter with fewer rows than DP from a gathered copy)."""
    import torch

    checked = wrong_shape = wrong_rows = 0
    for data, record in _records(model):
        whole = full.get(id(data))
        shape = tuple(whole.shape) if whole is not None else shapes.get(record.key)
        if shape is None:
            continue
        checked += 1
        if tuple(record.global_shape[-len(shape):]) != shape:
            wrong_shape += 1
            continue
        if whole is None:
            continue
        ndim = whole.ndim
        rows = tuple(slice(o, o + n) for o, n in zip(record.global_offset[-ndim:], record.local_shape[-ndim:]))
        wrong_rows += not torch.equal(whole[rows], record.data.reshape(record.local_shape[-ndim:]))
    return checked, wrong_shape, wrong_rows


def _fails_in_megatron(call, error, match):
    """Whether ``call()`` raises ``error`` matching ``match`` from inside megatron-core."""
    import re
    import traceback

    try:
        call()
    except error as caught:
        where = "".join(traceback.format_tb(caught.__traceback__))
        return bool(re.search(match, str(caught))) and "megatron/core/dist_checkpointing/optimizer.py" in where
    return False


def _patch_checks(trainer):
    """The FSDP2 rows of megatron_puffin.platform, on and off, through megatron-core's own call sites."""
    import torch

    from megatron_puffin import platform
    from megatron_puffin.training.loop import OPTIMIZER_METADATA

    model = trainer.model
    with torch.no_grad():
        full = {id(p._local_tensor): p.full_tensor() for p in model.parameters()}
        shapes = {record.key: tuple(full[id(data)].shape) for data, record in _records(model) if id(data) in full}
        checks = {"patched": _misplaced(model, full, shapes)}
        for name in ("FSDP2_CHECKPOINT_SHARDS", "FSDP2_SWIGLU_SHARDS"):
            with platform.unpatched(name):
                checks[name] = _misplaced(model, full, shapes)
        with platform.unpatched("FSDP2_OPTIMIZER_LOCAL_TENSOR"):
            checks["optimizer_unpatched_fails"] = _fails_in_megatron(
                lambda: trainer.optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True,
                                                             metadata=OPTIMIZER_METADATA),
                ValueError, "does not match any model sharded param")
        trainer.optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True, metadata=OPTIMIZER_METADATA)
    return checks


def _shard_facts(flags):
    """Build the trainer as the loop does (no steps) and report how FSDP2 sharded the model and how it is recorded
    in checkpoints (:func:`_patch_checks`)."""
    from torch.distributed.tensor import DTensor

    from megatron_puffin.training.loop import Trainer
    from megatron_puffin.training.preflight import parse_run_args

    from helpers.puffin import RESUME_FLAGS

    trainer = Trainer(parse_run_args([*RESUME_FLAGS, *FLAGS, *flags]))
    try:
        params = dict(trainer.model.named_parameters())
        halves = all(isinstance(p, DTensor) and p.to_local().shape[0] == (p.shape[0] + 1) // 2 for p in params.values()
                     if p.shape[0] % 2 == 0)
        states = [p for sub in trainer.optimizer.chained_optimizers for g in sub.optimizer.param_groups
                  for p in g["params"]]
        trainable = {id(p) for p in params.values() if p.requires_grad}
        return {"halves": halves, "optimizer_params": len(states), "trainable": len(trainable),
                "all_trainable": all(id(p) in trainable for p in states),
                "frozen_vision": sum(1 for n, p in params.items() if n.startswith("vision.encoder") and not p.requires_grad),
                "uneven": sum(1 for p in params.values() if p.shape[0] % 2), "patches": _patch_checks(trainer)}
    finally:
        trainer.close()


def _worker(root):
    from helpers.puffin import metrics_losses

    os.chdir(root)
    _run(["--metrics-file", "ddp.jsonl"])
    _run(["--use-torch-fsdp2", "--save", "fsdp", "--save-interval", "1", "--metrics-file", "fsdp.jsonl"])
    _run(["--use-torch-fsdp2", "--load", "fsdp/iter_0000001", "--save", "resumed", "--metrics-file", "resumed.jsonl"])
    _run(["--load", "fsdp/iter_0000001", "--metrics-file", "ddp_resumed.jsonl"])  # saving DDP: tested elsewhere
    facts = _shard_facts(["--use-torch-fsdp2"])
    losses = {name: metrics_losses(f"{name}.jsonl") for name in ("ddp", "fsdp", "resumed", "ddp_resumed")}
    return {"losses": losses, "facts": facts}


def _one_rank_worker(root):
    from helpers.puffin import metrics_losses

    os.chdir(root)
    _run(["--use-torch-fsdp2", "--load", "fsdp/iter_0000001", "--save", "dp1", "--metrics-file", "dp1.jsonl"])
    return metrics_losses("dp1.jsonl")


def _close(ours, ref, tol):
    return all(abs(ours[task] - ref[task]) <= tol * abs(ref[task]) for task in ref)


def test_fsdp2_matches_ddp_shards_trainable_state_and_reshards_its_checkpoints(tmp_path):
    from helpers.puffin import make_tiny_dataset

    make_tiny_dataset(tmp_path / "tiny", num_samples=16)
    result = run_distributed(_worker, 2, str(tmp_path))[0]
    losses, facts = result["losses"], result["facts"]
    losses["dp1"] = run_distributed(_one_rank_worker, 1, str(tmp_path))[0]
    assert sorted(losses["fsdp"]) == [1, 2, 3]
    for iteration in (1, 2, 3):
        assert _close(losses["fsdp"][iteration], losses["ddp"][iteration], REL_TOL), (iteration, losses)
    assert losses["fsdp"][3] != losses["fsdp"][1]  # the steps changed the weights
    fsdp = {iteration: losses["fsdp"][iteration] for iteration in (2, 3)}
    assert losses["resumed"] == fsdp, losses  # FSDP2 at DP 2 again: the same sums in the same order
    # Plain DDP takes iteration 2's optimizer step on whole tensors, FSDP2 on each rank's shard: on an AVX-512 host
    # the two differ in the last bit (iteration 3: 4.3485846519470215 against 4.34858512878418, 1.1e-7; the same
    # with --clip-grad 0, so not the gradient norm's order); on the AVX2 hosts before they agreed.
    for iteration in (2, 3):
        assert _close(losses["ddp_resumed"][iteration], fsdp[iteration], RESUME_TOL), (iteration, losses)
    assert sorted(losses["dp1"]) == [2, 3], losses
    for iteration in (2, 3):
        assert _close(losses["dp1"][iteration], fsdp[iteration], RESUME_TOL), (iteration, losses)
    assert facts["halves"], facts
    assert facts["frozen_vision"] > 0 and facts["all_trainable"], facts
    assert facts["optimizer_params"] == facts["trainable"], facts
    patches = facts["patches"]
    assert facts["uneven"] == 5 and patches["patched"][0] > 100 and patches["patched"][1:] == (0, 0), facts
    # Still needed: megatron-core records every parameter whose rows do not split evenly with a wrong global shape.
    assert patches["FSDP2_CHECKPOINT_SHARDS"][1] == facts["uneven"], patches
    assert patches["FSDP2_SWIGLU_SHARDS"][1:] == (0, 2), patches  # still needed: both LLM layers' fc1 rows misplaced
    assert patches["optimizer_unpatched_fails"], patches  # still needed: no parameter matched
