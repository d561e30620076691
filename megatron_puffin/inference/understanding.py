"""Understanding: image (+ prompt, optional thinking) -> text and camera, by greedy decoding (docs/puffin.md §6.1).

Prompts are assembled by the training task encoders (:meth:`TaskEncoder.understanding_prompt`), so inference sees
exactly the token layout the model was trained on::

    <|im_start|>user\\n [-200 x N] \\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n

then decoded greedily with a KV cache until ``<|im_end|>`` (:mod:`.decoding`). Default prompts: the base caption
prompt (head 1 + the camera suffix) or, with ``thinking``, the stage-3 thinking prompt. The same entry points serve
spatial imagination (cross-view prompt), photographic guidance (photography prompt) and text-only reasoning.

Example::

    loaded = load_puffin("runs/stage2_sft")                    # megatron_puffin.inference.load_puffin
    images = [load_image(p, loaded.encoder_config.image_max_size) for p in paths]
    outputs = understand(loaded.model, loaded.tokenizer, images)  # [UnderstandingOutput]
    outputs[0].text, outputs[0].camera
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch

from megatron_puffin.camera import CameraError, CameraValues, parse_camera, parse_camera_tolerant
from megatron_puffin.data import templates
from megatron_puffin.data.task_encoders import EncodedSample, TaskEncoder, TaskEncoderConfig
from megatron_puffin.inference.batching import prompt_batch
from megatron_puffin.inference.decoding import greedy_decode

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512
"""Puffin's decoding limit (docs/puffin.md §6.1)."""
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


@dataclass
class UnderstandingOutput:
    """One decoded answer.

    Attributes:
        text: the decoded answer, special tokens skipped (Puffin's ``output_text``).
        camera: (roll, pitch, vfov) in radians read from the text (a strict caption/``<answer>`` parse, else the
            evaluation's first float triple), or None when the text holds none.
        reasoning: the text inside ``<think>...</think>`` (thinking answers), else None.
        token_ids: the generated ids without the end token.
        finished: the answer ended with ``<|im_end|>`` within the token limit.
        prompt: the rendered prompt text (image placeholders shown as ``<image>``).
    """

    text: str
    camera: Optional[CameraValues]
    reasoning: Optional[str] = None
    token_ids: List[int] = field(default_factory=list)
    finished: bool = True
    prompt: str = ""


def read_camera(text: str) -> Optional[CameraValues]:
    """The camera an answer states: a strict parse of a base caption or ``<answer>`` block, else the first float
    triple anywhere (as the published evaluation reads it), else None."""
    try:
        return parse_camera(text).values()
    except CameraError:
        values, fallback = parse_camera_tolerant(text)
        return None if fallback else values


def read_reasoning(text: str) -> Optional[str]:
    """The stripped text inside the first ``<think>...</think>``, or None."""
    match = _THINK_RE.search(text)
    return match.group(1).strip() if match else None


def default_encoder_config(model) -> TaskEncoderConfig:
    """Prompt assembly settings from the model's shape (patch/fold, query count, image size: Puffin's 512 or the
    vision tower's largest if smaller), generous text limits. Prefer a loaded checkpoint's ``encoder_config``."""
    config = model.puffin_config
    size = min(TaskEncoderConfig.image_max_size, config.vision.max_image_size)
    return TaskEncoderConfig(image_max_size=size, vision_patch_size=config.vision.patch_size,
                             vision_fold=config.vision.fold_size,
                             num_query_tokens=config.connector.num_queries, max_understanding_text_tokens=1 << 20,
                             max_generation_text_tokens=1 << 20, cfg_dropout_prob=0.0, mixed_motion_prob=0.0)


def understanding_prompt_text(prompt: Optional[str], thinking: bool) -> str:
    """The instruction: ``prompt`` as given, else the thinking prompt or the base caption prompt (head 1)."""
    if prompt is not None:
        return prompt
    return templates.THINKING_PROMPT if thinking else templates.caption_prompt(0)


