"""``--real-proportions`` of ``bench_training.py`` and ``bench_puffin.py``: Puffin's real token counts at a CPU size.

Shapes are the real ones: 512x512 images (256 visual tokens each after the 16-pixel patches and the 2x2 fold),
64 meta queries, the caption lengths of the synthetic generator as the tokenizer sees them, 64x64 latents for
targets, camera maps and initial views. Every tower is the released Puffin's (Qwen2.5-1.5B, C-RADIOv3-H, the two
6-layer connectors, the SD3-medium MMDiT, the SD3 VAE) scaled down by ONE factor of **1/256 in matmul FLOPs**:

* transformers (LLM, RADIO, connectors, MMDiT): width / 8 (hidden, MLP, joint-attention and pooled dims) and
  depth / 4 (layers; the 6-layer connectors round to 2). A linear layer's FLOPs scale by (1/8)^2 x 1/4 = 1/256;
* the width / 8 of attention is split as **head count / 4 and head dim / 2** (head dims 128/80/64/64 of the LLM,
  RADIO, connectors and MMDiT become 64/40/32/32; 12/16/16/24 heads become 3/4/4/6). Attention FLOPs depend on
  heads x head dim only, so every tower's FLOP share is what width / 8 with all heads kept gives, while the
  attention kernels run at head sizes the full model has (CPU attention at head dims 8-16 runs at a fifth of its
  rate at 32-64: 8 vs 40 GFLOP/s fwd+bwd at RADIO's shape, one thread). The LLM's 2 key/value heads become
  max(1, 2 / 4) = 1 of dim 64 (key/value width 64 instead of 256 / 8 = 32: +1.7 % of the LLM's linear FLOPs);
* the LLM vocabulary: / 32 (the output layer is hidden x vocab: 1/8 x 1/32 = 1/256);
* the VAE encoder (two ResNets per level, which cannot be quartered): width / 16 at full depth, (1/16)^2 = 1/256.

Attention products scale by only width x depth = 1/32 (token counts are fixed), so attention-heavy towers (the
MMDiT over 1,024-3,136 tokens) weigh more at the scaled size; :func:`share_table` prints every tower's share of the
training FLOPs at full and at scaled size side by side (``training.flops``), so the deviation is visible.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Mapping, Optional, Sequence

WIDTH_DIVISOR = 8
DEPTH_DIVISOR = 4
HEAD_COUNT_DIVISOR = 4
"""Attention heads / 4 and head dims / (WIDTH_DIVISOR / 4) = / 2: realistic head sizes at the same width."""
VOCAB_DIVISOR = 32
VAE_WIDTH_DIVISOR = 16
IMAGE_SIZE = 512
NUM_QUERIES = 64
MICRO_BATCH_SIZE = 2

FULL_SIZES: Dict[str, Any] = dict(
    llm_layers=28, llm_hidden=1536, llm_heads=12, llm_kv_heads=2, llm_ffn=8960, llm_vocab=151936,
    vision_layers=32, vision_hidden=1280, vision_heads=16, vision_ffn=5120,
    connector_layers=6, connector_hidden=1024, connector_heads=16, connector_ffn=4096,
    connector_pooled=2048, connector_joint=4096,
    dit_layers=24, dit_heads=24, dit_head_dim=64, dit_caption=1536,
    vae_blocks=[128, 256, 512, 512], vae_layers_per_block=2,
)
"""The released Puffin (docs/puffin.md §1), in the benchmarks' size names."""


def _depth(layers: int, divisor: int = DEPTH_DIVISOR) -> int:
    return max(1, int(math.floor(layers / divisor + 0.5)))


