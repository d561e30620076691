"""The single-rank cross-entropy (tensor-parallel size 1, no collectives) is megatron-core's vocab-parallel one."""
import pytest
import torch

import megatron_puffin.distributed as mpd
from megatron_puffin.models.llm import vocab_parallel_token_losses


@pytest.fixture()
def single_process():
    mpd.initialize(seed=0)
    yield mpd.process_groups()
    mpd.destroy()


def test_single_rank_cross_entropy_is_megatron_core_bit_for_bit(single_process):
    """Losses and logit gradients identical (torch.equal) with the TP group of one rank and without a group
    (megatron-core's function with its collectives), ignored targets included; no collective runs."""
    generator = torch.Generator().manual_seed(0)
    values = 3 * torch.randn(7, 2, 53, generator=generator)
    labels = torch.randint(0, 53, (2, 7), generator=generator)
    labels[0, :2] = -100
    weights = torch.rand(2, 7, generator=generator)
    results = []
    for group in (single_process.tp, None):
        # A fresh leaf each time: megatron-core's function works in place on fp32 logits (as this one does).
        logits = values.clone().requires_grad_()
        losses = vocab_parallel_token_losses(logits, labels, tp_group=group)
        (losses * weights).sum().backward()
        results.append((losses.detach(), logits.grad.clone()))
    (ours, our_grad), (megatron, megatron_grad) = results
    assert torch.equal(ours, megatron) and torch.equal(our_grad, megatron_grad)
    assert bool((ours[0, :2] == 0).all()) and bool((ours[labels >= 0] > 0).all())
    reference = torch.nn.functional.cross_entropy(values.transpose(0, 1)[labels >= 0], labels[labels >= 0],
                                                  reduction="none")
    torch.testing.assert_close(ours[labels >= 0], reference, rtol=1e-6, atol=1e-6)


def test_single_rank_cross_entropy_runs_no_collective(single_process, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: calls.append(a))
    logits = torch.randn(4, 1, 11, requires_grad=True)
    vocab_parallel_token_losses(logits, torch.randint(0, 11, (1, 4)), tp_group=single_process.tp).sum().backward()
    assert calls == []
    vocab_parallel_token_losses(logits, torch.randint(0, 11, (1, 4))).sum().backward()
    assert len(calls) == 3  # megatron-core's max, predicted-logit and sum all-reduces