def decode_prompts(model, tokenizer, samples: Sequence[EncodedSample], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   batch_size: int = 8, use_kv_cache: bool = True,
                   progress: Optional[Callable[[int], None]] = None) -> List[UnderstandingOutput]:
    """Greedy answers to encoded understanding prompts, ``batch_size`` at a time (left padded with 0).

    Args:
        model: a :class:`~megatron_puffin.models.puffin.PuffinModel` (any TP; with pipeline stages every pipeline
            rank calls this with the same prompts) in eval mode.
        tokenizer: its :class:`~megatron_puffin.data.PuffinTokenizer`.
        samples: prompts from :meth:`TaskEncoder.understanding_prompt`.
        max_new_tokens: decoding limit per answer.
        batch_size: prompts decoded together.
        use_kv_cache: False recomputes the whole sequence every step (same tokens; for checks).
        progress: called with the number of prompts finished after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch size ({batch_size}) must be at least 1")
    outputs: List[UnderstandingOutput] = []
    vocab_size = model.puffin_config.llm.vocab_size
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = prompt_batch(chunk, templates.UNDERSTANDING_PAD_ID)
        decoded = greedy_decode(model, batch, tokenizer.im_end_id, max_new_tokens, vocab_size,
                                use_kv_cache=use_kv_cache)
        for sample, ids, finished in zip(chunk, decoded.sequences(), decoded.finished):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            outputs.append(UnderstandingOutput(text=text, camera=read_camera(text), reasoning=read_reasoning(text),
                                               token_ids=ids, finished=finished, prompt=sample.text))
        if progress is not None:
            progress(len(chunk))
    return outputs


def understand(model, tokenizer, images: Sequence[torch.Tensor], prompt: Union[None, str, Sequence[str]] = None,
               thinking: bool = False, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 8,
               encoder_config: Optional[TaskEncoderConfig] = None, use_kv_cache: bool = True,
               progress: Optional[Callable[[int], None]] = None) -> List[UnderstandingOutput]:
    """Describe images and estimate their cameras by greedy decoding with a KV cache.

    Args:
        model: a built, loaded :class:`~megatron_puffin.models.puffin.PuffinModel` (any TP; every TP rank calls this
            with the same inputs, and with pipeline stages every pipeline rank too: validation at PP > 1), in eval
            mode (:func:`~.loading.load_puffin` returns one).
        tokenizer: the checkpoint's :class:`~megatron_puffin.data.PuffinTokenizer`.
        images: float32 ``[3, H, W]`` in [-1, 1], sides multiples of patch * fold (e.g. from
            :func:`~.images.load_image`); they are padded to squares as in training.
        prompt: the instruction (one for all images, or one per image); default the base caption prompt or, with
            ``thinking``, the stage-3 thinking prompt.
        thinking: use the thinking prompt (stage-3/4 checkpoints answer ``<think>...</think><answer>R, P, F</answer>``).
        max_new_tokens: decoding limit (Puffin: 512).
        batch_size: images decoded together.
        encoder_config: prompt assembly settings (default from the model's shape).
        use_kv_cache: False recomputes every step (same tokens, slower).
        progress: called with the number of images finished after each batch.

    Returns:
        One :class:`UnderstandingOutput` per image, in order.
    """
    prompts = [prompt] * len(images) if prompt is None or isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images; give one prompt or one per image")
    encoder = TaskEncoder("image2text", tokenizer, encoder_config or default_encoder_config(model))
    samples = [encoder.understanding_prompt(understanding_prompt_text(text, thinking), image)
               for text, image in zip(prompts, images)]
    return decode_prompts(model, tokenizer, samples, max_new_tokens, batch_size, use_kv_cache, progress)


def reason(model, tokenizer, captions: Sequence[str], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
           batch_size: int = 8, encoder_config: Optional[TaskEncoderConfig] = None) -> List[str]:
    """Thinking-mode reasoning for generation prompts (docs/puffin.md §6.2): the text2text prompt
    ``{reasoning prompt} {caption}`` decoded greedily; returns the reasoning texts."""
    encoder = TaskEncoder("text2text", tokenizer, encoder_config or default_encoder_config(model))
    samples = [encoder.understanding_prompt(templates.REASONING_PROMPT + " ", None, variable=caption)
               for caption in captions]
    return [output.text for output in decode_prompts(model, tokenizer, samples, max_new_tokens, batch_size)]
