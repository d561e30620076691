"""Greedy decoding on the LLM tower: KV cache vs full recomputation, batched vs one at a time, per-sequence stop,
and the understanding front end (prompts, camera and reasoning read from answers)."""
import pytest
import torch

import megatron_puffin.distributed as mpd
from helpers.inference import build_tiny_model
from helpers.puffin import make_tiny_dataset
from megatron_puffin.data import PuffinTokenizer, templates
from megatron_puffin.data.task_encoders import TaskEncoder
from megatron_puffin.inference import greedy_decode, imagine_views, photographic_guidance, read_camera, understand
from megatron_puffin.inference.batching import prompt_batch
from megatron_puffin.inference.understanding import default_encoder_config, read_reasoning

LOGIT_TOLERANCE = 1e-5  # fp32, absolute, on logits of magnitude ~4
NEW_TOKENS = 6
NEVER = -1  # an end token id that is never generated


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    paths = make_tiny_dataset(tmp_path_factory.mktemp("inference"), num_samples=8)  # 1 photography sample
    mpd.initialize(seed=0)
    model, _ = build_tiny_model(paths, "--vae-config", "none")
    tokenizer = PuffinTokenizer(paths["tokenizer"])
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 96, generator=generator) * 2 - 1, torch.rand(3, 64, 96, generator=generator) * 2 - 1,
              torch.rand(3, 96, 64, generator=generator) * 2 - 1]
    encoder = TaskEncoder("image2text", tokenizer, default_encoder_config(model))
    # Prompts of different lengths, so the batch is left padded.
    prompts = [encoder.understanding_prompt(templates.caption_prompt(i * 4), image) for i, image in enumerate(images)]
    yield model, tokenizer, images, prompts, paths
    mpd.destroy()


def _decode(model, tokenizer, prompts, end=NEVER, **kwargs):
    return greedy_decode(model, prompt_batch(prompts, templates.UNDERSTANDING_PAD_ID), end, NEW_TOKENS,
                         model.puffin_config.llm.vocab_size, keep_logits=True, **kwargs)


def test_kv_cache_gives_the_tokens_and_logits_of_full_recomputation(setup):
    model, tokenizer, _, prompts, _ = setup
    assert len({p.input_ids.numel() for p in prompts}) == len(prompts)  # really padded
    cached, recomputed = _decode(model, tokenizer, prompts), _decode(model, tokenizer, prompts, use_kv_cache=False)
    assert torch.equal(cached.tokens, recomputed.tokens)
    assert len(set(cached.tokens.flatten().tolist())) > 3  # varied tokens: positions and cache matter
    for step_cached, step_recomputed in zip(cached.logits, recomputed.logits):
        torch.testing.assert_close(step_cached, step_recomputed, atol=LOGIT_TOLERANCE, rtol=0)


def test_batched_decoding_equals_one_prompt_at_a_time(setup):
    model, tokenizer, _, prompts, _ = setup
    batched = _decode(model, tokenizer, prompts)
    for row, prompt in enumerate(prompts):
        alone = _decode(model, tokenizer, [prompt])
        assert torch.equal(alone.tokens[0], batched.tokens[row])
        for step_alone, step_batched in zip(alone.logits, batched.logits):
            torch.testing.assert_close(step_alone[0], step_batched[row], atol=LOGIT_TOLERANCE, rtol=0)


def test_decoding_stops_at_the_llms_last_position_whatever_the_limit(setup):
    """A limit of a billion new tokens used to allocate a KV cache of that length (64 GB for the tiny model)."""
    model, tokenizer, _, prompts, _ = setup
    batch = prompt_batch(prompts[:1], templates.UNDERSTANDING_PAD_ID)
    room = model.puffin_config.llm.max_position_embeddings - batch["input_ids"].shape[1]
    out = greedy_decode(model, batch, NEVER, 10 ** 9, model.puffin_config.llm.vocab_size)
    assert out.tokens.shape == (1, room)


def test_each_sequence_stops_at_its_end_token_and_the_others_go_on(setup):
    model, tokenizer, _, prompts, _ = setup
    free = _decode(model, tokenizer, prompts).tokens
    # Sequence 0 ends at the first token (after its first) that it has not produced before.
    first_new = next(k for k in range(1, free.shape[1]) if int(free[0, k]) not in free[0, :k].tolist())
    end = int(free[0, first_new])
    stopped = _decode(model, tokenizer, prompts, end=end)
    for row in range(len(prompts)):
        hits = (free[row] == end).nonzero()
        first = int(hits[0]) if len(hits) else None
        expected_length = stopped.tokens.shape[1] if first is None else first + 1
        assert stopped.lengths[row] == expected_length
        assert stopped.finished[row] == (first is not None)
        assert torch.equal(stopped.tokens[row, :expected_length], free[row, :expected_length])
        assert bool((stopped.tokens[row, expected_length:] == end).all())  # a finished sequence repeats the end
    assert stopped.sequences()[0] == free[0, :first_new].tolist()
    if all(stopped.finished):  # everyone ended: decoding stopped early
        assert stopped.tokens.shape[1] == max(stopped.lengths)


