"""A tiny Puffin trained on the synthetic dataset: every task's loss falls; frozen towers stay bit-identical."""
import pytest
import torch

import megatron_puffin.distributed as mpd
from helpers.puffin import TASK_STREAMS, make_tiny_dataset, task_batches, tiny_puffin_config
from megatron_puffin.config import PrecisionConfig, TrainingConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = make_tiny_dataset(tmp_path_factory.mktemp("train"), num_samples=16)
    mpd.initialize(seed=0)
    yield paths
    mpd.destroy()


def _trainer(paths, lr, **flags):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_puffin.models.puffin import build_puffin
    from megatron_puffin.training.optimizer import build_optimizer
    from megatron_puffin.training.towers import freeze_towers

    torch.manual_seed(0)
    config = tiny_puffin_config(paths, **flags)
    model = build_puffin(config, pg_collection=mpd.process_groups())
    freeze_towers(model, config.model)
    model.train()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer = build_optimizer([ddp], TrainingConfig(lr=lr, weight_decay=0.0), PrecisionConfig())
    return model, ddp, optimizer


def _cycles(paths, steps):
    batches = task_batches(paths, micro_batch_size=2, steps=steps)
    return [[batches[task][i] for task in TASK_STREAMS] for i in range(steps)]


def test_every_task_loss_falls_over_a_few_dozen_steps(tiny):
    """Losses on one fixed micro-batch per task, before and after 30 steps over the synthetic data (the noise of
    the generation tasks is keyed by the samples, so both evaluations see the same noise levels and noise)."""
    from megatron_puffin.training.step import forward_backward, train_step

    steps = 30
    model, ddp, optimizer = _trainer(tiny, lr=2e-3)
    cycles = _cycles(tiny, steps)
    model.eval()
    before = forward_backward(ddp, cycles[0], forward_only=True).task_losses
    model.train()
    for cycle in cycles:
        result = train_step(ddp, optimizer, cycle)
        assert not result.skipped and result.grad_norm is not None and result.grad_norm > 0
    model.eval()
    after = forward_backward(ddp, cycles[0], forward_only=True).task_losses
    for task in TASK_STREAMS:
        (first,), (last,) = before[task], after[task]
        margin = 0.7 if task in ("image2text", "image2text_cross_view", "text2text") else 0.9
        assert last < margin * first, f"{task}: loss {first:.3f} -> {last:.3f}, expected below {margin} x"


def test_frozen_towers_are_bit_identical_after_optimizer_steps(tiny):
    from megatron_puffin.training.step import train_step

    model, ddp, optimizer = _trainer(tiny, lr=1e-2, freeze_llm=True, freeze_vision=True, freeze_dit=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    state_params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert len(state_params) == sum(p.requires_grad for p in model.parameters())  # no state for frozen tensors
    for cycle in _cycles(tiny, 3):
        train_step(ddp, optimizer, cycle)
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        assert torch.equal(param, before[name]), f"frozen {name} changed"
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.startswith("conditioner.") for n in changed) and any(n.startswith("vision.projector") for n in changed)


def test_losses_are_reported_under_the_stream_task_not_the_loss_task(tiny):
    """A photography stream trains the image2text loss; logs and plots must name it image2text_photography."""
    from megatron_puffin.training.step import forward_backward

    model, ddp, _ = _trainer(tiny, lr=0.0)
    model.eval()
    batch = task_batches(tiny, micro_batch_size=2, steps=1)["image2text"][0]
    plain = forward_backward(ddp, [batch], forward_only=True).task_losses
    named = forward_backward(ddp, [dict(batch, stream="image2text_photography#0")], forward_only=True).task_losses
    assert list(plain) == ["image2text"] and list(named) == ["image2text_photography"]
    assert named["image2text_photography"] == plain["image2text"]
