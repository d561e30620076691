"""Model FLOPs of one task micro-batch, per tower, and the machine's measured matmul rate (for MFU).

What is counted (forward pass):

* every matrix multiplication of a linear layer, ``2 * m * n * k`` (bias additions, norms, activations, softmax,
  RoPE and elementwise work are not counted: they are a few per cent at real sizes);
* attention score and value products ``Q K^T`` and ``A V``: ``2 * heads * head_dim`` per (query, key) pair each;
* convolutions: the DiT's patchifier and every convolution of the VAE *encoder* (plus its ``quant_conv``); the
  VAE decoder never runs in training.

Token convention (default, "model FLOPs"): only work on real tokens counts. The LLM's linear layers run over
the real, unpadded tokens of each sample (``attention_mask``), the output layer of understanding tasks over the
supervised positions (the only ones it runs on, :func:`supervised_positions`);
its attention counts the causal triangle of real tokens, ``n (n + 1) / 2`` pairs for a sample of ``n`` real
tokens. The DiT counts each sample's own image-stream length (its target plus condition latents) and the query
tokens, with bidirectional attention over ``(l_i + T)^2`` pairs; its last block, whose outputs are read at the
target tokens only, makes queries for the ``t_i`` target tokens (``t_i (l_i + T)`` pairs) and keys and values for
every token. The vision tower, connectors and VAE never pad
(images of one size are stacked, other sizes run separately), so there real = executed.

``as_executed=True`` instead counts what the local (pure PyTorch) implementation executes: the LLM over the
left-padded length ``S`` of the batch with dense ``S x S`` score matrices, the DiT over the right-padded
image-stream length with dense masked attention, the output layer over the padded vocabulary at TP=1. The
difference between the two is the work spent on padding and causal masking.

Training cost per micro-batch (:func:`megatron_puffin.training.towers.micro_batch_flops`, which sums the tower
registry's rows): a trainable tower costs forward + backward = 3x its forward (the backward computes input and
weight gradients, each as costly as the forward). A frozen tower counts its forward pass only. The activation-gradient backward (1x forward) that a frozen tower still runs when a
trainable tower lies before it (e.g. a frozen LLM between the trainable vision projector and the connectors)
is **not** counted, nor is activation recomputation: this is model FLOPs, not hardware FLOPs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_puffin.models.dit.embeddings import TIMESTEP_CHANNELS
from megatron_puffin.models.vae_config import load_vae_config, vae_downsample_factor
from megatron_puffin.tasks import GENERATION_TASKS

logger = logging.getLogger(__name__)

Size = Tuple[int, int]


@dataclass
class TowerFlops:
    """Forward FLOPs of one tower, by kind of operation."""

    linear: float = 0.0
    """Matmuls of linear layers (including the LLM's output layer and the ViT's patch embedder)."""
    attention: float = 0.0
    """``Q K^T`` and ``A V`` products."""
    conv: float = 0.0
    """Convolutions (DiT patchifier, VAE encoder)."""

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.conv

    def __add__(self, other: "TowerFlops") -> "TowerFlops":
        return TowerFlops(self.linear + other.linear, self.attention + other.attention, self.conv + other.conv)


def matmul_flops(m: float, n: float, k: float) -> float:
    """FLOPs of an ``[m, k] x [k, n]`` matrix product (one multiply and one add per term)."""
    return 2.0 * m * n * k


def conv_flops(in_channels: int, out_channels: int, kernel: int, out_size: Size) -> float:
    """FLOPs of one image through a ``kernel x kernel`` convolution producing ``out_size`` pixels."""
    return matmul_flops(out_size[0] * out_size[1], out_channels, in_channels * kernel * kernel)


def image_sizes(images) -> List[Size]:
    """``(H, W)`` of every image of a ``[B, C, H, W]`` tensor or a list of ``[C, H_i, W_i]`` tensors."""
    if isinstance(images, torch.Tensor):
        return [tuple(images.shape[-2:])] * images.shape[0]
    return [tuple(image.shape[-2:]) for image in images]


# -- towers ---------------------------------------------------------------------------------------------------
def encoder_layer_flops(hidden: int, ffn: int, tokens: int, pairs: float) -> TowerFlops:
    """One pre-LN encoder layer (ViT, connector): fused qkv, output projection, 2-layer MLP, attention."""
    linear = matmul_flops(tokens, 3 * hidden, hidden) + matmul_flops(tokens, hidden, hidden)
    linear += matmul_flops(tokens, ffn, hidden) + matmul_flops(tokens, hidden, ffn)
    return TowerFlops(linear=linear, attention=2 * matmul_flops(pairs, hidden, 1))


def llm_flops(config, num_tokens: Sequence[int], logit_rows: int, seq_length: int, as_executed: bool) -> TowerFlops:
    """The LLM decoder and its output layer.

    Args:
        config: :class:`~megatron_puffin.models.llm.LLMConfig`.
        num_tokens: real tokens of each sample.
        logit_rows: positions the output layer runs on: understanding tasks apply it to the supervised positions
            only (:meth:`~megatron_puffin.models.puffin.PuffinModel.supervised_logits`), generation tasks to none.
        seq_length: padded length S of the batch (used when ``as_executed``).
        as_executed: count padded positions and dense ``S x S`` scores instead of real tokens and the causal
            triangle.
    """
    h, d = config.hidden_size, config.head_dim
    heads, groups = config.num_attention_heads, config.num_query_groups
    per_token = matmul_flops(1, (heads + 2 * groups) * d, h) + matmul_flops(1, h, heads * d)
    per_token += matmul_flops(1, 2 * config.ffn_hidden_size, h) + matmul_flops(1, h, config.ffn_hidden_size)
    if as_executed:
        tokens, pairs = seq_length * len(num_tokens), float(seq_length * seq_length * len(num_tokens))
        vocab = config.padded_vocab_size(1)
    else:
        tokens, pairs, vocab = sum(num_tokens), sum(n * (n + 1) / 2 for n in num_tokens), config.vocab_size
    flops = TowerFlops(
        linear=config.num_layers * per_token * tokens,
        attention=config.num_layers * 2 * matmul_flops(pairs, heads * d, 1),
    )
    flops.linear += matmul_flops(logit_rows, vocab, h)
    return flops


def vision_flops(config, sizes: Sequence[Size]) -> TowerFlops:
    """The RADIO ViT: patch embedder, class/register tokens + patches through every block, feature normaliser.

    Args:
        config: :class:`~megatron_puffin.models.vision.VisionConfig`.
        sizes: ``(H, W)`` of every (pad-to-square) image given to the tower.
    """
    p, h = config.patch_size, config.hidden_size
    flops = TowerFlops()
    for height, width in sizes:
        patches = (height // p) * (width // p)
        tokens = patches + config.class_token_len
        embed = matmul_flops(patches, h, 3 * p * p) + (matmul_flops(patches, h, h) if config.feature_normalizer else 0)
        layer = encoder_layer_flops(h, config.ffn_hidden_size, tokens, tokens * tokens)
        flops += TowerFlops(embed + config.num_layers * layer.linear, config.num_layers * layer.attention)
    return flops


def projector_flops(config, llm_hidden_size: int, sizes: Sequence[Size]) -> TowerFlops:
    """The vision MLP projector (folded tokens -> LLM hidden -> LLM hidden)."""
    tokens = sum(config.num_tokens(height, width) for height, width in sizes)
    linear = matmul_flops(tokens, llm_hidden_size, config.folded_hidden_size)
    return TowerFlops(linear=linear + matmul_flops(tokens, llm_hidden_size, llm_hidden_size))


def query_flops(config, llm_hidden_size: int, batch_size: int) -> TowerFlops:
    """llm2connector, both connectors and projector_1 (on the token mean) / projector_2 (the meta queries
    themselves are an embedding: no FLOPs).

    Args:
        config: :class:`~megatron_puffin.models.connector.ConnectorConfig`.
    """
    q, h = config.num_queries, config.hidden_size
    tokens = batch_size * q
    layer = encoder_layer_flops(h, config.ffn_hidden_size, tokens, batch_size * q * q)
    branch = TowerFlops(
        linear=matmul_flops(tokens, h, llm_hidden_size) + config.num_layers * layer.linear,
        attention=config.num_layers * layer.attention,
    )
    linear = 2 * branch.linear + matmul_flops(batch_size, config.pooled_projection_dim, h)
    linear += matmul_flops(tokens, config.joint_attention_dim, h)
    return TowerFlops(linear=linear, attention=2 * branch.attention)


def dit_block_linear_flops(config, image_tokens: int, batch_size: int, num_text_tokens: int,
                           last_queries: int) -> float:
    """Linear layers of all joint blocks: per block AdaLN modulation (on ``b`` rows), q/k/v/out and the 4x MLP of
    both streams. The last block (``context_pre_only``) makes keys and values from every token of both streams,
    but queries, the output projection and the MLP for ``last_queries`` image tokens only (the targets: the only
    outputs the model reads)."""
    h, b, text_tokens = config.hidden_size, batch_size, batch_size * num_text_tokens
    key_value = 2 * matmul_flops(1, h, h)
    per_token = 4 * matmul_flops(1, h, h) + 2 * matmul_flops(1, config.ffn_hidden_size, h)
    modulation = matmul_flops(b, 6 * h, h)
    blocks = (config.num_layers - 1) * (per_token * (image_tokens + text_tokens) + 2 * modulation)
    last = key_value * (image_tokens + text_tokens) + (per_token - key_value) * last_queries
    return blocks + last + modulation + matmul_flops(b, 2 * h, h)


def dit_flops(config, latents: Sequence[Sequence[Size]], num_text_tokens: int, as_executed: bool) -> TowerFlops:
    """The MMDiT on one batch.

    Args:
        config: :class:`~megatron_puffin.models.dit.DiTConfig`.
        latents: per sample, the latent ``(h, w)`` of its target followed by its condition latents.
        num_text_tokens: T, the text-stream length (the number of meta queries).
        as_executed: every sample costs the right-padded image-stream length (dense masked attention), and the
            last block's queries the longest target's tokens (the stream's targets prefix).
    """
    h, p, b = config.hidden_size, config.patch_size, len(latents)
    grid = [[(height // p) * (width // p) for height, width in sample] for sample in latents]
    lengths = [sum(sample) for sample in grid]
    queries = [sample[0] for sample in grid]
    if as_executed:
        lengths, queries = [max(lengths)] * b, [max(queries)] * b
    embed = matmul_flops(b, h, TIMESTEP_CHANNELS) + matmul_flops(b, h, config.pooled_projection_dim)
    embed += 2 * matmul_flops(b, h, h)  # timestep and pooled-text MLPs' second layers
    embed += matmul_flops(b * num_text_tokens, config.caption_projection_dim, config.joint_attention_dim)
    target_tokens = sum(sample[0] for sample in grid)
    out = matmul_flops(b, 2 * h, h) + matmul_flops(target_tokens, p * p * config.out_channels, h)
    keys = [length + num_text_tokens for length in lengths]
    pairs = (config.num_layers - 1) * sum(k * k for k in keys) + sum(q * k for q, k in zip(queries, keys))
    return TowerFlops(
        linear=embed + dit_block_linear_flops(config, sum(lengths), b, num_text_tokens, sum(queries)) + out,
        attention=2 * matmul_flops(pairs, h, 1),
        conv=sum(matmul_flops(tokens, h, config.in_channels * p * p) for sample in grid for tokens in sample),
    )


def vae_encoder_flops(vae_config: Mapping[str, Any], sizes: Sequence[Size]) -> TowerFlops:
    """The diffusers ``AutoencoderKL`` encoder (+ ``quant_conv``) on images of the given sizes.

    Args:
        vae_config: the ``AutoencoderKL`` config dictionary (diffusers defaults for missing keys).
        sizes: ``(H, W)`` of every encoded image (targets, camera maps, initial views).
    """
    channels = list(vae_config.get("block_out_channels", [64]))
    kinds = vae_config.get("down_block_types", ["DownEncoderBlock2D"])
    unsupported = sorted({kind for kind in kinds if kind != "DownEncoderBlock2D"})
    if unsupported:
        raise ValueError(f"VAE FLOPs: down block types {unsupported} are not modelled; only DownEncoderBlock2D "
                         f"(every AutoencoderKL of SD / SD3) is")
    return sum((_vae_encoder_one(vae_config, channels, size) for size in sizes), TowerFlops())


def _resnet_flops(in_channels: int, out_channels: int, size: Size) -> float:
    shortcut = conv_flops(in_channels, out_channels, 1, size) if in_channels != out_channels else 0.0
    return conv_flops(in_channels, out_channels, 3, size) + conv_flops(out_channels, out_channels, 3, size) + shortcut


def _vae_encoder_one(vae_config: Mapping[str, Any], channels: List[int], size: Size) -> TowerFlops:
    layers = vae_config.get("layers_per_block", 1)
    latent = vae_config.get("latent_channels", 4)
    conv = conv_flops(vae_config.get("in_channels", 3), channels[0], 3, size)
    previous = channels[0]
    for index, width in enumerate(channels):
        for layer in range(layers):
            conv += _resnet_flops(previous if layer == 0 else width, width, size)
        previous = width
        if index < len(channels) - 1:  # Downsample2D: stride-2 3x3 conv after asymmetric padding
            size = (size[0] // 2, size[1] // 2)
            conv += conv_flops(width, width, 3, size)
    width = channels[-1]
    conv += 2 * _resnet_flops(width, width, size)
    pixels = size[0] * size[1]
    flops = TowerFlops()
    if vae_config.get("mid_block_add_attention", True):
        flops.linear = 4 * matmul_flops(pixels, width, width)
        flops.attention = 2 * matmul_flops(pixels * pixels, width, 1)
    conv += conv_flops(width, 2 * latent, 3, size)
    if vae_config.get("use_quant_conv", True):
        conv += conv_flops(2 * latent, 2 * latent, 1, size)
    flops.conv = conv
    return flops


# -- a micro-batch ----------------------------------------------------------------------------------------------
def generation_images(batch: Mapping[str, Any]) -> List[List[Size]]:
    """Per sample, the pixel sizes of the target then its condition images (camera map, initial view)."""
    targets = image_sizes(batch["target_images"])
    samples = [[size] for size in targets]
    if batch["task"] in ("cam2image", "image2image"):
        maps = image_sizes(batch["camera_maps"]) if "camera_maps" in batch else targets
        for sample, size in zip(samples, maps):
            sample.append(size)
    if batch["task"] == "image2image":
        for sample, size in zip(samples, image_sizes(batch["init_images"])):
            sample.append(size)
    return samples


def _vae_config_of(config, batch: Mapping[str, Any]) -> Dict[str, Any]:
    vae_config = load_vae_config(config.model)
    if vae_config is None:
        raise ValueError(f"FLOPs of {batch['task']}: the model has no VAE; give --vae-path (or --vae-config)")
    return vae_config


# Per tower (the ``forward_flops`` column of megatron_puffin.training.towers.TOWERS): zero where the task does not
# run the tower.
def llm_tower_flops(config, batch: Mapping[str, Any], as_executed: bool) -> TowerFlops:
    mask = batch["attention_mask"]
    return llm_flops(config.llm, mask.sum(dim=1).tolist(), logit_rows=supervised_positions(batch),
                     seq_length=mask.shape[1], as_executed=as_executed)


def vision_tower_flops(config, batch: Mapping[str, Any], as_executed: bool) -> TowerFlops:
    if "vision_images" not in batch:
        return TowerFlops()
    return vision_flops(config.vision, image_sizes(batch["vision_images"]))


def projector_tower_flops(config, batch: Mapping[str, Any], as_executed: bool) -> TowerFlops:
    if "vision_images" not in batch:
        return TowerFlops()
    return projector_flops(config.vision, config.llm.hidden_size, image_sizes(batch["vision_images"]))


def query_tower_flops(config, batch: Mapping[str, Any], as_executed: bool) -> TowerFlops:
    if batch["task"] not in GENERATION_TASKS:
        return TowerFlops()
    _vae_config_of(config, batch)
    return query_flops(config.connector, config.llm.hidden_size, len(generation_images(batch)))


def dit_tower_flops(config, batch: Mapping[str, Any], as_executed: bool) -> TowerFlops:
    if batch["task"] not in GENERATION_TASKS:
        return TowerFlops()
    factor = vae_downsample_factor(_vae_config_of(config, batch))
    latents = [[(hh // factor, ww // factor) for hh, ww in sample] for sample in generation_images(batch)]
    return dit_flops(config.dit, latents, config.connector.num_queries, as_executed)


def vae_tower_flops(config, batch: Mapping[str, Any], as_executed: bool) -> TowerFlops:
    if batch["task"] not in GENERATION_TASKS:
        return TowerFlops()
    vae_config = _vae_config_of(config, batch)
    # With --cached-latents the batch carries the posterior moments and the VAE encoder never runs.
    images = generation_images(batch)
    encoded = [size for sample in images for size in sample] if "target_moments" not in batch else []
    return vae_encoder_flops(vae_config, encoded)


def supervised_positions(batch: Mapping[str, Any]) -> int:
    """Positions with a next-token target in an understanding micro-batch (0 for generation tasks)."""
    if batch["task"] in GENERATION_TASKS:
        return 0
    from megatron_puffin.models.llm import shift_labels

    return int((shift_labels(batch["labels"]) >= 0).sum())


# -- the machine ------------------------------------------------------------------------------------------------
def measure_matmul_tflops(
    dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 1.0,
    device: Optional[torch.device] = None, clock: Callable[[], float] = time.perf_counter,
) -> float:
    """The machine's dense matmul rate in TFLOP/s: ``torch.mm`` of two ``size x size`` matrices repeated for about
    ``seconds`` of ``clock`` (wall time by default; ``time.process_time`` for CPU time) after a warm-up, on
    ``device`` (default: the current CUDA device, else the CPU)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        torch.mm(a, b, out=out)
    sync()
    iterations, start = 0, clock()
    while True:
        for _ in range(8 if device.type == "cuda" else 1):
            torch.mm(a, b, out=out)
            iterations += 1
        sync()
        elapsed = clock() - start
        if elapsed >= seconds:
            break
    return matmul_flops(size, size, size) * iterations / elapsed / 1e12
