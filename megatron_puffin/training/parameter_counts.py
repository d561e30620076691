"""Analytic parameter counts of every tower, and bytes per parameter, computed from the flags alone (no process
group, no model): the rows of the tower registry (:mod:`megatron_puffin.training.towers`) read them, and the dry run
(:mod:`megatron_puffin.training.layout`) prints them.

Counts are exact: ``tests/unit/test_layout.py`` compares every tower with the parameters of the real modules. Each
count is split into the part that tensor parallelism divides over TP ranks (megatron-core's
``tensor_model_parallel`` parameters) and the part every TP rank holds whole, and each tower part is placed on a
pipeline stage as the model builds it (docs/puffin.md §1.0): the first stage holds the LLM embedding, the vision
tower and the meta queries; the decoder layers are spread evenly; the last stage holds the final norm, the output
layer (a copy of the tied embedding when PP > 1), the connectors with their projections, the MMDiT and the frozen
VAE.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from megatron_puffin.models.connector.config import ConnectorConfig
from megatron_puffin.models.dit.config import DiTConfig
from megatron_puffin.models.llm.config import LLMConfig
from megatron_puffin.models.puffin_config import PuffinModelConfig
from megatron_puffin.models.vision.config import VisionConfig

if TYPE_CHECKING:
    from megatron_puffin.config.arguments import PuffinArguments

# Bytes per parameter: fp32 main gradient (grad_reduce_in_fp32), fp32 master weight, Adam moments (2 x fp32).
BYTES_GRAD_FP32, BYTES_MASTER_FP32, BYTES_ADAM_FP32 = 4, 4, 8
GIB = 1024**3

# Where a tower part lives (see the module docstring).
FIRST, LAYERS, LAST, TIED_COPY = "first", "layers", "last", "tied-copy"


@dataclass(frozen=True)
class ParamCount:
    """Parameters divided over tensor-parallel ranks (``split``, summed over ranks) and held whole on every rank
    (``replicated``)."""

    split: int = 0
    replicated: int = 0

    @property
    def total(self) -> int:
        return self.split + self.replicated

    def per_rank(self, tensor_model_parallel_size: int) -> int:
        return self.split // tensor_model_parallel_size + self.replicated

    def __add__(self, other: "ParamCount") -> "ParamCount":
        return ParamCount(self.split + other.split, self.replicated + other.replicated)

    def __mul__(self, times: int) -> "ParamCount":
        return ParamCount(self.split * times, self.replicated * times)


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


@dataclass(frozen=True)
class TowerPart:
    """One piece of a tower at one pipeline position (``FIRST``, ``LAYERS``, ``LAST`` or ``TIED_COPY``: the output
    layer that a last stage without the embedding allocates for tied embeddings)."""

    name: str
    placement: str
    params: ParamCount


@dataclass(frozen=True)
class Tower:
    """A tower's parts, whether it trains, and why its size is unknown (``parts`` empty) if it is."""

    name: str
    trainable: bool
    parts: Tuple[TowerPart, ...]
    unknown: Optional[str] = None

    @property
    def parameters(self) -> Optional[int]:
        """Distinct parameters (the tied copy on the last stage is not counted); None when unknown."""
        if self.unknown is not None:
            return None
        return sum(p.params.total for p in self.parts if p.placement != TIED_COPY)

    def rank_parameters(self, tensor_model_parallel_size: int, pre_process: bool, post_process: bool,
                        layer_shards: int = 1, layer_share: Optional[Tuple[int, int]] = None) -> int:
        """Parameters one rank holds: the parts its stage builds (``pre_process``: first stage, ``post_process``:
        last stage), decoder layers divided over ``layer_shards`` pipeline stages (or, for an uneven placement,
        ``layer_share`` = (layers on this stage, all layers)), split parts over TP."""
        total = 0
        for part in self.parts:
            count = part.params.per_rank(tensor_model_parallel_size)
            if part.placement == LAYERS:
                total += count * layer_share[0] // layer_share[1] if layer_share else count // layer_shards
            elif (part.placement == FIRST and pre_process) or (part.placement == LAST and post_process):
                total += count
            elif part.placement == TIED_COPY and post_process and not pre_process:
                total += count
        return total


