"""Padding layouts that fused attention kernels understand compute what the left-padded layout computed.

(a) Golden numbers: all six tasks (and the three generation tasks with targets of mixed sizes, so the MMDiT stream is
    padded) through the composed tiny model, micro-batches of 3 with padded sequences; each task's loss and, per
    parameter, the gradient's sum of squares and its projection on a fixed random vector. They were recorded with
    the previous layout (left-padded LLM with a ``[b, 1, s, s]`` mask, MMDiT stream ``[image + pad ; text]``) and
    must hold within 1e-6 relative (fp32). Regenerate only deliberately: PUFFIN_REGENERATE_GOLDEN=1.
(b) The LLM tower live: the same sequences right-padded and causal (no mask) against left-padded with the explicit
    mask, logits of real tokens and every gradient within 1e-6.
"""
import json
import os
from pathlib import Path

import pytest
import torch

import megatron_puffin.distributed as mpd
from helpers.puffin import TASK_STREAMS, make_tiny_dataset, task_batches, tiny_puffin_config

GOLDEN = Path(__file__).parent / "golden" / "left_padding_reference.json"
REL_TOL = 1e-6
GENERATION = ("text2image", "cam2image", "image2image")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = make_tiny_dataset(tmp_path_factory.mktemp("layout"))
    mpd.initialize(seed=0)
    yield paths, task_batches(paths, micro_batch_size=3)
    mpd.destroy()


def _mixed_sizes(batch):
    """The batch with sample 0's target (and its camera map / initial view) cropped to 64 x 96: mixed latent sizes."""
    mixed = dict(batch)
    for key in ("target_images", "camera_maps", "init_images"):
        if key in batch:
            images = list(batch[key])
            images[0] = images[0][:, :64, :].contiguous()
            mixed[key] = images
    return mixed


def _cases(batches):
    cases = {task: batches[task][0] for task in TASK_STREAMS}
    cases.update({f"{task}_mixed": _mixed_sizes(batches[task][0]) for task in GENERATION})
    return cases


def _model(paths):
    from megatron_puffin.models.puffin import build_puffin

    torch.manual_seed(0)
    model = build_puffin(tiny_puffin_config(paths)).train()
    # Zero-initialised projector_1/2 (spec §1.7) would block the diffusion gradient into connectors, queries, LLM.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "projector_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def _record(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(batch)["loss"]
    loss.backward()
    grads = {}
    for index, (name, param) in enumerate(model.named_parameters()):
        if param.grad is None:
            continue
        direction = torch.randn(param.shape, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
        grad = param.grad.double()
        grads[name] = [float(grad.pow(2).sum()), float((grad * direction).sum())]
    return {"loss": float(loss.detach()), "grads": grads}


def _close(actual: float, expected: float, scale: float) -> bool:
    return abs(actual - expected) <= REL_TOL * max(abs(expected), scale)


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
        assert sorted(actual["grads"]) == sorted(expected["grads"]), case
        # Projections are relative to the gradient's norm (a projection can be near zero by chance).
        for name, (square, projection) in expected["grads"].items():
            got_square, got_projection = actual["grads"][name]
            if not _close(got_square, square, 0.0) or not _close(got_projection, projection, square ** 0.5):
                failures.append(f"{case} {name}: {got_square, got_projection} != {square, projection}")
    assert not failures, "\n".join(failures[:20])
