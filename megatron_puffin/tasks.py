"""The six Puffin tasks and the placeholder token ids of their layouts (docs/puffin.md §1.2, §2.4).

One low-level home that the data pipeline, the models and the training loop all import: nothing here imports
another part of the package.
"""
from typing import Dict, Tuple

UNDERSTANDING_TASKS: Tuple[str, ...] = ("image2text", "image2text_cross_view", "text2text")
"""Tasks whose loss is the token-mean cross-entropy of the answer."""
GENERATION_TASKS: Tuple[str, ...] = ("text2image", "cam2image", "image2image")
"""Tasks whose loss is the per-sample flow-matching MSE of the target image's latents."""
TASKS: Tuple[str, ...] = UNDERSTANDING_TASKS + GENERATION_TASKS
IMAGE_INPUT_TASKS: Tuple[str, ...] = ("image2text", "image2text_cross_view", "image2image")
"""Tasks whose LLM prompt holds an input image's visual tokens."""

TASK_VARIANTS: Dict[str, str] = {
    "image2text": "image2text",
    "image2text_thinking": "image2text",
    "image2text_photography": "image2text",
    "image2text_cross_view": "image2text_cross_view",
    "text2text": "text2text",
    "text2image": "text2image",
    "cam2image": "cam2image",
    "cam2image_thinking": "cam2image",
    "image2image": "image2image",
}
"""Stream task name -> task of the loss (docs/puffin.md §2.4). Variants choose prompts/answers (§3.4, §3.7, §5.4)."""

# --- placeholder ids (never tokenised; replaced by embeddings before the LLM), docs/puffin.md §1.2 -------------------
IGNORE_INDEX = -100
"""Label value ignored by the cross-entropy loss."""
INPUT_IMAGE_TOKEN_INDEX = -200
"""Understanding prompts: one id per visual token of the input image (the `<image>` text is replaced by these)."""
OUTPUT_IMAGE_TOKEN_INDEX = -300
"""Defined by the reference, unused."""
QUERY_TOKEN_INDEX = -400
"""The meta-query slots appended at the end of every generation prompt."""
UNDERSTANDING_PAD_ID = 0
"""Left-padding value of ``input_ids`` in understanding micro-batches (masked out; labels are padded with -100)."""


def is_generation(task: str) -> bool:
    """Whether ``task`` (a loss task, see :data:`TASK_VARIANTS`) is trained by flow matching."""
    return task in GENERATION_TASKS
