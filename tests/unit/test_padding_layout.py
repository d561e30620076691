"""Padding layouts that fused attention kernels understand compute what the left-padded layout computed.

(a) Golden numbers: all six tasks (and the three generation tasks with targets of mixed sizes, so the MMDiT stream is
    padded) through the composed tiny model, micro-batches of 3 with padded sequences; each task's loss and, per
    parameter, the gradient's norm and its projection on a fixed random vector. They were recorded with
    the previous layout (left-padded LLM with a ``[b, 1, s, s]`` mask, MMDiT stream ``[image + pad ; text]``), on
    one CPU, and must hold within 1e-6 relative for the losses and 3e-5 for the gradients (fp32): another CPU's
    kernels round differently (on an Intel Xeon, where the file was not recorded: losses within 1.2e-7, the
    cam2image and image2image MMDiT gradients up to 6e-6), while a layout mistake moves them by percents.
    Regenerate only deliberately: PUFFIN_REGENERATE_GOLDEN=1.
(b) The LLM tower live: the same sequences right-padded and causal (no mask) against left-padded with the explicit
    mask, logits of real tokens and every gradient within 1e-6.
"""
import json
import os
from pathlib import Path

import pytest
import torch

import megatron_puffin.distributed as mpd
from helpers.puffin import (
    TASK_STREAMS,
    make_tiny_dataset,
    mixed_size_batch,
    task_batches,
    tiny_puffin_config,
    unblock_generation_gradients,
)
from megatron_puffin.training.objectives import puffin_loss

GOLDEN = Path(__file__).parent / "golden" / "left_padding_reference.json"
REL_TOL = 1e-6
GRAD_TOL = 3e-5
GENERATION = ("text2image", "cam2image", "image2image")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = make_tiny_dataset(tmp_path_factory.mktemp("layout"))
    mpd.initialize(seed=0)
    yield paths, task_batches(paths, micro_batch_size=3)
    mpd.destroy()


def _cases(batches):
    cases = {task: batches[task][0] for task in TASK_STREAMS}
    cases.update({f"{task}_mixed": mixed_size_batch(batches[task][0]) for task in GENERATION})
    return cases


def _model(paths):
    from megatron_puffin.models.puffin import build_puffin

    torch.manual_seed(0)
    model = build_puffin(tiny_puffin_config(paths), pg_collection=mpd.process_groups()).train()
    unblock_generation_gradients(model)  # trained-like projector_1/2 (they start at zero)
    return model