def test_understand_uses_the_training_prompts_and_batches_images_of_any_shape(setup):
    model, tokenizer, images, _, _ = setup
    outputs = understand(model, tokenizer, images, max_new_tokens=3, batch_size=2)
    thinking = understand(model, tokenizer, images[:1], thinking=True, max_new_tokens=3)
    assert [o.prompt for o in outputs] == [templates.instruction("<image>\n" + templates.caption_prompt(0))] * 3
    assert thinking[0].prompt == templates.instruction("<image>\n" + templates.THINKING_PROMPT)
    one_by_one = [understand(model, tokenizer, [image], max_new_tokens=3)[0] for image in images]
    assert [o.token_ids for o in outputs] == [o.token_ids for o in one_by_one]
    assert all(o.text == tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outputs)


def test_camera_and_reasoning_are_read_from_answers():
    base = "A street. The camera parameters (roll, pitch, and field-of-view) are: 0.1000, -0.2000, 1.0000."
    assert read_camera(base) == pytest.approx((0.1, -0.2, 1.0))
    thinking = "<think> Verticals converge: 1.5, 2.5, 3.5 </think> <answer>0.0500, 0.3000, 0.9000</answer>"
    assert read_camera(thinking) == pytest.approx((0.05, 0.3, 0.9))  # the answer, not the first triple
    assert read_reasoning(thinking) == "Verticals converge: 1.5, 2.5, 3.5"
    assert read_camera("maybe 2.0000, 0.1000, 0.5000 or so") == pytest.approx((2.0, 0.1, 0.5))  # out of range kept
    assert read_camera("no numbers") is None and read_reasoning("no think") is None


@pytest.mark.parametrize("task", ["image2text_thinking", "image2text_photography", "image2text_cross_view",
                                  "text2text"])
def test_inference_prompts_are_the_training_prompts_without_the_answer(setup, task):
    """Token for token: the prompt part of a training sample (the ids before its first supervised label) is what
    inference feeds, for the thinking, photography, cross-view and text2text (thinking generation) prompts."""
    from megatron_puffin.camera import camera_text, format_caption
    from megatron_puffin.data.format import PuffinDataset
    from megatron_puffin.data.images import load_dynamic

    model, tokenizer, _, _, paths = setup
    subset = {"image2text_cross_view": "cross_view", "image2text_photography": "photography"}.get(task, "main")
    sample = PuffinDataset([f"{paths['data']}/{subset}"])[0]
    config = default_encoder_config(model)
    training = TaskEncoder(task, tokenizer, config)(sample, position=0)
    prompt_length = int((training.labels >= 0).nonzero()[0])
    encoder = TaskEncoder("image2text", tokenizer, config)
    if task == "text2text":
        camera = sample["camera"]
        base = format_caption(sample["caption"], type(camera)(camera.roll, camera.pitch, camera.vfov))
        ours = encoder.understanding_prompt(templates.REASONING_PROMPT + " ", None, variable=base)
    elif task == "image2text_cross_view":
        tail = next(i for i, text in enumerate(templates.CROSS_VIEW_PROMPT_TAILS) if text in training.text)
        prompt = templates.cross_view_prompt(tail, camera_text(sample["camera"]))
        ours = encoder.understanding_prompt(prompt, load_dynamic(sample["image_init"]))
    else:
        prompt = templates.THINKING_PROMPT if task == "image2text_thinking" else templates.PHOTOGRAPHY_PROMPT
        ours = encoder.understanding_prompt(prompt, load_dynamic(sample["image"]))
    assert torch.equal(ours.input_ids, training.input_ids[:prompt_length])


def test_imagination_and_photography_ask_the_stage4_prompts(setup):
    model, tokenizer, images, _, _ = setup
    imagined = imagine_views(model, tokenizer, images[:1], [3.1416], max_new_tokens=2)[0]
    camera = "The camera parameters (roll, pitch, and field-of-view) are: 0.0000, 0.0000, 1.4800. " \
             "The deviation of the camera yaw angle is 3.1416."
    assert imagined.prompt == templates.instruction("<image>\n" + templates.cross_view_prompt(0, camera))
    guided = photographic_guidance(model, tokenizer, images[:1], max_new_tokens=2)[0]
    assert guided.prompt == templates.instruction("<image>\n" + templates.PHOTOGRAPHY_PROMPT)
