"""Inference against the reference-style assembly (``megatron_puffin.testing.reference_inference``) on the same
weights: greedy understanding tokens identical to transformers' Qwen2 with its own KV cache, and one CFG velocity of
generation (cam2image and world exploration) within 1e-5 of the reference's connectors + diffusers SD3 modules."""
import pytest
import torch

import megatron_puffin.distributed as mpd
from helpers.puffin import make_tiny_dataset, tiny_puffin_config
from megatron_puffin.camera import Camera
from megatron_puffin.convert.puffin import load_puffin_state_dict, puffin_to_mcore
from megatron_puffin.data import PuffinTokenizer, templates
from megatron_puffin.data.task_encoders import TaskEncoder
from megatron_puffin.diffusion import FlowMatchEulerSampler
from megatron_puffin.inference import GenerationRequest, GenerationSettings, greedy_decode, prepare_generation
from megatron_puffin.inference.batching import prompt_batch
from megatron_puffin.inference.understanding import default_encoder_config
from megatron_puffin.testing.reference_inference import reference_greedy_decode, reference_guided_velocity
from megatron_puffin.testing.reference_puffin import build_puffin_pair

VELOCITY_TOLERANCE = 1e-5  # fp32, absolute, on velocities of magnitude ~1
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    paths = make_tiny_dataset(tmp_path_factory.mktemp("inference_reference"), num_samples=4)
    mpd.initialize(seed=0)
    config = tiny_puffin_config(paths)
    ours, reference = build_puffin_pair(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # informative weights (varied tokens, non-zero text conditioning), then ours <- reference
        for name, param in reference.named_parameters():
            if (name.startswith("llm.") and param.dim() > 1) or name.startswith(("query_path.projector_1",
                                                                                   "query_path.projector_2")):
                param.copy_(torch.randn(param.shape, generator=generator) * (0.15 if name.startswith("llm.") else 0.05))
    state, _ = puffin_to_mcore(reference.reference_state_dict(), config)
    load_puffin_state_dict(ours, state)
    yield ours.eval(), reference.eval(), PuffinTokenizer(paths["tokenizer"])
    mpd.destroy()


def test_greedy_understanding_tokens_equal_the_reference(setup):
    ours, reference, tokenizer = setup
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 96, generator=generator) * 2 - 1 for _ in range(2)]
    encoder = TaskEncoder("image2text", tokenizer, default_encoder_config(ours))
    prompts = [encoder.understanding_prompt(templates.caption_prompt(0), images[0]),
               encoder.understanding_prompt(templates.THINKING_PROMPT, images[1])]
    batch = prompt_batch(prompts, templates.UNDERSTANDING_PAD_ID)
    expected = reference_greedy_decode(reference, batch, tokenizer.im_end_id, NEW_TOKENS)
    got = greedy_decode(ours, batch, tokenizer.im_end_id, NEW_TOKENS, ours.puffin_config.llm.vocab_size)
    assert torch.equal(got.tokens, expected)
    assert len(set(expected.flatten().tolist())) > 3


@pytest.mark.parametrize("world_exploration", [False, True])
def test_one_guided_velocity_equals_the_reference(setup, world_exploration):
    ours, reference, tokenizer = setup
    init = torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(2)) * 2 - 1 if world_exploration else None
    camera = Camera(0.1, -0.2, 1.48, 1.571 if world_exploration else None)
    requests = [GenerationRequest(camera, "a room", init_image=init), GenerationRequest(camera, "", init_image=init)]
    settings = GenerationSettings(num_inference_steps=50)
    prepared = prepare_generation(ours, tokenizer, requests, settings)
    sampler = FlowMatchEulerSampler(ours.schedule, 50, settings.guidance_scale)
    timestep = ours.schedule.inference_schedule(50).timesteps[10]
    with torch.no_grad():
        got = sampler.guided_velocity(prepared.velocity_fn, prepared.noise, timestep)
    expected = reference_guided_velocity(reference, prepared.batch, prepared.noise, timestep, prepared.conds,
                                         settings.guidance_scale)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=VELOCITY_TOLERANCE, rtol=0)
