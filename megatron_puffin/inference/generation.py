"""Generation: text + camera (+ initial view) -> image (docs/puffin.md §6.2).

One request is a camera (roll, pitch, vfov, optional yaw), an optional scene caption and, for world exploration,
an initial view. Per batch of requests:

1. Prompt text: ``{caption} The camera parameters (roll, pitch, and field-of-view) are: R, P, F.`` (a yaw adds the
   cross-view sentence). With ``thinking`` the LLM first writes its spatial reasoning from the text2text prompt
   (:func:`~.understanding.reason`) and the prompt becomes ``{prompt} {reasoning}``.
2. Prompts are assembled by the training task encoders (:meth:`TaskEncoder.generation_prompt`): the GENERATION
   template + the meta-query slots, or with an initial view the GENERATION_CROSS template with its visual tokens.
   The negative prompt is the same template with ``negative_caption`` (default empty) and the same initial view.
3. One LLM pass over ``[negatives; positives]`` (left padded with ``<|endoftext|>``), the last-layer states of the
   query slots through the connectors -> pooled and sequence conditioning.
4. Condition latents: the camera map at the output size (/(pi/2)) and, for world exploration, the initial view,
   VAE-encoded (posterior sample) and given to **both** CFG branches, so guidance contrasts the text only.
5. Euler sampling of the flow ODE with CFG (:class:`~megatron_puffin.diffusion.FlowMatchEulerSampler`; default
   scale 4.5, 50 steps; scale <= 1 runs no negative branch), VAE decode, ``clamp(127.5 x + 128, 0, 255)`` to uint8.

Randomness: every request has its own seed (default ``settings.seed + its index``); the initial noise and the
posterior samples of its condition latents come from CPU generators seeded from it, so an image depends on its
request and seed only (not on the batch it shares, the device or the TP size).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_puffin.camera import Camera, camera_maps, format_caption, normalize_camera_map
from megatron_puffin.data.task_encoders import TaskEncoder, TaskEncoderConfig
from megatron_puffin.diffusion import FlowMatchEulerSampler, guided_dit_velocity
from megatron_puffin.diffusion.config import inference_steps_problem
from megatron_puffin.distributed.random import derive_seed
from megatron_puffin.inference.batching import prompt_batch
from megatron_puffin.inference.images import to_uint8
from megatron_puffin.inference.journal import shorten
from megatron_puffin.models.batch import PuffinBatch
from megatron_puffin.inference.understanding import DEFAULT_MAX_NEW_TOKENS, default_encoder_config, reason

logger = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    """One image to generate.

    Attributes:
        camera: target camera; a yaw (world exploration) adds the cross-view yaw sentence to the prompt. The camera
            map (roll, pitch, vfov) conditions the MMDiT.
        caption: scene description (may be empty: camera-only generation).
        init_image: initial view float32 ``[3, S, S]`` in [-1, 1] (world exploration), or None.
        seed: this image's seed; default ``GenerationSettings.seed`` + the request's index.
    """

    camera: Camera
    caption: str = ""
    init_image: Optional[torch.Tensor] = None
    seed: Optional[int] = None


@dataclass
class GenerationSettings:
    """Sampling settings (Puffin's defaults, docs/puffin.md §6.2).

    Attributes:
        guidance_scale: classifier-free guidance scale; <= 1 runs the positive branch only.
        num_inference_steps: Euler steps.
        seed: base seed (request i uses ``seed + i`` unless it has its own).
        image_size: output side in pixels (square; a multiple of the VAE factor x DiT patch); default the model's
            training image size.
        negative_caption: the negative prompt's text, rendered through the same template (Puffin: empty).
        thinking: write spatial reasoning first (stage-3 checkpoints) and append it to the prompt.
        max_reasoning_tokens: decoding limit of the reasoning.
        batch_size: requests sampled together.
    """

    guidance_scale: float = 4.5
    num_inference_steps: int = 50
    seed: int = 42
    image_size: Optional[int] = None
    negative_caption: str = ""
    thinking: bool = False
    max_reasoning_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_size: int = 4


@dataclass
class GeneratedImage:
    """One generated image and what made it.

    Attributes:
        image: uint8 ``[H, W, 3]``.
        prompt: the prompt text given to the LLM (caption, camera sentence, reasoning).
        reasoning: the thinking-mode reasoning, or None.
        camera: the requested camera.
        seed: the seed used.
        task: ``cam2image`` or ``image2image`` (world exploration).
        prompt_cut: True when ``prompt`` had more text tokens than the prompt assembly's limit (a checkpoint's
            ``--max-generation-text-tokens``, as in training) and was cut on the right: the model did not see its
            end (the camera sentence, the reasoning).
    """

    image: torch.Tensor
    prompt: str
    reasoning: Optional[str]
    camera: Camera
    seed: int
    task: str
    prompt_cut: bool = False


def prompt_text(request: GenerationRequest) -> str:
    """``{caption} {camera sentence}`` (camera sentence alone without a caption), as in training."""
    return format_caption(request.caption, request.camera)


def query_conditioning(model, batch: Dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """LLM over a generation prompt batch -> ``(pooled [b, P], sequence [b, Q, J])`` from the query slots."""
    hidden = model.llm(decoder_input=model.embed_inputs(PuffinBatch.from_collated(batch)), position_ids=batch["position_ids"].to(model.device),
                       padding_mask=batch["attention_mask"].to(model.device), output="hidden")
    num_queries = model.puffin_config.connector.num_queries
    return model.conditioner(hidden[-num_queries:].transpose(0, 1))  # left padding keeps the queries last


def _posterior_latents(vae, images: torch.Tensor, seeds: Sequence[int], purpose: str) -> List[torch.Tensor]:
    """Normalised latents of ``[b, 3, H, W]`` images, posterior noise from a CPU generator per sample."""
    mean, std = vae.encode_moments(images)
    if not vae.sample_posterior:
        return list(vae.normalize(mean))
    latents = []
    for m, s, seed in zip(mean, std, seeds):
        generator = torch.Generator().manual_seed(derive_seed(seed, purpose))
        noise = torch.randn(m.shape, generator=generator, dtype=torch.float32).to(m)
        latents.append(vae.normalize(m + s * noise))
    return latents


def condition_latents(model, cameras: Sequence[Camera], init_images: Optional[torch.Tensor], size: int,
                      seeds: Sequence[int]) -> List[List[torch.Tensor]]:
    """Per sample ``[camera map latent]`` or ``[camera map latent, initial view latent]`` (docs/puffin.md §2.3, §6.2)."""
    vae = model.vae
    values = torch.tensor([[c.roll, c.pitch, c.vfov] for c in cameras], dtype=torch.float32)
    maps = normalize_camera_map(camera_maps(values, size, size)).to(model.device)
    encoded = [_posterior_latents(vae, maps, seeds, "vae_camera")]
    if init_images is not None:
        encoded.append(_posterior_latents(vae, init_images.to(model.device), seeds, "vae_init"))
    dtype = model.puffin_config.params_dtype
    return [[latents[i].to(dtype) for latents in encoded] for i in range(len(cameras))]


def initial_noise(model, seeds: Sequence[int], size: int) -> torch.Tensor:
    """``[b, C, size / f, size / f]`` standard normal latents, one CPU generator per seed."""
    dit, factor = model.puffin_config.dit, vae_scale_factor(model.vae)
    shape = (dit.in_channels, size // factor, size // factor)
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    return torch.stack(noise).to(model.device, model.puffin_config.params_dtype)


def vae_scale_factor(vae) -> int:
    """Pixels per latent side: 2^(number of VAE blocks - 1) (SD3: 8)."""
    return 2 ** (len(vae.vae.config.block_out_channels) - 1)


def _check_size(model, size: int) -> None:
    unit = vae_scale_factor(model.vae) * model.puffin_config.dit.patch_size
    if size % unit:
        raise ValueError(f"image size {size} must be a multiple of {unit} (VAE factor x DiT patch size)")
    largest = unit * model.puffin_config.dit.pos_embed_max_size  # before any tensor of that size is made
    if not 0 < size <= largest:
        raise ValueError(f"image size {size} must lie in [{unit}, {largest}] (the MMDiT's position table holds "
                         f"{model.puffin_config.dit.pos_embed_max_size} latent tokens per side)")


def check_generation(model, settings: GenerationSettings, encoder_config: Optional[TaskEncoderConfig] = None) -> int:
    """The output side in pixels, after checking ``settings`` against ``model``: values that would otherwise give
    NaN images without a word or fail deep inside torch (a tool calls it before its progress bar starts)."""
    if model.vae is None:
        raise ValueError("generation needs the VAE: load the model with need_vae=True and --vae-path (or --vae-config)")
    size = settings.image_size or (encoder_config or default_encoder_config(model)).image_max_size
    _check_size(model, size)
    if not math.isfinite(settings.guidance_scale):
        raise ValueError(f"guidance scale ({settings.guidance_scale}) must be a finite number (<= 1 disables CFG)")
    steps = inference_steps_problem("num_inference_steps", settings.num_inference_steps)
    if steps:
        raise ValueError(steps)
    return size


def _check_seeds(seeds: Sequence[int]) -> None:
    bad = [seed for seed in seeds if not -(1 << 63) < seed < (1 << 63)]
    if bad:
        raise ValueError(f"seed {bad[0]} is out of range: seeds are 64-bit integers (|seed| < 2^63)")


@dataclass
class PreparedGeneration:
    """A batch of requests ready for sampling (everything before the Euler loop).

    Attributes:
        batch: the LLM prompt batch (``[negatives; positives]`` with CFG, else the positives).
        positive, negative: ``(pooled, sequence)`` conditioning; ``negative`` None without CFG.
        conds: per request, its clean condition latents (both branches get the same).
        noise: the initial latents ``[b, C, h, w]``.
        texts, reasoning: prompt texts and thinking reasoning (None entries without thinking).
        prompt_cut: per request, whether its prompt was cut to the text-token limit (see ``GeneratedImage``).
        velocity_fn: the DiT velocity over the ``[negatives; positives]`` latents (see ``FlowMatchEulerSampler``).
    """

    batch: Dict
    positive: Tuple[torch.Tensor, torch.Tensor]
    negative: Optional[Tuple[torch.Tensor, torch.Tensor]]
    conds: List[List[torch.Tensor]]
    noise: torch.Tensor
    texts: List[str]
    reasoning: List[Optional[str]]
    velocity_fn: Callable
    prompt_cut: List[bool]


class _Generator:
    """Samples one batch of same-task requests (see module docstring)."""

    def __init__(self, model, tokenizer, settings: GenerationSettings, encoder: TaskEncoder, size: int):
        self.model, self.tokenizer, self.settings, self.encoder, self.size = model, tokenizer, settings, encoder, size
        self.sampler = FlowMatchEulerSampler(model.schedule, settings.num_inference_steps, settings.guidance_scale)

    def prompts(self, requests: Sequence[GenerationRequest]) -> Tuple[List[str], List[Optional[str]]]:
        texts = [prompt_text(request) for request in requests]
        if not self.settings.thinking:
            return texts, [None] * len(texts)
        reasoning = reason(self.model, self.tokenizer, texts, self.settings.max_reasoning_tokens,
                           encoder_config=self.encoder.config)
        return [f"{text} {thought}" for text, thought in zip(texts, reasoning)], reasoning

    def conditioning(self, texts: Sequence[str], init_images: Optional[torch.Tensor]):
        """(prompt batch, (pooled, sequence) of the positives, of the negatives or None without CFG, per text
        whether it was cut to the text-token limit)."""
        views = [None] * len(texts) if init_images is None else list(init_images)
        samples = [self.encoder.generation_prompt(text, view) for text, view in zip(texts, views)]
        cut = [sample.truncated for sample in samples]
        for text, was_cut in zip(texts, cut):
            if was_cut:
                logger.warning("the generation prompt %r has more than %d text tokens (the checkpoint's "
                               "--max-generation-text-tokens, as in training): it was cut on the right, so the model "
                               "did not see its end (the camera sentence); shorten the caption",
                               shorten(text),
                               self.encoder.config.max_generation_text_tokens)
        if self.sampler.do_classifier_free_guidance:
            negatives = [self.encoder.generation_prompt(self.settings.negative_caption, view) for view in views]
            samples = negatives + samples
        batch = prompt_batch(samples, self.tokenizer.pad_id)
        pooled, sequence = query_conditioning(self.model, batch)
        if not self.sampler.do_classifier_free_guidance:
            return batch, (pooled, sequence), None, cut
        count = len(texts)
        return batch, (pooled[count:], sequence[count:]), (pooled[:count], sequence[:count]), cut

    @torch.no_grad()
    def prepare(self, requests: Sequence[GenerationRequest], seeds: Sequence[int]) -> PreparedGeneration:
        init = None if requests[0].init_image is None else torch.stack([r.init_image for r in requests])
        texts, reasoning = self.prompts(requests)
        batch, positive, negative, cut = self.conditioning(texts, init)
        dtype = self.model.puffin_config.params_dtype
        positive = (positive[0].to(dtype), positive[1].to(dtype))
        negative = None if negative is None else (negative[0].to(dtype), negative[1].to(dtype))
        conds = condition_latents(self.model, [r.camera for r in requests], init, self.size, seeds)
        velocity = guided_dit_velocity(self.model.dit, positive[1], positive[0],
                                       None if negative is None else negative[1],
                                       None if negative is None else negative[0], cond_hidden_states=conds)
        return PreparedGeneration(batch=batch, positive=positive, negative=negative, conds=conds,
                                  noise=initial_noise(self.model, seeds, self.size), texts=texts,
                                  reasoning=reasoning, velocity_fn=velocity, prompt_cut=cut)

    @torch.no_grad()
    def __call__(self, requests: Sequence[GenerationRequest], seeds: Sequence[int]) -> List[GeneratedImage]:
        prepared = self.prepare(requests, seeds)
        latents = self.sampler.sample(prepared.velocity_fn, prepared.noise)
        images = to_uint8(self.model.vae.decode(latents))
        task = "cam2image" if requests[0].init_image is None else "image2image"
        return [GeneratedImage(image=image, prompt=text, reasoning=thought, camera=request.camera, seed=seed,
                               task=task, prompt_cut=cut)
                for image, text, thought, request, seed, cut in zip(images, prepared.texts, prepared.reasoning,
                                                                    requests, seeds, prepared.prompt_cut)]


def _batches(requests: Sequence[GenerationRequest], batch_size: int) -> List[List[int]]:
    """Request indices in batches of one kind (with / without an initial view), in order within each kind."""
    groups: Dict[bool, List[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.init_image is not None, []).append(index)
    return [indices[i:i + batch_size] for indices in groups.values() for i in range(0, len(indices), batch_size)]


def _setup(model, tokenizer, requests, settings, encoder_config) -> Tuple[_Generator, List[int]]:
    settings = settings or GenerationSettings()
    encoder_config = encoder_config or default_encoder_config(model)
    size = check_generation(model, settings, encoder_config)
    for request in requests:
        if request.init_image is not None and tuple(request.init_image.shape[-2:]) != (size, size):
            raise ValueError(f"initial view of {tuple(request.init_image.shape[-2:])} pixels; resize it to "
                             f"{size}x{size} (megatron_puffin.inference.load_image(path, {size}, 'resize'))")
    encoder = TaskEncoder("cam2image", tokenizer, encoder_config)
    seeds = [settings.seed + index if request.seed is None else request.seed for index, request in enumerate(requests)]
    _check_seeds(seeds)
    return _Generator(model, tokenizer, settings, encoder, size), seeds


def prepare_generation(model, tokenizer, requests: Sequence[GenerationRequest],
                       settings: Optional[GenerationSettings] = None,
                       encoder_config: Optional[TaskEncoderConfig] = None) -> PreparedGeneration:
    """Everything :func:`generate` computes before the Euler loop for one batch of same-kind requests (for checks
    against other implementations and for custom samplers)."""
    run, seeds = _setup(model, tokenizer, requests, settings, encoder_config)
    if len({request.init_image is None for request in requests}) != 1:
        raise ValueError("prepare_generation takes requests of one kind (all with or all without an initial view)")
    return run.prepare(requests, seeds)


def generate(model, tokenizer, requests: Sequence[GenerationRequest], settings: Optional[GenerationSettings] = None,
             encoder_config: Optional[TaskEncoderConfig] = None,
             progress: Optional[Callable[[int], None]] = None) -> List[GeneratedImage]:
    """Generate one image per request (see the module docstring).

    Args:
        model: a loaded :class:`~megatron_puffin.models.puffin.PuffinModel` with its VAE (pipeline size 1, any TP;
            every TP rank calls this with the same requests), in eval mode.
        tokenizer: its tokenizer.
        requests: cameras, captions, optional initial views (``[3, S, S]`` with S the output size).
        settings: sampling settings (Puffin's defaults).
        encoder_config: prompt assembly settings (default from the model's shape).
        progress: called with the number of images finished after each batch.

    Returns:
        One :class:`GeneratedImage` per request, in order.
    """
    results: List[Optional[GeneratedImage]] = [None] * len(requests)
    for indices, batch in generate_batches(model, tokenizer, requests, settings, encoder_config):
        for index, result in zip(indices, batch):
            results[index] = result
        if progress is not None:
            progress(len(indices))
    return results  # type: ignore[return-value]


def generate_batches(model, tokenizer, requests: Sequence[GenerationRequest],
                     settings: Optional[GenerationSettings] = None, encoder_config: Optional[TaskEncoderConfig] = None,
                     skip: Iterable[int] = ()) -> Iterator[Tuple[List[int], List[GeneratedImage]]]:
    """:func:`generate` one batch at a time: yields ``(request indices, their images)`` as each batch finishes, so a
    caller can keep finished images before the last batch is done. Requests whose index is in ``skip`` are not
    generated; the others keep the seeds they have in the whole list (``settings.seed`` + index by default)."""
    run, seeds = _setup(model, tokenizer, requests, settings, encoder_config)
    for indices in plan_batches(requests, run.settings.batch_size, skip):
        yield indices, run([requests[i] for i in indices], [seeds[i] for i in indices])


def plan_batches(requests: Sequence[GenerationRequest], batch_size: int, skip: Iterable[int] = ()) -> List[List[int]]:
    """The batches :func:`generate_batches` makes, as request indices: the requests not in ``skip``, in batches of
    at most ``batch_size`` of one kind (with / without an initial view), in order within each kind."""
    skipped = set(skip)
    kept = [index for index in range(len(requests)) if index not in skipped]
    return [[kept[position] for position in batch]
            for batch in _batches([requests[index] for index in kept], batch_size)]
