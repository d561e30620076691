"""Chat template, special tokens, placeholder ids and instruction prompts of Puffin (docs/puffin.md §1.2, §3.4).

The prompt strings are data: the released checkpoints were trained on exactly these strings, so they are
reproduced verbatim and must not be edited.
"""
from typing import Tuple

# --- placeholder ids: defined with the tasks (one home for data, models and training) ----------------------------
from megatron_puffin.tasks import (  # noqa: F401  (re-exported: the prompt layouts use them)
    IGNORE_INDEX,
    INPUT_IMAGE_TOKEN_INDEX,
    OUTPUT_IMAGE_TOKEN_INDEX,
    QUERY_TOKEN_INDEX,
    UNDERSTANDING_PAD_ID,
)

# --- special tokens (strings; their ids come from the tokenizer), docs/puffin.md §1.2 ---------------------------------------
ENDOFTEXT_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"
SPECIAL_TOKENS: Tuple[str, ...] = (
    ENDOFTEXT_TOKEN,
    IM_START_TOKEN,
    IM_END_TOKEN,
    VISION_START_TOKEN,
    VISION_END_TOKEN,
    IMAGE_PAD_TOKEN,
)
"""The chat special tokens every Puffin tokenizer must know as single tokens."""
STOP_WORDS: Tuple[str, ...] = (IM_END_TOKEN, ENDOFTEXT_TOKEN)
DEFAULT_IMAGE_TOKEN = "<image>"
"""Literal text marking where the input image goes in an understanding prompt (split out, never tokenised)."""

# --- chat template (model config strings), docs/puffin.md §1.2 ----------------------------------------------------------
SYSTEM_TEMPLATE = "<|im_start|>system\n{system}<|im_end|>\n"
"""Defined by the reference, never emitted."""
INSTRUCTION_TEMPLATE = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
SUFFIX = IM_END_TOKEN
"""Appended to every answer; it is supervised and acts as EOS."""
SEP = "\n"
"""Appended after each answer, label-ignored."""
GENERATION_TEMPLATE = "Generate an image: {input}"
GENERATION_CROSS_TEMPLATE = "Generate a target image given an initial view: {input}"

# --- instruction prompts, docs/puffin.md §3.4 (verbatim) ----------------------------------------------------------------
CAPTION_PROMPT_HEADS: Tuple[str, ...] = (
    "Describe the image in detail.",
    "Provide a comprehensive description of everything you see in the picture.",
    "Explain the scene depicted in the image as if you were describing it to someone who cannot see it.",
    "List all the objects and activities taking place in this image.",
    "What is the story being told by this image? Describe in detail.",
    "Imagine you are giving a detailed tour of the image's scene. How would you describe it?",
    "Describe the foreground, background, and any notable features of the image.",
    "How would you describe this image to build a replica of the scene?",
    "Write a paragraph detailing the setting, characters, and actions visible in this image.",
    "Describe every aspect of the image, including the environment, objects, and any people present.",
    "Provide a detailed analysis of the composition and elements of the image.",
    "What are the main focal points of this image? Describe them in detail.",
    "Catalog all visible elements in the image and describe their significance to the overall scene.",
)
CAPTION_PROMPT_SUFFIX = (
    " Then reason its spatial distribution and estimate its camera parameters (roll, pitch, and field-of-view)."
)
THINKING_PROMPT = (
    "Reason the spatial distribution of this image in a thinking mode, and then estimate its camera parameters "
    "(roll, pitch, and field-of-view)."
)
REASONING_PROMPT = (
    "Given a scene description and corresponding camera parameters, merge them into a coherent prompt and generate "
    "an accurate visualization that highlights visual cues for spatial reasoning."
)
CROSS_VIEW_PROMPT_PREFIX = (
    "Given the initial view and the camera parameters of the target view with the deviation yaw angle, "
)
CROSS_VIEW_PROMPT_TAILS: Tuple[str, ...] = (
    "describe the target image in detail.",
    "provide a comprehensive description of everything you see in the target image.",
    "explain the scene depicted in the target image as if you were describing it to someone who cannot see it.",
    "list all the objects and activities taking place in the target image.",
    "what is the story being told by the target image? Describe in detail.",
    "imagine you are giving a detailed tour of the target image's scene. How would you describe it?",
    "describe the foreground, background, and any notable features of the target image.",
    "how would you describe the target image to build a replica of the scene?",
    "write a paragraph detailing the setting, characters, and actions visible in the target image.",
    "describe every aspect of the target image, including the environment, objects, and any people present.",
    "provide a detailed analysis of the composition and elements of the target image.",
    "what are the main focal points of the target image? Describe them in detail.",
    "catalog all visible elements in the target image and describe their significance to the overall scene.",
)
PHOTOGRAPHY_PROMPT = (
    "Estimate the camera parameters (roll, pitch, and field-of-view) of this image. And then predict the deviation "
    "camera yaw angle and pitch angle of the target view with high photographic aesthetics."
)
CAMERA_SENTENCE_START = "The camera parameters"
"""Mixed-motion trimming keeps a cross-view caption from this phrase on (docs/puffin.md §3.10)."""


def caption_prompt(head_index: int) -> str:
    """The stage-1/2 image2text prompt: head ``head_index`` (0..12) followed by the common suffix."""
    return CAPTION_PROMPT_HEADS[head_index] + CAPTION_PROMPT_SUFFIX


def cross_view_prompt(tail_index: int, camera_text: str) -> str:
    """The stage-4 cross-view understanding prompt: prefix, tail ``tail_index`` (0..12), a space, camera text."""
    return CROSS_VIEW_PROMPT_PREFIX + CROSS_VIEW_PROMPT_TAILS[tail_index] + " " + camera_text


def instruction(text: str) -> str:
    """Wraps a user input into the single-turn chat template (no system turn)."""
    return INSTRUCTION_TEMPLATE.format(input=text)


def all_prompt_texts() -> Tuple[str, ...]:
    """Every fixed prompt string, e.g. to train a tokenizer that encodes them compactly."""
    return (
        *(caption_prompt(i) for i in range(len(CAPTION_PROMPT_HEADS))),
        THINKING_PROMPT,
        REASONING_PROMPT,
        *(CROSS_VIEW_PROMPT_PREFIX + tail for tail in CROSS_VIEW_PROMPT_TAILS),
        PHOTOGRAPHY_PROMPT,
        GENERATION_TEMPLATE.format(input=""),
        GENERATION_CROSS_TEMPLATE.format(input=""),
        instruction(""),
    )
