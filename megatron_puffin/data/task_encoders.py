"""Task encoders: one typed dataset sample -> model inputs of one task (docs/puffin.md §2.1, §2.2, §2.4, §3.4-§3.10).

Token layouts (ids; ``[x] * n`` = n copies):

* understanding (image2text*, image2text_cross_view)::

      tok("<|im_start|>user\\n") [-200]*N tok("\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n") tok(answer) <|im_end|> "\\n"

  labels: -100 on the prompt and on the final "\\n", the answer ids and ``<|im_end|>`` supervised.
* text2text: ``tok("<|im_start|>user\\n{reasoning prompt} {base caption}<|im_end|>\\n<|im_start|>assistant\\n")``
  then answer (the thinking reasoning), ``<|im_end|>``, "\\n" as above.
* text2image / cam2image: ``tok("<|im_start|>user\\nGenerate an image: {text}<|im_end|>\\n<|im_start|>assistant\\n")``
  then [-400]*64; no labels (the loss is on the image).
* image2image: ``tok("<|im_start|>user\\n<|vision_start|>" + "<|image_pad|>"*N + "<|vision_end|>\\nGenerate a target
  image given an initial view: {text}<|im_end|>\\n<|im_start|>assistant\\n")`` then [-400]*64.

N = number of visual tokens of the pad-to-square image: (S / (patch * fold))^2 with S its side.

Randomness (prompt head / tail, CFG text dropout, mixed-motion trimming) is a pure function of (seed, stream name,
position of the sample in the stream's global order), so it is identical on every run, independent of the number
of data-parallel ranks and workers, and differs between epochs. Length limits count text tokens only (image
placeholders and queries are never dropped) and cut the answer on the right (reference: left truncation, §9.7).
"""
import functools
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from megatron_puffin.camera import camera_text, format_caption, format_thinking_caption
from megatron_puffin.data import templates
from megatron_puffin.data.images import load_dynamic, pad_to_square
from megatron_puffin.data.tokenizer import PuffinTokenizer
from megatron_puffin.distributed.random import derive_seed
from megatron_puffin.tasks import TASK_VARIANTS

logger = logging.getLogger(__name__)

REQUIRED_FIELDS: Dict[str, Tuple[str, ...]] = {
    "image2text": ("image", "caption", "camera"),
    "image2text_thinking": ("image", "reasoning", "camera"),
    "image2text_photography": ("image", "answer"),
    "image2text_cross_view": ("image_init", "scene", "camera"),
    "text2text": ("caption", "reasoning", "camera"),
    "text2image": ("image", "caption", "camera"),
    "cam2image": ("image", "caption", "camera"),
    "cam2image_thinking": ("image", "caption", "reasoning", "camera"),
    "image2image": ("image", "image_init", "camera"),
}
"""Dataset fields each stream task reads (checked against the shards when a loader is built)."""
_UNIT = float(1 << 63)