def scaled_sizes(full: Mapping[str, Any] = FULL_SIZES) -> Dict[str, Any]:
    """The benchmark sizes: ``full`` scaled as the module docstring says."""
    sizes = dict(full)
    for key in ("llm_layers", "vision_layers", "connector_layers", "dit_layers"):
        sizes[key] = _depth(full[key])
    for key in ("llm_hidden", "llm_ffn", "vision_hidden", "vision_ffn", "connector_hidden", "connector_ffn",
                "connector_pooled", "connector_joint", "dit_caption"):
        sizes[key] = full[key] // WIDTH_DIVISOR
    for key in ("llm_heads", "llm_kv_heads", "vision_heads", "connector_heads", "dit_heads"):
        sizes[key] = max(1, full[key] // HEAD_COUNT_DIVISOR)
    sizes["dit_head_dim"] = full["dit_head_dim"] * HEAD_COUNT_DIVISOR // WIDTH_DIVISOR
    sizes["llm_vocab"] = full["llm_vocab"] // VOCAB_DIVISOR
    sizes["vae_blocks"] = [width // VAE_WIDTH_DIVISOR for width in full["vae_blocks"]]
    return sizes


def full_sizes(depth_divisor: int = 1) -> Dict[str, Any]:
    """``--full-size``: the released widths, heads, vocabulary and VAE, with every transformer's depth divided by
    ``depth_divisor`` (rounded, at least 1): a GPU benchmark holds ours and the reference at once, which at full
    depth (about 4.3 B parameters, 18 bytes each per variant with bf16 weights and fp32 master weights and Adam
    state) does not fit one 141 GB GPU. Per layer, the work is the full model's."""
    sizes = dict(FULL_SIZES)
    for key in ("llm_layers", "vision_layers", "connector_layers", "dit_layers"):
        sizes[key] = _depth(FULL_SIZES[key], depth_divisor)
    return sizes


HOST_BOUND_WIDTH = 32
HOST_BOUND_IMAGE_SIZE = 96


def host_bound_sizes(depth_divisor: int = 1) -> Dict[str, Any]:
    """``--host-bound``: the layer structure of :func:`full_sizes` (the same towers, layers, 64 queries and the SD3
    VAE's levels and ResNets per level) with every width tiny (hidden 32, two heads of 16, one key/value head, MLP
    64, VAE 8 channels, the tokenizer's vocabulary, 96^2 images, the smallest the data tools take). Each kernel
    then takes microseconds, so a micro-batch's time is the host's: Python, dispatch and autograd per operator, the
    cost that decides an eager step on a GPU when its kernels are shorter than their launch path (micro-batch 2 on
    an H200). The numbers the towers compute are meaningless at this width; the operators each side issues are the
    full model's. Ours runs as on a GPU without apex: at TP=1 the Trainer fuses no weight-gradient accumulation
    (its linear layers are one ``F.linear``, patch ``PLAIN_LINEAR_AT_TP1``)."""
    sizes = full_sizes(depth_divisor)
    width = HOST_BOUND_WIDTH
    sizes.update(llm_hidden=width, llm_heads=2, llm_kv_heads=1, llm_ffn=2 * width, llm_vocab=None,
                 vision_hidden=width, vision_heads=2, vision_ffn=2 * width,
                 connector_hidden=width, connector_heads=2, connector_ffn=2 * width, connector_pooled=width,
                 connector_joint=width, dit_heads=2, dit_head_dim=width // 2, dit_caption=width,
                 vae_blocks=[width // 4] * len(FULL_SIZES["vae_blocks"]))
    return sizes


def _layer_counts(sizes: Mapping[str, Any]) -> str:
    """"LLM / RADIO / connectors / MMDiT" layer counts of a sizes dict, e.g. "14 / 16 / 3 / 12"."""
    return " / ".join(str(sizes[f"{tower}_layers"]) for tower in ("llm", "vision", "connector", "dit"))


def describe_host_bound(depth_divisor: int) -> str:
    """One line stating the ``--host-bound`` configuration."""
    sizes = host_bound_sizes(depth_divisor)
    return (f"host-bound: the operators of --full-size --depth-divisor {depth_divisor} ({_layer_counts(sizes)} "
            f"layers of LLM / RADIO / connectors / MMDiT, {NUM_QUERIES} queries, SD3 VAE levels) at width "
            f"{HOST_BOUND_WIDTH} and {HOST_BOUND_IMAGE_SIZE}^2 images, ours without fused weight-gradient "
            "accumulation (as on a GPU without apex): the time is the host's per-operator cost, not the kernels'")


def describe_full(depth_divisor: int) -> str:
    """One line stating the ``--full-size`` configuration."""
    sizes = full_sizes(depth_divisor)
    return (f"full size: {IMAGE_SIZE}^2 images, {NUM_QUERIES} queries, released widths and heads (LLM "
            f"{sizes['llm_hidden']} x {sizes['llm_heads']} heads, vocab {sizes['llm_vocab']}; RADIO "
            f"{sizes['vision_hidden']}; connectors {sizes['connector_hidden']}; MMDiT {sizes['dit_heads']} x "
            f"{sizes['dit_head_dim']}; SD3 VAE), depth / {depth_divisor}: {_layer_counts(sizes)} layers (LLM / "
            f"RADIO / connectors / MMDiT; released {_layer_counts(FULL_SIZES)})")


def describe() -> str:
    """One line stating the scaling."""
    return (f"real proportions: {IMAGE_SIZE}^2 images, {NUM_QUERIES} queries, {IMAGE_SIZE // 8}^2 latents; towers "
            f"scaled by 1/256 in matmul FLOPs (transformers width/{WIDTH_DIVISOR} depth/{DEPTH_DIVISOR}, "
            f"vocab/{VOCAB_DIVISOR}, VAE width/{VAE_WIDTH_DIVISOR}); attention width/{WIDTH_DIVISOR} as heads/"
            f"{HEAD_COUNT_DIVISOR} x head dim/{WIDTH_DIVISOR // HEAD_COUNT_DIVISOR} ({head_dims()})")


def head_dims(full: Mapping[str, Any] = FULL_SIZES) -> str:
    """Heads x head dim of every tower at the scaled size, e.g. ``LLM 3 x 64``."""
    sizes = scaled_sizes(full)
    towers = (("LLM", "llm"), ("RADIO", "vision"), ("connectors", "connector"))
    parts = [f"{label} {sizes[f'{key}_heads']} x {sizes[f'{key}_hidden'] // sizes[f'{key}_heads']}"
             for label, key in towers]
    return ", ".join(parts + [f"MMDiT {sizes['dit_heads']} x {sizes['dit_head_dim']}"])


def apply(args: argparse.Namespace) -> None:
    """Set the sizes of the preset a benchmark's parsed flags name (``--real-proportions``: :func:`scaled_sizes`;
    ``--full-size``: :func:`full_sizes` with ``--depth-divisor``; ``--host-bound``: :func:`host_bound_sizes`), the
    preset's image size and the real queries."""
    if args.host_bound:
        sizes = host_bound_sizes(args.depth_divisor)
    elif args.full_size:
        sizes = full_sizes(args.depth_divisor)
    else:
        sizes = scaled_sizes()
    for key, value in sizes.items():
        setattr(args, key, value)
    args.image_size = HOST_BOUND_IMAGE_SIZE if args.host_bound else IMAGE_SIZE
    args.num_queries = NUM_QUERIES
    if args.micro_batch_size is None:
        args.micro_batch_size = MICRO_BATCH_SIZE


def describe_preset(args: argparse.Namespace) -> Optional[str]:
    """The one-line description of the size preset a benchmark's parsed flags name, None without one."""
    if args.host_bound:
        return describe_host_bound(args.depth_divisor)
    if args.full_size:
        return describe_full(args.depth_divisor)
    return describe() if args.real_proportions else None


def sd3_vae_config(blocks: Sequence[int], layers_per_block: int, image_size: int) -> Dict[str, Any]:
    """An SD3-shaped ``AutoencoderKL`` config (16 latent channels, x8 down) with the given block widths."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=list(blocks),
        layers_per_block=layers_per_block, down_block_types=["DownEncoderBlock2D"] * len(blocks),
        up_block_types=["UpDecoderBlock2D"] * len(blocks), norm_num_groups=min(32, min(blocks)),
        sample_size=image_size, scaling_factor=1.5305, shift_factor=0.0609,
    )


def _full_config(vae_path: str):
    """The released sizes as tower configs (``training.flops`` only reads shapes)."""
    from megatron_puffin.models.connector import ConnectorConfig
    from megatron_puffin.models.dit import DiTConfig
    from megatron_puffin.models.llm import LLMConfig
    from megatron_puffin.models.puffin_config import PuffinModelConfig
    from megatron_puffin.models.vision import VisionConfig

    return SimpleNamespace(llm=LLMConfig(), vision=VisionConfig(max_image_size=IMAGE_SIZE),
                           connector=ConnectorConfig(num_queries=NUM_QUERIES),
                           dit=DiTConfig(sample_size=IMAGE_SIZE // 8), model=PuffinModelConfig(vae_config=vae_path))


def tower_shares(config, batches: Sequence[Mapping[str, Any]], trainable: Mapping[str, bool]) -> Dict[str, float]:
    """Each tower's share of the training FLOPs (``training.towers.micro_batch_flops``) summed over ``batches``."""
    from megatron_puffin.training.towers import micro_batch_flops
    from megatron_puffin.training.towers import TOWER_NAMES as TOWERS

    totals = {tower: 0.0 for tower in TOWERS}
    for batch in batches:
        for tower, value in micro_batch_flops(config, batch, trainable).items():
            if tower != "total":
                totals[tower] += value
    whole = sum(totals.values())
    return {tower: value / whole for tower, value in totals.items()} | {"total": whole}


def share_table(scaled_config, batches: Sequence[Mapping[str, Any]], trainable: Mapping[str, bool]) -> List[str]:
    """Lines comparing the towers' FLOP shares of ``batches`` (one cycle of task micro-batches) at the released
    sizes and at ``scaled_config``."""
    from megatron_puffin.training.towers import TOWER_NAMES as TOWERS

    with tempfile.TemporaryDirectory() as tmp:
        vae_path = Path(tmp) / "vae.json"
        vae_path.write_text(json.dumps(sd3_vae_config(FULL_SIZES["vae_blocks"], FULL_SIZES["vae_layers_per_block"],
                                                      IMAGE_SIZE)))
        full = tower_shares(_full_config(str(vae_path)), batches, trainable)
    scaled = tower_shares(scaled_config, batches, trainable)
    lines = [f"training-FLOP shares of one task cycle ({len(batches)} micro-batches), training.flops:",
             f"  {'tower':10s} {'full size':>10s} {'scaled':>8s}"]
    for tower in TOWERS:
        lines.append(f"  {tower:10s} {100 * full[tower]:9.1f}% {100 * scaled[tower]:7.1f}%")
    lines.append(f"  {'total':10s} {full['total'] / 1e12:8.2f} TF {scaled['total'] / 1e12:6.3f} TF  "
                 f"(ratio 1/{full['total'] / scaled['total']:.0f})")
    return lines
