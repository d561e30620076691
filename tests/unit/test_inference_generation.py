"""Generation: reproducible seeds, CFG branches, thinking prompts, world-exploration conditioning (tiny model)."""
import pytest
import torch

import megatron_puffin.distributed as mpd
from helpers.inference import build_tiny_model
from helpers.puffin import make_tiny_dataset
from megatron_puffin.camera import Camera, camera_maps, normalize_camera_map
from megatron_puffin.data import PuffinTokenizer, templates
from megatron_puffin.inference import GenerationRequest, GenerationSettings, generate, prepare_generation, reason
from megatron_puffin.inference.generation import _posterior_latents
from megatron_puffin.inference.tasks import explore_world, exploration_camera, sample_exploration_cameras

STEPS = 2
CAMERA = Camera(0.1, -0.2, 1.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    paths = make_tiny_dataset(tmp_path_factory.mktemp("generation"), num_samples=4)
    mpd.initialize(seed=0)
    model, _ = build_tiny_model(paths)
    tokenizer = PuffinTokenizer(paths["tokenizer"])
    init = torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    yield model, tokenizer, init
    mpd.destroy()


class DiTCalls:
    """Records the batch size and condition latents of every MMDiT call."""

    def __init__(self, dit):
        self.calls = []
        self.handle = dit.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append((args[0].shape[0], kwargs.get("cond_hidden_states")))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_same_seed_same_image_other_seed_other_image(setup):
    model, tokenizer, _ = setup
    settings = GenerationSettings(num_inference_steps=STEPS)
    first = generate(model, tokenizer, [GenerationRequest(CAMERA, "a room", seed=7)], settings)[0]
    again = generate(model, tokenizer, [GenerationRequest(CAMERA, "a room", seed=7)], settings)[0]
    other = generate(model, tokenizer, [GenerationRequest(CAMERA, "a room", seed=8)], settings)[0]
    assert first.image.dtype == torch.uint8 and first.image.shape == (96, 96, 3)
    assert torch.equal(first.image, again.image)
    assert not torch.equal(first.image, other.image)
    assert first.prompt == "a room " + templates.CAMERA_SENTENCE_START + \
        " (roll, pitch, and field-of-view) are: 0.1000, -0.2000, 1.0000."


def test_cfg_scale_one_runs_no_negative_branch(setup):
    model, tokenizer, _ = setup
    requests = [GenerationRequest(CAMERA, "a room"), GenerationRequest(Camera(0.0, 0.2, 0.8), "a hall")]
    with DiTCalls(model.dit) as guided:
        generate(model, tokenizer, requests, GenerationSettings(num_inference_steps=STEPS))
    with DiTCalls(model.dit) as plain:
        out = generate(model, tokenizer, requests, GenerationSettings(num_inference_steps=STEPS, guidance_scale=1.0))
    assert [size for size, _ in guided.calls] == [4] * STEPS
    assert [size for size, _ in plain.calls] == [2] * STEPS
    # Without CFG the negative prompt plays no part.
    other_negative = generate(model, tokenizer, requests, GenerationSettings(
        num_inference_steps=STEPS, guidance_scale=1.0, negative_caption="something else"))
    assert all(torch.equal(a.image, b.image) for a, b in zip(out, other_negative))
    prepared = prepare_generation(model, tokenizer, requests, GenerationSettings(guidance_scale=1.0))
    assert prepared.negative is None and prepared.batch["input_ids"].shape[0] == 2


def test_negative_prompt_is_the_template_with_empty_text(setup):
    model, tokenizer, _ = setup
    prepared = prepare_generation(model, tokenizer, [GenerationRequest(CAMERA, "a room")])
    ids, mask = prepared.batch["input_ids"], prepared.batch["attention_mask"]
    negative = tokenizer.decode(ids[0][mask[0] & (ids[0] >= 0)].tolist())
    positive = tokenizer.decode(ids[1][mask[1] & (ids[1] >= 0)].tolist())
    assert negative == templates.instruction(templates.GENERATION_TEMPLATE.format(input=""))
    assert positive == templates.instruction(templates.GENERATION_TEMPLATE.format(input=prepared.texts[0]))
    num_queries = model.puffin_config.connector.num_queries
    assert bool((ids[:, -num_queries:] == templates.QUERY_TOKEN_INDEX).all())


def test_thinking_appends_the_reasoning_of_the_text2text_prompt(setup):
    model, tokenizer, _ = setup
    settings = GenerationSettings(num_inference_steps=1, thinking=True, max_reasoning_tokens=4)
    out = generate(model, tokenizer, [GenerationRequest(CAMERA, "a room")], settings)[0]
    plain_text = generate(model, tokenizer, [GenerationRequest(CAMERA, "a room")],
                          GenerationSettings(num_inference_steps=1))[0].prompt
    expected = reason(model, tokenizer, [plain_text], max_new_tokens=4)[0]
    assert out.reasoning == expected
    assert out.prompt == f"{plain_text} {expected}"


def test_world_exploration_conditions_both_branches_on_camera_and_initial_view(setup):
    model, tokenizer, init = setup
    camera = exploration_camera(0.1, -0.1, 1.5710)
    with DiTCalls(model.dit) as calls:
        out = explore_world(model, tokenizer, init, [camera], settings=GenerationSettings(num_inference_steps=1,
                                                                                           seed=5))[0]
    assert out.task == "image2image" and out.prompt.endswith("The deviation of the camera yaw angle is 1.5710.")
    (size, conds), = calls.calls
    assert size == 2 and len(conds) == 2 and conds[0] is conds[1]  # negative and positive: the same conditions
    values = torch.tensor([[camera.roll, camera.pitch, camera.vfov]])
    camera_map = normalize_camera_map(camera_maps(values, 96, 96))
    expected_camera = _posterior_latents(model.vae, camera_map, [5], "vae_camera")
    expected_init = _posterior_latents(model.vae, init[None], [5], "vae_init")
    torch.testing.assert_close(conds[1][0], expected_camera[0], atol=0, rtol=0)
    torch.testing.assert_close(conds[1][1], expected_init[0], atol=0, rtol=0)
    # Both prompts carry the initial view's visual tokens.
    prepared = prepare_generation(model, tokenizer, [GenerationRequest(camera, init_image=init)])
    image_tokens = (prepared.batch["input_ids"] == tokenizer.image_pad_id).sum(dim=1)
    assert image_tokens.tolist() == [9, 9]  # (96 / 32)^2 on the negative and the positive row


def test_exploration_cameras_follow_the_demo_ranges():
    cameras = sample_exploration_cameras(50, seed=3)
    assert cameras == sample_exploration_cameras(50, seed=3)
    assert all(abs(c.roll) <= 0.3927 and abs(c.pitch) <= 0.3927 and c.vfov == 1.48 for c in cameras)
    assert all(0 <= c.yaw < 6.2832 and (c.yaw <= 0.7854 or c.yaw >= 6.2832 - 0.7854) for c in cameras)


def test_bad_sizes_are_reported(setup):
    model, tokenizer, init = setup
    with pytest.raises(ValueError, match="multiple of"):
        generate(model, tokenizer, [GenerationRequest(CAMERA)], GenerationSettings(image_size=90))
    with pytest.raises(ValueError, match="resize it to 64x64"):
        generate(model, tokenizer, [GenerationRequest(CAMERA, init_image=init)], GenerationSettings(image_size=64))


def test_a_prompt_over_the_text_token_limit_is_cut_as_in_training_and_said_so(setup, caplog):
    """A caption longer than the checkpoint's --max-generation-text-tokens loses the end of its prompt (the camera
    sentence) as in training; generation says so in a warning and in ``prompt_cut`` instead of doing it silently."""
    import dataclasses

    from megatron_puffin.inference.understanding import default_encoder_config

    model, tokenizer, _ = setup
    limited = dataclasses.replace(default_encoder_config(model), max_generation_text_tokens=64)
    requests = [GenerationRequest(CAMERA, "a room"), GenerationRequest(CAMERA, "a long hall " * 40)]
    settings = GenerationSettings(num_inference_steps=1)
    with caplog.at_level("WARNING", logger="megatron_puffin.inference.generation"):
        prepared = prepare_generation(model, tokenizer, requests, settings, encoder_config=limited)
    assert prepared.prompt_cut == [False, True]
    warnings = [r.getMessage() for r in caplog.records if "was cut on the right" in r.getMessage()]
    assert len(warnings) == 1 and "'a long hall" in warnings[0] and "64 text tokens" in warnings[0]
    ids, mask = prepared.batch["input_ids"], prepared.batch["attention_mask"]
    seen = [tokenizer.decode(row[keep & (row >= 0)].tolist()) for row, keep in zip(ids, mask)]
    assert templates.CAMERA_SENTENCE_START in seen[2] and templates.CAMERA_SENTENCE_START not in seen[3]
    out = generate(model, tokenizer, requests, settings, encoder_config=limited)
    assert [image.prompt_cut for image in out] == [False, True]
    assert out[1].prompt == prepared.texts[1]  # the prompt as asked; prompt_cut says the model saw less
    assert not any(image.prompt_cut for image in generate(model, tokenizer, requests, settings))