@dataclass(frozen=True)
class TaskEncoderConfig:
    """Knobs of the task encoders.

    Attributes:
        seed: Seed of prompt choice, CFG dropout and mixed-motion trimming.
        image_max_size: Longest side after the dynamic resize (§3.5).
        image_unit: Both sides are rounded up to multiples of this.
        vision_patch_size: Vision encoder patch size (RADIO: 16).
        vision_fold: Space-to-depth fold of the visual tokens (2: 2x2 patches per token).
        num_query_tokens: Meta-query slots appended to generation prompts.
        max_understanding_text_tokens: Text tokens (prompt + answer + terminators, image placeholders excluded) of an
            understanding sample; longer answers are cut on the right.
        max_generation_text_tokens: Text tokens of a generation prompt (vision pads and queries excluded); longer
            captions are cut on the right.
        cfg_dropout_prob: Probability of replacing the caption by "" (text2image, cam2image; §2.2).
        mixed_motion_prob: Probability of keeping only the camera text of a cross-view caption (§3.10).
    """

    seed: int = 0
    image_max_size: int = 512
    image_unit: int = 32
    vision_patch_size: int = 16
    vision_fold: int = 2
    num_query_tokens: int = 64
    max_understanding_text_tokens: int = 1024
    max_generation_text_tokens: int = 256
    cfg_dropout_prob: float = 0.1
    mixed_motion_prob: float = 0.5

    @property
    def token_unit(self) -> int:
        """Pixels per visual token side (patch * fold)."""
        return self.vision_patch_size * self.vision_fold

    def num_image_tokens(self, height: int, width: int) -> int:
        """Visual tokens of an image of this size: (H / (patch * fold)) * (W / (patch * fold))."""
        unit = self.token_unit
        if height % unit or width % unit:
            raise ValueError(f"image {height}x{width} is not a multiple of patch*fold = {unit} pixels")
        return (height // unit) * (width // unit)


@dataclass
class EncodedSample:
    """Model inputs of one sample (see the module docstring for the layouts).

    Attributes:
        task: Loss task (key of §2.4).
        input_ids: int64 [L] with placeholder ids (-200 image, -400 query).
        labels: int64 [L] (understanding) or None (generation).
        vision_image: float32 [3, S, S] in [-1, 1] for the vision tower (pad-to-square), or None.
        target_image: float32 [3, H, W] in [-1, 1], the generation target, or None.
        init_image: float32 [3, H, W] in [-1, 1], the image2image initial view for the VAE, or None.
        camera: float32 [3] (roll, pitch, vfov) whose camera map conditions generation, or None.
        text: The prompt text (answer excluded), for logs.
        num_image_tokens: Visual tokens in ``input_ids`` (-200 or ``<|image_pad|>``).
        truncated: True when the answer (or a caption) was cut to the length limit.
        cfg_dropped: True when the caption was dropped for classifier-free guidance.
        sample_index: Index of the sample in its dataset.
        position: Position of the sample in its stream's global order.
    """

    task: str
    input_ids: torch.Tensor
    labels: Optional[torch.Tensor] = None
    vision_image: Optional[torch.Tensor] = None
    target_image: Optional[torch.Tensor] = None
    init_image: Optional[torch.Tensor] = None
    camera: Optional[torch.Tensor] = None
    text: str = ""
    num_image_tokens: int = 0
    truncated: bool = False
    cfg_dropped: bool = False
    sample_index: int = -1
    position: int = -1
    latents: Optional[Dict[str, torch.Tensor]] = None
    """Cached VAE moments by batch key (``target_moments``, ...: float32 [2, C, h, w]) with --cached-latents."""


def _uniform(seed: int, *keys: Any) -> float:
    """A deterministic number in [0, 1) from (seed, keys)."""
    return derive_seed(seed, *keys) / _UNIT


def _require(sample: Dict[str, Any], task: str) -> None:
    missing = [name for name in REQUIRED_FIELDS[task] if sample.get(name) in (None, b"", "")]
    if missing:
        raise ValueError(
            f"task {task} needs the fields {list(REQUIRED_FIELDS[task])} but sample {sample.get('key')!r} "
            f"(index {sample.get('index')}) lacks {missing}; use a dataset that has them (see docs/data.md)"
        )


class TextTooLong(ValueError):
    """A prompt whose fixed part (the instruction, not the trimmable caption or answer) exceeds the text-token
    limit; the message names the limit's flag. ``tokens``: the text tokens the fixed part needs (for an
    understanding task with the shortest answer, one token), the smallest value of the flag that fits; ``limit``:
    the flag's value."""

    def __init__(self, message: str, tokens: int = 0, limit: int = 0):
        super().__init__(message)
        self.tokens, self.limit = tokens, limit

    def __reduce__(self):
        return (TextTooLong, (str(self), self.tokens, self.limit))


class TaskEncoder:
    """Encodes dataset samples for one stream task (a key of :data:`TASK_VARIANTS`).

    Args:
        task: Stream task name, e.g. "image2text_thinking".
        tokenizer: The tokenizer.
        config: Encoder settings.
        stream: Stream name, part of the randomness keys (so two streams of the same task differ).
    """

    def __init__(self, task: str, tokenizer: PuffinTokenizer, config: TaskEncoderConfig, stream: str = ""):
        if task not in TASK_VARIANTS:
            raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASK_VARIANTS)}")
        self.task, self.loss_task = task, TASK_VARIANTS[task]
        self.tokenizer, self.config, self.stream = tokenizer, config, stream
        self._newline = [tokenizer.newline_id] if tokenizer.newline_id is not None else tokenizer.encode("\n")

    def __call__(self, sample: Dict[str, Any], position: int = 0) -> EncodedSample:
        """Encodes one sample (a :class:`~.format.PuffinDataset` item) at a stream position."""
        _require(sample, self.task)
        encoded = ENCODERS[self.loss_task](self, sample, position)
        encoded.sample_index, encoded.position = int(sample.get("index", -1)), position
        return encoded

    # --- randomness --------------------------------------------------------------------------------------------
    def _choice(self, purpose: str, position: int, count: int) -> int:
        return derive_seed(self.config.seed, purpose, self.stream, position) % count

    def prompt_variant_positions(self) -> List[int]:
        """Stream positions at which this encoder uses each of its prompt templates once (the caption heads of
        image2text, the cross-view tails; one position for a task with a single template): encoding one sample at
        each shows the longest fixed prompt part."""
        if self.task == "image2text":
            purpose, count = "prompt_head", len(templates.CAPTION_PROMPT_HEADS)
        elif self.task == "image2text_cross_view":
            purpose, count = "prompt_tail", len(templates.CROSS_VIEW_PROMPT_TAILS)
        else:
            return [0]
        first: Dict[int, int] = {}  # template -> the first position drawing it
        position = 0
        while len(first) < count:  # each draw is uniform over count: a few times count positions suffice
            first.setdefault(self._choice(purpose, position, count), position)
            position += 1
        return sorted(first.values())

    def prompt_limit_error(self, sample: Dict[str, Any]) -> Optional[TextTooLong]:
        """Encodes ``sample`` once per prompt template (:meth:`prompt_variant_positions`; its images decoded once)
        and returns the :class:`TextTooLong` of the template that needs the most text tokens, or None when every
        template fits the limits."""
        errors: List[TextTooLong] = []
        self._load = functools.lru_cache(maxsize=2)(self._load)  # the same bytes at every position
        try:
            for position in self.prompt_variant_positions():
                try:
                    self(sample, position)
                except TextTooLong as error:
                    errors.append(error)
        finally:
            del self._load  # back to the method
        return max(errors, key=lambda error: error.tokens) if errors else None

    def _happens(self, purpose: str, position: int, probability: float) -> bool:
        return probability > 0 and _uniform(self.config.seed, purpose, self.stream, position) < probability

    # --- images ------------------------------------------------------------------------------------------------
    def _load(self, data: bytes) -> torch.Tensor:
        return load_dynamic(data, self.config.image_max_size, self.config.image_unit)

    def _vision(self, image: torch.Tensor) -> Tuple[torch.Tensor, int]:
        square = pad_to_square(image)
        return square, self.config.num_image_tokens(square.shape[-2], square.shape[-1])

    # --- texts -------------------------------------------------------------------------------------------------
    def _fit_text(self, render, text: str, budget: int, extra_tokens: int = 0,
                  limit_flag: str = "--max-understanding-text-tokens",
                  reserved: int = 0) -> Tuple[List[int], str, bool]:
        """Tokenises ``render(text)``, cutting ``text`` on the right until it has <= budget + extra_tokens ids.

        The whole rendered string is tokenised at once (as the reference does), so ids are identical to the
        reference whenever no cut is needed. ``reserved``: the text tokens outside ``render`` that count against the
        same flag (``budget + reserved`` is its value), for the error message. Returns (ids, text actually used,
        truncated).
        """
        ids = self.tokenizer.encode(render(text))
        if len(ids) <= budget + extra_tokens:
            return ids, text, False
        text_ids = self.tokenizer.encode(text)
        keep = max(0, len(text_ids) - (len(ids) - budget - extra_tokens))
        while True:
            cut = self.tokenizer.decode(text_ids[:keep])
            ids = self.tokenizer.encode(render(cut))
            if len(ids) <= budget + extra_tokens or keep == 0:
                if len(ids) > budget + extra_tokens:
                    needed, limit = len(ids) - extra_tokens + reserved, budget + reserved
                    raise TextTooLong(
                        f"the fixed part of the {self.task} prompt needs {needed} text tokens, more than "
                        f"{limit_flag} {limit}; raise {limit_flag} to at least {needed}", needed, limit,
                    )
                return ids, cut, True
            keep -= 1

    def _understanding(self, prompt_text: str, answer: str, image: Optional[torch.Tensor], variable: str = ""):
        """Assembles an understanding sample; ``variable`` (a suffix of the prompt) may be cut if the prompt is too long."""
        config, tokenizer = self.config, self.tokenizer
        budget = config.max_understanding_text_tokens
        marker = templates.DEFAULT_IMAGE_TOKEN + "\n" if image is not None else ""

        def render(text):
            return templates.instruction(marker + prompt_text + text)

        num_tokens, vision, head = 0, None, []
        if image is not None:
            vision, num_tokens = self._vision(image)
            head = tokenizer.encode(render("").split(templates.DEFAULT_IMAGE_TOKEN, 1)[0])

        def render_tail(text):
            return render(text).split(templates.DEFAULT_IMAGE_TOKEN, 1)[1] if image is not None else render(text)

        # the answer keeps at least one token
        tail_ids, used, prompt_cut = self._fit_text(render_tail, variable, budget - len(head) - 1,
                                                    reserved=len(head) + 1)
        prompt_ids = head + [templates.INPUT_IMAGE_TOKEN_INDEX] * num_tokens + tail_ids
        answer_ids, answer_cut = self._answer_ids(answer, budget - len(head) - len(tail_ids))
        input_ids = torch.tensor(prompt_ids + answer_ids, dtype=torch.long)
        labels = input_ids.clone()
        labels[: len(prompt_ids)] = templates.IGNORE_INDEX
        if not answer_cut:
            labels[-len(self._newline):] = templates.IGNORE_INDEX
        return EncodedSample(self.loss_task, input_ids, labels, vision_image=vision, text=render(used),
                             num_image_tokens=num_tokens, truncated=prompt_cut or answer_cut)

    def understanding_prompt(self, prompt_text: str, image: Optional[torch.Tensor] = None,
                             variable: str = "") -> EncodedSample:
        """The prompt of an understanding sample without an answer (it ends with the assistant turn), for decoding.

        Same assembly as training (layout in the module docstring): ``image`` is the dynamic-resized input image
        (pad-to-square is applied here), ``variable`` a prompt suffix (text2text: the base caption). ``labels`` is
        None and ``text`` the rendered prompt.
        """
        sample = self._understanding(prompt_text, "", image, variable)
        answer_terminators = 1 + len(self._newline)  # an empty answer is "<|im_end|>" + "\n"
        sample.input_ids = sample.input_ids[:-answer_terminators].clone()
        sample.labels = None
        return sample

    def generation_prompt(self, text: str, init_image: Optional[torch.Tensor] = None) -> EncodedSample:
        """The prompt of a generation sample for sampling: cam2image/text2image without ``init_image``, image2image
        (world exploration) with it; ``text`` is used as given (no CFG dropout, no mixed-motion trimming)."""
        if init_image is None:
            return self._generation(lambda t: templates.instruction(templates.GENERATION_TEMPLATE.format(input=t)),
                                    text)
        vision, num_tokens = self._vision(init_image)
        encoded = self._generation(self._image2image_render(num_tokens), text, extra_tokens=num_tokens,
                                   vision_image=vision, init_image=init_image)
        encoded.task, encoded.num_image_tokens = "image2image", num_tokens
        return encoded

    @staticmethod
    def _image2image_render(num_tokens: int):
        image_tokens = (templates.VISION_START_TOKEN + templates.IMAGE_PAD_TOKEN * num_tokens
                        + templates.VISION_END_TOKEN)

        def render(text):
            return templates.instruction(image_tokens + "\n" + templates.GENERATION_CROSS_TEMPLATE.format(input=text))

        return render

    def _answer_ids(self, answer: str, budget: int) -> Tuple[List[int], bool]:
        """Answer ids + <|im_end|> + "\\n"; cut on the right (without terminators) when over ``budget``."""
        ids = self.tokenizer.encode(answer) + [self.tokenizer.im_end_id] + self._newline
        if len(ids) <= budget:
            return ids, False
        return ids[: max(budget, 1)], True

    def _encode_image2text(self, sample: Dict[str, Any], position: int) -> EncodedSample:
        image = self._load(sample["image"])
        if self.task == "image2text_thinking":
            prompt, answer = templates.THINKING_PROMPT, format_thinking_caption(sample["reasoning"], sample["camera"])
        elif self.task == "image2text_photography":
            prompt, answer = templates.PHOTOGRAPHY_PROMPT, sample["answer"]
        else:
            head = self._choice("prompt_head", position, len(templates.CAPTION_PROMPT_HEADS))
            prompt, answer = templates.caption_prompt(head), format_caption(sample["caption"], sample["camera"])
        return self._understanding(prompt, answer, image)

    def _encode_image2text_cross_view(self, sample: Dict[str, Any], position: int) -> EncodedSample:
        image = self._load(sample["image_init"])
        tail = self._choice("prompt_tail", position, len(templates.CROSS_VIEW_PROMPT_TAILS))
        prompt = templates.cross_view_prompt(tail, camera_text(sample["camera"]))
        return self._understanding(prompt, sample["scene"], image)

    def _encode_text2text(self, sample: Dict[str, Any], position: int) -> EncodedSample:
        base = format_caption(sample["caption"], _without_yaw(sample["camera"]))
        return self._understanding(templates.REASONING_PROMPT + " ", sample["reasoning"], None, variable=base)

    # --- generation --------------------------------------------------------------------------------------------
    def _generation(self, render, text: str, extra_tokens: int = 0, **images) -> EncodedSample:
        ids, used, cut = self._fit_text(render, text, self.config.max_generation_text_tokens, extra_tokens,
                                        limit_flag="--max-generation-text-tokens")
        ids = ids + [templates.QUERY_TOKEN_INDEX] * self.config.num_query_tokens
        return EncodedSample(self.loss_task, torch.tensor(ids, dtype=torch.long), text=render(used), truncated=cut,
                             **images)

    def _camera_values(self, sample: Dict[str, Any]) -> torch.Tensor:
        camera = sample["camera"]
        return torch.tensor([camera.roll, camera.pitch, camera.vfov], dtype=torch.float32)

    def _encode_generation_caption(self, sample: Dict[str, Any]) -> str:
        caption = format_caption(sample["caption"], _without_yaw(sample["camera"]))
        if self.task == "cam2image_thinking":
            caption = caption + " " + sample["reasoning"]
        return caption

    def _encode_text2image(self, sample: Dict[str, Any], position: int) -> EncodedSample:
        return self._encode_cam2image(sample, position)

    def _encode_cam2image(self, sample: Dict[str, Any], position: int) -> EncodedSample:
        text = self._encode_generation_caption(sample)
        dropped = self._happens("cfg_dropout", position, self.config.cfg_dropout_prob)
        encoded = self._generation(
            lambda t: templates.instruction(templates.GENERATION_TEMPLATE.format(input=t)),
            "" if dropped else text,
            target_image=self._load(sample["image"]),
            camera=self._camera_values(sample) if self.loss_task == "cam2image" else None,
        )
        encoded.cfg_dropped = dropped
        return encoded

    def _encode_image2image(self, sample: Dict[str, Any], position: int) -> EncodedSample:
        init = self._load(sample["image_init"])
        vision, num_tokens = self._vision(init)
        camera = sample["camera"]
        trimmed = self._happens("mixed_motion", position, self.config.mixed_motion_prob)
        text = camera_text(camera) if trimmed or not sample.get("caption") else format_caption(sample["caption"], camera)
        encoded = self._generation(self._image2image_render(num_tokens), text, extra_tokens=num_tokens,
                                   vision_image=vision, target_image=self._load(sample["image"]), init_image=init,
                                   camera=self._camera_values(sample))
        encoded.num_image_tokens = num_tokens
        return encoded


def _without_yaw(camera):
    """Base captions carry roll, pitch and vfov only."""
    return camera if camera.yaw is None else type(camera)(camera.roll, camera.pitch, camera.vfov)


ENCODERS = {
    "image2text": TaskEncoder._encode_image2text,
    "image2text_cross_view": TaskEncoder._encode_image2text_cross_view,
    "text2text": TaskEncoder._encode_text2text,
    "text2image": TaskEncoder._encode_text2image,
    "cam2image": TaskEncoder._encode_cam2image,
    "image2image": TaskEncoder._encode_image2image,
}
"""Loss task -> the :class:`TaskEncoder` method encoding its samples (every task of ``megatron_puffin.tasks``)."""
