"""Task encoders, checked token by token against the layouts of docs/puffin.md §2.1 / §2.2 written out literally here."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_puffin.camera import Camera
from megatron_puffin.data import templates
from megatron_puffin.data.task_encoders import TaskEncoder, TaskEncoderConfig
from megatron_puffin.data.tokenizer import PuffinTokenizer, build_byte_level_bpe_tokenizer, train_sentencepiece_tokenizer
from megatron_puffin.distributed.random import derive_seed

CAMERA_TEXT = "The camera parameters (roll, pitch, and field-of-view) are: 0.1000, -0.2000, 1.0000."
CROSS_CAMERA_TEXT = ("The camera parameters (roll, pitch, and field-of-view) are: 0.1000, -0.2000, 1.4800. "
                     "The deviation of the camera yaw angle is 1.5710.")
DESCRIPTION = "A red sphere on the left stands on a grey and white checkered ground."
REASONING = "The horizon sits low and verticals converge upwards, a low-angle view."
CORPUS = [DESCRIPTION, CAMERA_TEXT, CROSS_CAMERA_TEXT, REASONING] * 10 + list(templates.all_prompt_texts())
EXACT = TaskEncoderConfig(seed=3, cfg_dropout_prob=0.0, mixed_motion_prob=0.0)


def _png(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


SAMPLE = {
    "index": 7, "key": "main/7.json", "subset": "main",
    "image": _png(200, 120), "image_init": _png(150, 300, seed=1),
    "caption": DESCRIPTION, "reasoning": REASONING, "scene": "A blue box ahead.",
    "answer": CAMERA_TEXT + " The suggested deviation of the camera yaw angle is 0.5000.",
    "camera": Camera(0.1, -0.2, 1.0),
}
CROSS_SAMPLE = dict(SAMPLE, camera=Camera(0.1, -0.2, 1.48, yaw=1.571))


@pytest.fixture(scope="module", params=["sentencepiece", "hf"])
def tokenizer(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    if request.param == "sentencepiece":
        return PuffinTokenizer(train_sentencepiece_tokenizer(CORPUS, directory / "t.model", vocab_size=400))
    return PuffinTokenizer(build_byte_level_bpe_tokenizer(CORPUS, directory, vocab_size=300))


def _understanding_layout(tok, prompt, answer, num_image_tokens):
    """docs/puffin.md §2.1: tok(head) [-200]*N tok(tail) tok(answer) <|im_end|> "\\n"; labels on answer + <|im_end|>."""
    if num_image_tokens:
        head = tok.encode("<|im_start|>user\n")
        tail = tok.encode("\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n")
    else:
        head, tail = [], tok.encode("<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n")
    prompt_ids = head + [-200] * num_image_tokens + tail
    answer_ids = tok.encode(answer) + [tok.im_end_id]
    return prompt_ids + answer_ids + [tok.newline_id], [-100] * len(prompt_ids) + answer_ids + [-100]


def _check(encoded, ids, labels=None):
    assert encoded.input_ids.dtype == torch.long and encoded.input_ids.tolist() == ids
    if labels is None:
        assert encoded.labels is None
    else:
        assert encoded.labels.tolist() == labels


def test_image2text_base_layout(tokenizer):
    encoded = TaskEncoder("image2text", tokenizer, EXACT, "image2text#0")(SAMPLE, position=11)
    head = derive_seed(3, "prompt_head", "image2text#0", 11) % 13
    prompt = templates.CAPTION_PROMPT_HEADS[head] + (
        " Then reason its spatial distribution and estimate its camera parameters (roll, pitch, and field-of-view).")
    # 200x120 -> dynamic 224x128 -> pad to 224x224 -> (224/32)^2 = 49 tokens
    _check(encoded, *_understanding_layout(tokenizer, prompt, DESCRIPTION + " " + CAMERA_TEXT, 49))
    assert encoded.task == "image2text" and encoded.num_image_tokens == 49 and not encoded.truncated
    assert encoded.vision_image.shape == (3, 224, 224)
    assert encoded.vision_image[:, :48].eq(0).all() and encoded.vision_image.abs().max() <= 1
    assert (encoded.sample_index, encoded.position) == (7, 11)


def test_image2text_thinking_and_photography_layouts(tokenizer):
    encoded = TaskEncoder("image2text_thinking", tokenizer, EXACT)(SAMPLE)
    prompt = ("Reason the spatial distribution of this image in a thinking mode, and then estimate its camera "
              "parameters (roll, pitch, and field-of-view).")
    answer = f"<think>{REASONING}</think> <answer>0.1000, -0.2000, 1.0000</answer>"
    _check(encoded, *_understanding_layout(tokenizer, prompt, answer, 49))
    encoded = TaskEncoder("image2text_photography", tokenizer, EXACT)(SAMPLE)
    prompt = ("Estimate the camera parameters (roll, pitch, and field-of-view) of this image. And then predict the "
              "deviation camera yaw angle and pitch angle of the target view with high photographic aesthetics.")
    _check(encoded, *_understanding_layout(tokenizer, prompt, SAMPLE["answer"], 49))
    assert encoded.task == "image2text"


def test_image2text_cross_view_layout(tokenizer):
    encoded = TaskEncoder("image2text_cross_view", tokenizer, EXACT, "cv")(CROSS_SAMPLE, position=4)
    tail = templates.CROSS_VIEW_PROMPT_TAILS[derive_seed(3, "prompt_tail", "cv", 4) % 13]
    prompt = ("Given the initial view and the camera parameters of the target view with the deviation yaw angle, "
              + tail + " " + CROSS_CAMERA_TEXT)
    # initial view 150x300 -> dynamic 160x320 -> pad 320x320 -> 100 tokens
    _check(encoded, *_understanding_layout(tokenizer, prompt, "A blue box ahead.", 100))
    assert encoded.task == "image2text_cross_view" and encoded.vision_image.shape == (3, 320, 320)


def test_text2text_layout(tokenizer):
    encoded = TaskEncoder("text2text", tokenizer, EXACT)(SAMPLE)
    prompt = ("Given a scene description and corresponding camera parameters, merge them into a coherent prompt and "
              "generate an accurate visualization that highlights visual cues for spatial reasoning. "
              + DESCRIPTION + " " + CAMERA_TEXT)
    _check(encoded, *_understanding_layout(tokenizer, prompt, REASONING, 0))
    assert encoded.vision_image is None and encoded.num_image_tokens == 0


def _generation_layout(tok, text):
    return tok.encode("<|im_start|>user\nGenerate an image: " + text + "<|im_end|>\n<|im_start|>assistant\n") + [-400] * 64


def test_cam2image_text2image_layouts(tokenizer):
    encoded = TaskEncoder("cam2image", tokenizer, EXACT)(SAMPLE)
    _check(encoded, _generation_layout(tokenizer, DESCRIPTION + " " + CAMERA_TEXT))
    assert encoded.target_image.shape == (3, 128, 224) and encoded.vision_image is None
    torch.testing.assert_close(encoded.camera, torch.tensor([0.1, -0.2, 1.0]))
    encoded = TaskEncoder("cam2image_thinking", tokenizer, EXACT)(SAMPLE)
    _check(encoded, _generation_layout(tokenizer, DESCRIPTION + " " + CAMERA_TEXT + " " + REASONING))
    encoded = TaskEncoder("text2image", tokenizer, EXACT)(SAMPLE)
    _check(encoded, _generation_layout(tokenizer, DESCRIPTION + " " + CAMERA_TEXT))
    assert encoded.camera is None and encoded.task == "text2image"
    dropped = TaskEncoder("cam2image", tokenizer, TaskEncoderConfig(cfg_dropout_prob=1.0))(SAMPLE)
    _check(dropped, _generation_layout(tokenizer, ""))
    assert dropped.cfg_dropped and dropped.camera is not None


def test_image2image_layout_and_mixed_motion(tokenizer):
    def layout(text):
        return tokenizer.encode(
            "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 100 + "<|vision_end|>\nGenerate a target image "
            "given an initial view: " + text + "<|im_end|>\n<|im_start|>assistant\n") + [-400] * 64

    encoded = TaskEncoder("image2image", tokenizer, EXACT)(CROSS_SAMPLE)
    _check(encoded, layout(DESCRIPTION + " " + CROSS_CAMERA_TEXT))
    assert encoded.input_ids.eq(tokenizer.image_pad_id).sum() == 100 == encoded.num_image_tokens
    assert encoded.vision_image.shape == (3, 320, 320) and encoded.init_image.shape == (3, 320, 160)
    assert encoded.target_image.shape == (3, 128, 224)
    torch.testing.assert_close(encoded.camera, torch.tensor([0.1, -0.2, 1.48]))
    trimmed = TaskEncoder("image2image", tokenizer, TaskEncoderConfig(mixed_motion_prob=1.0))(CROSS_SAMPLE)
    _check(trimmed, layout(CROSS_CAMERA_TEXT))


def test_long_answers_are_cut_on_the_right_and_image_tokens_kept(tokenizer):
    full = TaskEncoder("image2text_thinking", tokenizer, EXACT)(SAMPLE)
    prompt_length = int((full.labels == -100).sum()) - 1
    text_prompt = prompt_length - 49
    config = TaskEncoderConfig(seed=3, max_understanding_text_tokens=text_prompt + 5)
    cut = TaskEncoder("image2text_thinking", tokenizer, config)(SAMPLE)
    assert cut.truncated and cut.input_ids.eq(-200).sum() == 49
    assert cut.input_ids.tolist() == full.input_ids.tolist()[: prompt_length + 5]
    assert cut.labels[prompt_length:].tolist() == full.input_ids[prompt_length : prompt_length + 5].tolist()
    assert tokenizer.im_end_id not in cut.input_ids[prompt_length:].tolist()  # no terminator after a cut answer


def test_long_generation_captions_are_cut_and_pads_kept(tokenizer):
    fixed = len(tokenizer.encode("<|im_start|>user\n<|vision_start|><|vision_end|>\nGenerate a target image given an "
                                 "initial view: <|im_end|>\n<|im_start|>assistant\n"))
    config = TaskEncoderConfig(max_generation_text_tokens=fixed + 6, mixed_motion_prob=0.0)
    cut = TaskEncoder("image2image", tokenizer, config)(CROSS_SAMPLE)
    ids = cut.input_ids.tolist()
    assert cut.truncated and ids.count(tokenizer.image_pad_id) == 100 and ids[-64:] == [-400] * 64
    assert len(ids) - 64 - 100 <= fixed + 6
    assert ids[-64 - len(tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n")):-64] == tokenizer.encode(
        "<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="fixed part"):
        TaskEncoder("cam2image", tokenizer, TaskEncoderConfig(max_generation_text_tokens=3))(SAMPLE)


def test_randomness_is_deterministic_per_position_and_has_the_right_rates(tokenizer):
    config = TaskEncoderConfig(seed=5)
    encoder = TaskEncoder("cam2image", tokenizer, config, "cam2image#0")
    other = TaskEncoder("cam2image", tokenizer, config, "cam2image#1")
    drops = [encoder._happens("cfg_dropout", position, 0.1) for position in range(4000)]
    assert drops == [encoder._happens("cfg_dropout", position, 0.1) for position in range(4000)]
    assert drops != [other._happens("cfg_dropout", position, 0.1) for position in range(4000)]
    assert 0.085 < np.mean(drops) < 0.115
    motion = [encoder._happens("mixed_motion", position, 0.5) for position in range(4000)]
    assert 0.47 < np.mean(motion) < 0.53
    heads = {encoder._choice("prompt_head", position, 13) for position in range(400)}
    assert heads == set(range(13))
    assert TaskEncoder("cam2image", tokenizer, config, "s")(SAMPLE, 9).input_ids.tolist() == \
        TaskEncoder("cam2image", tokenizer, config, "s")(SAMPLE, 9).input_ids.tolist()


def test_missing_fields_and_unknown_tasks_fail_clearly(tokenizer):
    with pytest.raises(ValueError, match="lacks \\['reasoning'\\]"):
        TaskEncoder("image2text_thinking", tokenizer, EXACT)(dict(SAMPLE, reasoning=None))
    with pytest.raises(ValueError, match="unknown task"):
        TaskEncoder("video2text", tokenizer, EXACT)
    with pytest.raises(ValueError, match="patch\\*fold"):
        TaskEncoderConfig(vision_patch_size=14).num_image_tokens(256, 256)


def test_a_too_small_text_limit_names_the_smallest_one_that_fits(tokenizer):
    """TextTooLong.tokens is the smallest value of the limit's flag that fits the fixed prompt part (understanding:
    with a one-token answer), for the task's longest prompt template; the message names the flag and that value."""
    from megatron_puffin.data.task_encoders import TextTooLong

    for task, flag, field in (("image2text", "--max-understanding-text-tokens", "max_understanding_text_tokens"),
                              ("cam2image", "--max-generation-text-tokens", "max_generation_text_tokens")):
        encoder = TaskEncoder(task, tokenizer, TaskEncoderConfig(**{field: 4}))
        positions = encoder.prompt_variant_positions()
        needed = []
        for position in positions:
            with pytest.raises(TextTooLong) as info:
                encoder(SAMPLE, position)
            assert f"more than {flag} 4; raise {flag} to at least {info.value.tokens}" in str(info.value)
            needed.append(info.value.tokens)
        assert encoder.prompt_limit_error(SAMPLE).tokens == max(needed)  # the pre-start check's one call
        enough = TaskEncoder(task, tokenizer, TaskEncoderConfig(**{field: max(needed)}))
        for position in positions:
            enough(SAMPLE, position)  # fits at the named value
        assert enough.prompt_limit_error(SAMPLE) is None
        short = TaskEncoder(task, tokenizer, TaskEncoderConfig(**{field: max(needed) - 1}))
        with pytest.raises(TextTooLong):
            for position in positions:
                short(SAMPLE, position)
    image2text = TaskEncoder("image2text", tokenizer, TaskEncoderConfig())
    heads = {image2text._choice("prompt_head", p, len(templates.CAPTION_PROMPT_HEADS))
             for p in image2text.prompt_variant_positions()}
    assert heads == set(range(len(templates.CAPTION_PROMPT_HEADS)))
    assert TaskEncoder("cam2image", tokenizer, TaskEncoderConfig()).prompt_variant_positions() == [0]