# --- analytic counts per tower ------------------------------------------------------------------------------------
def llm_parts(config: LLMConfig, tensor_model_parallel_size: int = 1) -> Tuple[TowerPart, ...]:
    """The Qwen2 decoder on megatron-core: vocabulary padded for TP, fused QKV (bias optional), SwiGLU, RMSNorm."""
    h, d, f = config.hidden_size, config.head_dim, config.ffn_hidden_size
    vocab = config.padded_vocab_size(tensor_model_parallel_size)
    qkv_rows = (config.num_attention_heads + 2 * config.num_query_groups) * d
    layer = ParamCount(
        split=_linear(h, qkv_rows, config.add_qkv_bias) + config.num_attention_heads * d * h + 3 * f * h,
        replicated=2 * h,
    )
    output = ParamCount(split=vocab * h)
    return (
        TowerPart("embedding", FIRST, ParamCount(split=vocab * h)),
        TowerPart(f"{config.num_layers} decoder layers", LAYERS, layer * config.num_layers),
        TowerPart("final norm", LAST, ParamCount(replicated=h)),
        TowerPart("output layer", TIED_COPY if config.tie_word_embeddings else LAST, output),
    )


def llm_parameter_count(config: LLMConfig) -> int:
    """Exact parameter count of the LLM tower at TP 1 (a tied output layer counted once)."""
    return Tower("LLM", True, llm_parts(config)).parameters  # type: ignore[return-value]


def encoder_layer_count(hidden_size: int, ffn_hidden_size: int) -> ParamCount:
    """One pre-LN megatron-core ``TransformerLayer`` with biased linears and LayerNorms (ViT and connector
    layers): QKV and fc1 column-parallel, proj and fc2 row-parallel (their biases replicated)."""
    h, f = hidden_size, ffn_hidden_size
    return ParamCount(
        split=_linear(h, 3 * h) + h * h + _linear(h, f) + f * h,
        replicated=2 * h + h + 2 * h + h,  # two LayerNorms, the row-parallel biases
    )


def vision_encoder_parts(config: VisionConfig) -> Tuple[TowerPart, ...]:
    """RADIO ViT: patch embedder (no bias, column-parallel), class/register tokens and the CPE position grid
    (replicated), the blocks, and the optional final LayerNorm."""
    h = config.hidden_size
    stem = ParamCount(
        split=3 * config.patch_size**2 * h,
        replicated=config.class_token_len * h + config.max_grid_size**2 * h + (2 * h if config.final_norm else 0),
    )
    blocks = encoder_layer_count(h, config.ffn_hidden_size) * config.num_layers
    return (TowerPart("embeddings", FIRST, stem), TowerPart(f"{config.num_layers} blocks", FIRST, blocks))


def vision_projector_parts(config: VisionConfig, llm_hidden_size: int) -> Tuple[TowerPart, ...]:
    """The MLP ``folded -> llm hidden -> llm hidden`` (fc1 column-, fc2 row-parallel)."""
    h = llm_hidden_size
    params = ParamCount(split=_linear(config.folded_hidden_size, h) + h * h, replicated=h)
    return (TowerPart("projector", FIRST, params),)


def query_path_parts(config: ConnectorConfig, llm_hidden_size: int) -> Tuple[TowerPart, ...]:
    """Meta queries (first stage); llm2connector_1/2, connector_1/2 and projector_1/2 (last stage). The plain
    ``nn.Linear`` projections and the queries are replicated over TP."""
    c = config.hidden_size
    connector = encoder_layer_count(c, config.ffn_hidden_size) * config.num_layers
    projections = 2 * _linear(llm_hidden_size, c) + _linear(c, config.pooled_projection_dim)
    projections += _linear(c, config.joint_attention_dim)
    return (
        TowerPart("meta queries", FIRST, ParamCount(replicated=config.num_queries * llm_hidden_size)),
        TowerPart("connectors", LAST, connector * 2),
        TowerPart("projections", LAST, ParamCount(replicated=projections)),
    )