def _record(model, batch):
    model.zero_grad(set_to_none=True)
    loss = puffin_loss(model, batch).loss
    loss.backward()
    grads = {}
    for index, (name, param) in enumerate(model.named_parameters()):
        if param.grad is None:
            continue
        direction = torch.randn(param.shape, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
        grad = param.grad.double()
        grads[name] = [float(grad.pow(2).sum()), float((grad * direction).sum())]
    return {"loss": float(loss.detach()), "grads": grads}


def _close(actual: float, expected: float, scale: float, tolerance: float = REL_TOL) -> bool:
    return abs(actual - expected) <= tolerance * max(abs(expected), scale)


def _grad_failures(case: str, actual: dict, expected: dict) -> list:
    """Per parameter: the gradient norm and its projection within :data:`GRAD_TOL` of the norm, with an absolute
    floor of 1e-3 of the whole gradient's norm (some gradients are zero in exact arithmetic, e.g. of key biases,
    which softmax ignores; theirs is rounding noise)."""
    floor = 1e-3 * sum(square for square, _ in expected.values()) ** 0.5
    failures = []
    for name, (square, projection) in expected.items():
        got_square, got_projection = actual[name]
        scale = max(square ** 0.5, floor)
        if not (_close(got_square ** 0.5, square ** 0.5, scale, GRAD_TOL)
                and _close(got_projection, projection, scale, GRAD_TOL)):
            failures.append(f"{case} {name}: {got_square, got_projection} != {square, projection}")
    return failures


def test_losses_and_gradients_equal_the_left_padded_layout(tiny):
    paths, batches = tiny
    model = _model(paths)
    records = {name: _record(model, batch) for name, batch in _cases(batches).items()}
    if os.environ.get("PUFFIN_REGENERATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(records, indent=1, sort_keys=True))
    golden = json.loads(GOLDEN.read_text())
    assert sorted(records) == sorted(golden)
    failures = []
    for case, expected in golden.items():
        actual = records[case]
        if not _close(actual["loss"], expected["loss"], 0.0):
            failures.append(f"{case} loss {actual['loss']} != {expected['loss']}")
        # A parameter whose gradient is exactly zero in the golden record may now get none at all (the MMDiT's last
        # block no longer computes the text queries whose outputs SD3 discards); every other one must be there.
        never_computed = sorted(set(expected["grads"]) - set(actual["grads"]))
        assert all(expected["grads"][name] == [0.0, 0.0] for name in never_computed), (case, never_computed)
        assert set(actual["grads"]) <= set(expected["grads"]), case
        expected = {**expected, "grads": {k: v for k, v in expected["grads"].items() if k not in never_computed}}
        failures += _grad_failures(case, actual["grads"], expected["grads"])
    assert not failures, "\n".join(failures[:20])


# -- the LLM's right padding ------------------------------------------------------------------------------------
def test_right_padding_moves_real_tokens_first_and_keeps_their_order():
    from megatron_puffin.models.llm import RightPadding, gather_positions, is_right_padded

    mask = torch.tensor([[False, False, True, True, True], [True] * 5, [False, False, False, False, True]])
    ids = torch.tensor([[0, 0, 7, 8, 9], [1, 2, 3, 4, 5], [0, 0, 0, 0, 6]])
    layout = RightPadding.from_left_padded(mask)
    assert layout.lengths.tolist() == [3, 5, 1]
    moved = layout.apply_to_batch({"input_ids": ids, "attention_mask": mask, "task": "x"})
    assert moved["input_ids"].tolist() == [[7, 8, 9, 0, 0], [1, 2, 3, 4, 5], [6, 0, 0, 0, 0]]
    assert is_right_padded(moved["attention_mask"]) and not is_right_padded(mask) and moved["task"] == "x"
    assert layout.last_positions(2).tolist() == [[1, 3, -1], [2, 4, 0]]
    hidden = moved["input_ids"].T[..., None].float()  # [s, b, 1]
    assert gather_positions(hidden, layout.last_positions(1))[..., 0].tolist() == [[9.0, 5.0, 6.0]]
    assert RightPadding.from_left_padded(torch.ones(2, 3, dtype=torch.bool)).source_index is None
    with pytest.raises(ValueError, match="not left-padded"):
        RightPadding.from_left_padded(torch.tensor([[True, False, True]]))


@pytest.fixture()
def single_process():
    mpd.initialize(seed=0)
    yield
    mpd.destroy()


def test_llm_right_padded_without_mask_equals_left_padded_with_mask(single_process):
    """Logits of real tokens and every gradient within 1e-6 (fp32): fused causal SDPA, no mask tensor."""
    from helpers.llm import left_padded_batch, tiny_llm_config
    from megatron_puffin.models.llm import RightPadding, build_llm, shift_labels, vocab_parallel_token_losses

    config = tiny_llm_config(num_layers=2, num_query_groups=2)
    torch.manual_seed(0)
    model = build_llm(config, pg_collection=mpd.process_groups())
    input_ids, mask, position_ids, labels = left_padded_batch(config.vocab_size, [12, 7, 3], 12)
    # A sample's first token is never a target (Puffin's prompts start unsupervised); left-padded, the last pad would
    # "predict" it, which only the old layout can express.
    labels[torch.arange(3), mask.long().argmax(dim=1)] = -100
    layout = RightPadding.from_left_padded(mask)
    runs = []
    for ids, positions, padding, targets in (
        (input_ids, position_ids, mask, labels),
        (layout.apply(input_ids), layout.apply(position_ids), None, layout.apply(labels)),
    ):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, position_ids=positions, padding_mask=padding)
        loss = vocab_parallel_token_losses(logits, shift_labels(targets)).sum()
        loss.backward()
        runs.append((logits.detach().transpose(0, 1), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (left_logits, left_loss, left_grads), (right_logits, right_loss, right_grads) = runs
    torch.testing.assert_close(right_logits[layout.apply(mask)], left_logits[mask], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(right_loss, left_loss, rtol=1e-6, atol=0)
    for name, grad in left_grads.items():
        torch.testing.assert_close(right_grads[name], grad, rtol=1e-6, atol=1e-6 * float(grad.abs().max()), msg=name)


def test_left_padding_is_refused_where_attention_cannot_mask_it(single_process):
    from helpers.llm import left_padded_batch, tiny_llm_config
    from megatron_puffin.models.llm import build_llm

    config = tiny_llm_config(num_layers=1)
    model = build_llm(config, pg_collection=mpd.process_groups())
    input_ids, mask, position_ids, _ = left_padded_batch(config.vocab_size, [5, 3], 5)
    model.accepts_attention_mask = False  # what a Transformer Engine spec (causal attention) sets
    with pytest.raises(ValueError, match="right-pad"):
        model(input_ids=input_ids, position_ids=position_ids, padding_mask=mask)
