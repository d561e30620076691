"""The composed Puffin model in one process: every task's loss, where gradients flow, freezing."""
import pytest
import torch

import megatron_puffin.distributed as mpd
from helpers.puffin import TASK_STREAMS, make_tiny_dataset, task_batches, tiny_puffin_config
from megatron_puffin.models.batch import PuffinBatch
from megatron_puffin.training.objectives import puffin_loss


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = make_tiny_dataset(tmp_path_factory.mktemp("puffin"))
    mpd.initialize(seed=0)
    yield paths, task_batches(paths)
    mpd.destroy()


def _model(paths, **flags):
    from megatron_puffin.models.puffin import build_puffin
    from megatron_puffin.training.towers import freeze_towers

    torch.manual_seed(0)
    config = tiny_puffin_config(paths, **flags)
    model = build_puffin(config, pg_collection=mpd.process_groups())
    freeze_towers(model, config.model)
    return model.train()


def _grad_norm(model, prefix):
    grads = [p.grad.norm() for n, p in model.named_parameters() if n.startswith(prefix) and p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


@pytest.mark.parametrize("task", list(TASK_STREAMS))
def test_every_task_gives_a_finite_loss_with_counts(tiny, task):
    paths, batches = tiny
    model = _model(paths)
    out = puffin_loss(model, batches[task][0])
    assert torch.isfinite(out.loss) and out.loss.requires_grad and out.task == task
    if task in ("text2image", "cam2image", "image2image"):
        assert int(out.count) == 2  # samples
    else:
        assert int(out.count) > 0  # supervised tokens
    torch.testing.assert_close(out.loss_sum / out.count, out.loss.detach())


def test_the_model_returns_logits_or_velocities_and_needs_the_objectives_diffusion_inputs(tiny):
    """The model computes no loss: understanding gives vocab logits, generation velocities shaped like the noisy
    latents the objective prepared; a generation batch without them is refused with a clear message."""
    from megatron_puffin.training.objectives import PuffinObjective

    paths, batches = tiny
    model = _model(paths).eval()
    objective = PuffinObjective.for_model(model)
    with torch.no_grad():
        understanding = model(PuffinBatch.from_collated(batches["image2text"][0]))
        assert understanding.velocity is None and understanding.logits.dim() == 3
        prepared, target = objective.prepare(PuffinBatch.from_collated(batches["cam2image"][0]))
        generation = model(prepared)
        assert generation.logits is None and generation.velocity.shape == target.shape
        with pytest.raises(ValueError, match="no diffusion inputs"):
            model(PuffinBatch.from_collated(batches["cam2image"][0]))


def test_diffusion_loss_reaches_queries_connectors_and_llm_but_not_frozen_vision(tiny):
    paths, batches = tiny
    model = _model(paths, freeze_vision=True)
    # Zero-initialised projector_1/2 (docs/puffin.md §1.7) block the gradient to everything before them at step 0; give
    # them weights as after a first optimizer step.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".projector_" in name or name.startswith("conditioner.projector"):
                param.normal_(0, 0.02)
    puffin_loss(model, batches["image2image"][0]).loss.backward()
    for prefix in ("conditioner.meta_queries", "conditioner.connector_1", "conditioner.llm2connector_2", "llm.decoder",
                   "vision.projector", "dit."):
        assert _grad_norm(model, prefix) > 0, prefix
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("vision.encoder"))
    assert not model.vision.encoder.training  # frozen encoder runs in eval mode


def test_vision_gradient_is_scaled_when_unfrozen(tiny):
    paths, batches = tiny
    norms = {}
    for scale in (1.0, 0.1):
        model = _model(paths)
        model.puffin_config.vision.vision_grad_scale = scale
        model.vision.config.vision_grad_scale = scale
        model.eval()  # no CPE augmentation, so both runs compute the same forward
        puffin_loss(model, batches["image2text"][0]).loss.backward()
        norms[scale] = _grad_norm(model, "vision.encoder")
    assert norms[1.0] > 0
    assert norms[0.1] == pytest.approx(0.1 * norms[1.0], rel=1e-4)


def test_frozen_towers_have_no_trainable_parameters(tiny):
    paths, _ = tiny
    model = _model(paths, freeze_llm=True, freeze_dit=True, freeze_vision=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("conditioner.", "vision.projector")) for n in trainable), trainable
    assert not any(n.startswith("_vae") or ".vae." in n for n, _ in model.named_parameters())


def test_llm_activation_recompute_gives_the_same_loss_and_gradients(tiny):
    """--recompute checkpoints every LLM layer: same numbers, activations recomputed in backward."""
    import dataclasses

    from megatron_puffin.models.puffin import build_puffin

    paths, batches = tiny
    results = []
    for recompute in (False, True):
        config = tiny_puffin_config(paths)
        config.llm = dataclasses.replace(config.llm, recompute=recompute)
        torch.manual_seed(0)
        model = build_puffin(config, pg_collection=mpd.process_groups()).train()
        assert model.llm.decoder.config.recompute_granularity == ("full" if recompute else None)
        out = puffin_loss(model, batches["cam2image"][0])
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None and n.startswith("llm.")}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-7)


def test_images_of_different_sizes_in_one_understanding_batch(tiny):
    """Dynamic resizing gives images of different sizes (and token counts) in one micro-batch: each sample's
    placeholders receive its own image's tokens."""
    from megatron_puffin.data import templates

    paths, batches = tiny
    model = _model(paths).eval()
    batch = dict(batches["image2text"][0])
    images = batch["vision_images"]
    small = images[0][:, :64, :]  # 64 x 96: 2 x 3 folded tokens instead of 3 x 3
    ids = batch["input_ids"].clone()
    row = ids[0]
    slots = (row == templates.INPUT_IMAGE_TOKEN_INDEX).nonzero().flatten()
    keep = torch.ones_like(row, dtype=torch.bool)
    keep[slots[:3]] = False  # three fewer placeholders, left-padded back to the batch length
    ids[0] = torch.cat([torch.zeros(3, dtype=row.dtype), row[keep]])
    batch.update(input_ids=ids, vision_images=[small, images[1]])
    embeds = model.embed_inputs(PuffinBatch.from_collated(batch)).transpose(0, 1)  # [b, s, h]
    expected = model.vision(small[None], apply_grad_scale=True, generator=None).reshape(-1, embeds.shape[-1])
    got = embeds[0][ids[0] == templates.INPUT_IMAGE_TOKEN_INDEX]
    assert got.shape == expected.shape == (6, embeds.shape[-1])
    torch.testing.assert_close(got, expected)
    second = model.vision(images[1][None], apply_grad_scale=True, generator=None).reshape(-1, embeds.shape[-1])
    torch.testing.assert_close(embeds[1][ids[1] == templates.INPUT_IMAGE_TOKEN_INDEX], second)