def dit_parts(config: DiTConfig) -> Tuple[TowerPart, ...]:
    """SD3 MMDiT: replicated embedders and output projection; joint blocks with column-parallel AdaLN modulation,
    q/k/v and fc1, row-parallel outputs (biases replicated); the last block is ``context_pre_only``."""
    h, p = config.hidden_size, config.patch_size
    embedders = (config.in_channels * p * p * h + h) + _linear(256, h) + _linear(h, h)  # patch, timestep
    embedders += _linear(config.pooled_projection_dim, h) + _linear(h, h)  # pooled text
    embedders += _linear(config.joint_attention_dim, config.caption_projection_dim)  # context embedder

    def stream(modulation_chunks: int, with_output: bool, with_ff: bool) -> ParamCount:
        """One stream of a block: modulation, q/k/v, attention output and feed-forward."""
        split = _linear(h, modulation_chunks * h) + 3 * _linear(h, h)
        replicated = 0
        if with_output:
            split, replicated = split + h * h, replicated + h
        if with_ff:
            split, replicated = split + _linear(h, 4 * h) + 4 * h * h, replicated + h
        return ParamCount(split, replicated)

    block = stream(6, True, True) + stream(6, True, True)
    last_block = stream(6, True, True) + stream(2, False, False)
    blocks = block * (config.num_layers - 1) + last_block
    head = ParamCount(split=_linear(h, 2 * h), replicated=_linear(h, p * p * config.out_channels))
    return (
        TowerPart("embedders", LAST, ParamCount(replicated=embedders)),
        TowerPart(f"{config.num_layers} joint blocks", LAST, blocks),
        TowerPart("output", LAST, head),
    )


def _conv3(n_in: int, n_out: int) -> int:
    """A biased 3x3 ``Conv2d``."""
    return 9 * n_in * n_out + n_out


def _resnet(n_in: int, n_out: int) -> int:
    """diffusers ``ResnetBlock2D`` without time embedding: two GroupNorm + 3x3 conv, 1x1 shortcut if widths differ."""
    shortcut = _linear(n_in, n_out) if n_in != n_out else 0
    return 2 * n_in + _conv3(n_in, n_out) + 2 * n_out + _conv3(n_out, n_out) + shortcut


def vae_parameter_count(config: Dict[str, Any]) -> int:
    """Exact parameter count of a diffusers ``AutoencoderKL`` from its ``config.json`` dictionary.

    Raises:
        ValueError: for block types other than ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` (SD3's VAE uses those).
    """
    channels = list(config.get("block_out_channels", (64,)))
    down = list(config.get("down_block_types", ("DownEncoderBlock2D",)))
    up = list(config.get("up_block_types", ("UpDecoderBlock2D",)))
    unsupported = sorted({t for t in down if t != "DownEncoderBlock2D"} | {t for t in up if t != "UpDecoderBlock2D"})
    if unsupported:
        raise ValueError(f"cannot count AutoencoderKL block types {unsupported}")
    layers = config.get("layers_per_block", 1)
    latent = config.get("latent_channels", 4)
    attention = config.get("mid_block_add_attention", True)
    top = channels[-1]
    mid = 2 * _resnet(top, top) + ((2 * top + 4 * _linear(top, top)) if attention else 0)
    encoder = _conv3(config.get("in_channels", 3), channels[0]) + mid + 2 * top + _conv3(top, 2 * latent)
    previous = channels[0]
    for i, width in enumerate(channels):
        encoder += sum(_resnet(previous if j == 0 else width, width) for j in range(layers))
        encoder += _conv3(width, width) if i < len(channels) - 1 else 0  # downsample
        previous = width
    decoder = _conv3(latent, top) + mid + 2 * channels[0] + _conv3(channels[0], config.get("out_channels", 3))
    previous = top
    for i, width in enumerate(reversed(channels)):
        decoder += sum(_resnet(previous if j == 0 else width, width) for j in range(layers + 1))
        decoder += _conv3(width, width) if i < len(channels) - 1 else 0  # upsample
        previous = width
    quant = _linear(2 * latent, 2 * latent) if config.get("use_quant_conv", True) else 0
    post_quant = _linear(latent, latent) if config.get("use_post_quant_conv", True) else 0
    return encoder + decoder + quant + post_quant


def vae_parts(model: PuffinModelConfig) -> Tuple[Tuple[TowerPart, ...], Optional[str]]:
    """The frozen VAE's parts, counted from ``--vae-config`` or ``--vae-path``/config.json when readable, and why
    they are unknown otherwise."""
    path = model.vae_config or (os.path.join(model.vae_path, "config.json") if model.vae_path else None)
    if path is None:
        return (), "no --vae-path or --vae-config"
    try:
        with open(path) as handle:
            count = vae_parameter_count(json.load(handle))
    except OSError:
        return (), f"{path} not readable"
    except ValueError as error:
        return (), f"{path}: {error}"
    return (TowerPart("autoencoder", LAST, ParamCount(replicated=count)),), None


def weight_bytes(args: PuffinArguments) -> int:
    """Bytes per stored weight: 2 in bf16/fp16 (every tower, the VAE included), else 4."""
    return 2 if (args.precision.bf16 or args.precision.fp16) else 4
