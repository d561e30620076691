"""Published RADIO checkpoints (and Puffin's MLP projector) -> our :class:`~megatron_puffin.models.vision.VisionTower`.

Assumed RADIO names (NVlabs/RADIO: ``RADIOModel`` wrapping a timm ``VisionTransformer`` whose patch embedding,
position embedding and class token were replaced by CPE's ``ViTPatchGenerator``). The torch-hub model's
``state_dict()`` has them bare; the Hugging Face ``RADIOModel`` (C-RADIOv3-H) prefixes ``radio_model.``; Puffin's
``.pth`` prefixes ``visual_encoder.radio_model.``. ``D`` = width, ``G`` = CPE grid side, ``T`` = class + register
tokens, ``p`` = patch::

    RADIO                                              ours (relative to VisionTower)
    input_conditioner.norm_mean / norm_std [3,1,1]     input_conditioner.norm_mean / norm_std
    model.patch_generator.embedder.weight [D, 3p^2]    encoder.embedder.weight        (c, y, x) flattening
    model.patch_generator.pos_embed [1, G^2, D]        encoder.position_embeddings
    model.patch_generator.cls_token.token [T, D]       encoder.class_token
    model.blocks.{i}.norm1.{weight,bias}               encoder.decoder.layers.{i}.input_layernorm.*
    model.blocks.{i}.attn.qkv.{weight,bias} [3D,...]   encoder.decoder.layers.{i}.self_attention.linear_qkv.*
    model.blocks.{i}.attn.proj.{weight,bias}           encoder.decoder.layers.{i}.self_attention.linear_proj.*
    model.blocks.{i}.norm2.{weight,bias}               encoder.decoder.layers.{i}.pre_mlp_layernorm.*
    model.blocks.{i}.mlp.fc1 / fc2.{weight,bias}       encoder.decoder.layers.{i}.mlp.linear_fc1 / linear_fc2.*
    model.norm.{weight,bias}                           encoder.ln_post.*        (only with --vision-final-norm)
    feature_normalizer.mean [D] / tx [D, D]            feature_normalizer.*     (only with --vision-feature-normalizer)

    Puffin's projector                                 ours
    projector.0.{weight,bias}  [llm, fold^2 D]         projector.linear_fc1.*
    projector.2.{weight,bias}  [llm, llm]              projector.linear_fc2.*

timm's fused ``qkv`` is ``[q; k; v]`` (each heads-major); ours is megatron-core's per-head interleave.
Deliberately ignored (Puffin uses only the backbone's patch features): ``summary_idxs`` (which class tokens form
the unused summary), ``adaptors.*`` (teacher heads) and ``inter_feature_normalizer.*`` (intermediate-layer
normaliser). Every other tensor must match: leftovers, missing tensors and wrong shapes raise one error listing
them all, with a hint when the shape names a flag (class tokens, CPE grid). Other timm flavours (RADIO's
``mlpnorm`` ``mlp.norm``, layer scale ``ls1``/``ls2``, ``mask_token``, patch bias) are therefore reported, not
silently dropped.
"""
from __future__ import annotations

import logging
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_puffin.convert.common import (
    COLUMN,
    REPLICATED,
    ROW,
    ConversionError,
    StateDict,
    Table,
    check_against_table,
    encoder_layer_table,
    interleave_qkv,
    linear_entries,
    load_checked,
    shard_by_table,
    split_qkv,
    unshard_by_table,
)
from megatron_puffin.models.vision.config import VisionConfig

logger = logging.getLogger(__name__)

HF_PREFIX = "radio_model."
IGNORED_PATTERNS = (r"summary_idxs", r"adaptors\..*", r"inter_feature_normalizer\..*")
VISION_BUFFERS = ("input_conditioner.norm_mean", "input_conditioner.norm_std", "feature_normalizer.mean",
                  "feature_normalizer.tx")

_BLOCK_RENAMES = {
    # RADIO (under model.blocks.{i}.) : ours (under encoder.decoder.layers.{i}.)
    "norm1.weight": "input_layernorm.weight",
    "norm1.bias": "input_layernorm.bias",
    "attn.proj.weight": "self_attention.linear_proj.weight",
    "attn.proj.bias": "self_attention.linear_proj.bias",
    "norm2.weight": "pre_mlp_layernorm.weight",
    "norm2.bias": "pre_mlp_layernorm.bias",
    "mlp.fc1.weight": "mlp.linear_fc1.weight",
    "mlp.fc1.bias": "mlp.linear_fc1.bias",
    "mlp.fc2.weight": "mlp.linear_fc2.weight",
    "mlp.fc2.bias": "mlp.linear_fc2.bias",
}
_PROJECTOR_RENAMES = {"0.weight": "linear_fc1.weight", "0.bias": "linear_fc1.bias",
                      "2.weight": "linear_fc2.weight", "2.bias": "linear_fc2.bias"}


def _direct_renames(config: VisionConfig) -> Dict[str, str]:
    """RADIO name -> our name for every tensor copied as it is (all but ``qkv``)."""
    renames = {
        "input_conditioner.norm_mean": "input_conditioner.norm_mean",
        "input_conditioner.norm_std": "input_conditioner.norm_std",
        "model.patch_generator.embedder.weight": "encoder.embedder.weight",
        "model.patch_generator.pos_embed": "encoder.position_embeddings",
    }
    if config.class_token_len > 0:
        renames["model.patch_generator.cls_token.token"] = "encoder.class_token"
    if config.final_norm:
        renames.update({"model.norm.weight": "encoder.ln_post.weight", "model.norm.bias": "encoder.ln_post.bias"})
    if config.feature_normalizer:
        renames.update({"feature_normalizer.mean": "feature_normalizer.mean",
                        "feature_normalizer.tx": "feature_normalizer.tx"})
    for layer in range(config.num_layers):
        for ref_name, our_name in _BLOCK_RENAMES.items():
            renames[f"model.blocks.{layer}.{ref_name}"] = f"encoder.decoder.layers.{layer}.{our_name}"
    return renames


def encoder_tensor_table(config: VisionConfig) -> Table:
    """Every tensor of the vision tower except the projector: ``name -> (unsharded shape, TP axis or None)``."""
    hidden, patch, grid = config.hidden_size, config.patch_size, config.max_grid_size
    table: Table = {
        "input_conditioner.norm_mean": ((3, 1, 1), REPLICATED),
        "input_conditioner.norm_std": ((3, 1, 1), REPLICATED),
        "encoder.embedder.weight": ((hidden, 3 * patch * patch), COLUMN),
        "encoder.position_embeddings": ((1, grid * grid, hidden), REPLICATED),
    }
    if config.class_token_len > 0:
        table["encoder.class_token"] = ((config.class_token_len, hidden), REPLICATED)
    for layer in range(config.num_layers):
        table.update(encoder_layer_table(f"encoder.decoder.layers.{layer}.", hidden, config.ffn_hidden_size))
    if config.final_norm:
        table.update({f"encoder.ln_post.{kind}": ((hidden,), REPLICATED) for kind in ("weight", "bias")})
    if config.feature_normalizer:
        table.update({"feature_normalizer.mean": ((hidden,), REPLICATED),
                      "feature_normalizer.tx": ((hidden, hidden), REPLICATED)})
    return table


def projector_tensor_table(config: VisionConfig, llm_hidden_size: int) -> Table:
    """The projector's tensors (our names): column-parallel ``linear_fc1``, row-parallel ``linear_fc2``."""
    table = linear_entries("projector.linear_fc1", llm_hidden_size, config.folded_hidden_size, COLUMN)
    table.update(linear_entries("projector.linear_fc2", llm_hidden_size, llm_hidden_size, ROW))
    return table


def vision_tensor_table(config: VisionConfig, llm_hidden_size: int) -> Table:
    """Every tensor of :class:`VisionTower`: ``name -> (unsharded shape, TP axis or None)``."""
    table = encoder_tensor_table(config)
    table.update(projector_tensor_table(config, llm_hidden_size))
    return table


def _strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: Optional[str]) -> StateDict:
    """Remove ``prefix`` (auto: ``radio_model.`` when every key has it) from every key; all must have it."""
    if prefix is None:
        prefix = HF_PREFIX if state_dict and all(k.startswith(HF_PREFIX) for k in state_dict) else ""
    outside = sorted(k for k in state_dict if not k.startswith(prefix))
    if outside:
        raise ConversionError(f"RADIO -> mcore: {len(outside)} tensor(s) outside prefix {prefix!r}: "
                              f"{', '.join(outside)}")
    return {k[len(prefix):]: v for k, v in state_dict.items()}


def _shape_hints(state_dict: Mapping[str, torch.Tensor], config: VisionConfig) -> List[str]:
    """Flag suggestions when a checkpoint's class tokens or CPE grid disagree with the configuration."""
    hints = []
    token = state_dict.get("model.patch_generator.cls_token.token")
    if token is not None and token.shape[0] != config.class_token_len:
        hints.append(f"the checkpoint has {token.shape[0]} class/register tokens: set --vision-class-token-len "
                     f"{token.shape[0]} (now {config.class_token_len})")
    pos = state_dict.get("model.patch_generator.pos_embed")
    if pos is not None and pos.dim() == 3:
        side = int(round(pos.shape[1] ** 0.5))
        if side * side == pos.shape[1] and side != config.max_grid_size:
            hints.append(f"the checkpoint's CPE grid is {side}x{side}: set --vision-max-image-size "
                         f"{side * config.patch_size} (now {config.max_image_size})")
    if "model.norm.weight" in state_dict and not config.final_norm:
        hints.append("the checkpoint has a final norm (model.norm): set --vision-final-norm if the model uses it")
    if "feature_normalizer.mean" in state_dict and not config.feature_normalizer:
        hints.append("the checkpoint has a feature normaliser: set --vision-feature-normalizer")
    return hints


def _ignored(name: str) -> bool:
    return any(re.fullmatch(pattern, name) for pattern in IGNORED_PATTERNS)


def radio_to_mcore(
    state_dict: Mapping[str, torch.Tensor], config: VisionConfig, prefix: Optional[str] = None
) -> StateDict:
    """A RADIO state dict -> our unsharded vision state dict without the projector (names relative to
    ``VisionTower``).

    Args:
        state_dict: RADIO tensors only (torch-hub names, or prefixed).
        config: the tower; class-token count, grid, final norm and feature normaliser must match.
        prefix: removed from every key; default ``radio_model.`` when every key has it, else none.

    Raises:
        ConversionError: unmatched, missing or wrongly shaped tensors (all listed, with flag hints).
    """
    source = _strip_prefix(state_dict, prefix)
    ignored = sorted(k for k in source if _ignored(k))
    if ignored:
        logger.info("RADIO -> mcore: ignoring %d tensor(s) Puffin does not use: %s", len(ignored), ", ".join(ignored))
    renames = _direct_renames(config)
    ours = {our: source[ref] for ref, our in renames.items() if ref in source}
    consumed = {ref for ref in renames if ref in source} | set(ignored)
    for layer in range(config.num_layers):
        for kind in ("weight", "bias"):
            ref = f"model.blocks.{layer}.attn.qkv.{kind}"
            if ref in source:
                q, k, v = source[ref].chunk(3, dim=0)
                ours[f"encoder.decoder.layers.{layer}.self_attention.linear_qkv.{kind}"] = interleave_qkv(
                    q, k, v, config.num_attention_heads
                )
                consumed.add(ref)
    leftover = sorted(set(source) - consumed)
    try:
        if leftover:
            raise ConversionError(f"RADIO -> mcore: {len(leftover)} unmatched tensor(s): {', '.join(leftover)}")
        return check_against_table(ours, encoder_tensor_table(config), "RADIO -> mcore")
    except ConversionError as error:
        hints = _shape_hints(source, config)
        raise ConversionError(str(error) + "".join(f"; hint: {h}" for h in hints)) from None


def mcore_to_radio(state_dict: Mapping[str, torch.Tensor], config: VisionConfig, prefix: str = HF_PREFIX) -> StateDict:
    """Our unsharded vision state dict (the projector, if present, is left out) -> RADIO names under ``prefix``.

    Raises:
        ConversionError: names or shapes that do not match the table (all listed).
    """
    encoder = {k: v for k, v in state_dict.items() if not k.startswith("projector.")}
    ours = check_against_table(encoder, encoder_tensor_table(config), "mcore -> RADIO")
    radio = {prefix + ref: ours[our] for ref, our in _direct_renames(config).items()}
    for layer in range(config.num_layers):
        for kind in ("weight", "bias"):
            q, k, v = split_qkv(ours[f"encoder.decoder.layers.{layer}.self_attention.linear_qkv.{kind}"],
                                config.num_attention_heads)
            radio[f"{prefix}model.blocks.{layer}.attn.qkv.{kind}"] = torch.cat([q, k, v], dim=0)
    return radio


def projector_to_mcore(
    state_dict: Mapping[str, torch.Tensor], config: VisionConfig, llm_hidden_size: int, prefix: str = "projector."
) -> StateDict:
    """Puffin's ``projector.{0,2}`` tensors -> ours (``projector.linear_fc1/2``).

    Raises:
        ConversionError: unmatched, missing or wrongly shaped tensors (all listed).
    """
    leftover = sorted(k for k in state_dict if not (k.startswith(prefix) and k[len(prefix):] in _PROJECTOR_RENAMES))
    if leftover:
        raise ConversionError(f"projector -> mcore: {len(leftover)} unmatched tensor(s): {', '.join(leftover)}")
    ours = {f"projector.{_PROJECTOR_RENAMES[k[len(prefix):]]}": v for k, v in state_dict.items()}
    return check_against_table(ours, projector_tensor_table(config, llm_hidden_size), "projector -> mcore")


def mcore_to_projector(
    state_dict: Mapping[str, torch.Tensor], config: VisionConfig, llm_hidden_size: int, prefix: str = "projector."
) -> StateDict:
    """Our projector tensors (other vision tensors are left out) -> Puffin's ``projector.{0,2}`` names."""
    projector = {k: v for k, v in state_dict.items() if k.startswith("projector.")}
    ours = check_against_table(projector, projector_tensor_table(config, llm_hidden_size), "mcore -> projector")
    return {prefix + ref: ours[f"projector.{our}"] for ref, our in _PROJECTOR_RENAMES.items()}


def shard_vision_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: VisionConfig, llm_hidden_size: int, tensor_model_parallel_size: int
) -> List[StateDict]:
    """Split our unsharded vision state dict into one per tensor-parallel rank (split along heads for q/k/v)."""
    config.check(tensor_model_parallel_size)
    table = vision_tensor_table(config, llm_hidden_size)
    return shard_by_table(state_dict, table, tensor_model_parallel_size, "shard vision")


def unshard_vision_state_dicts(
    shards: Sequence[Mapping[str, torch.Tensor]],
    config: VisionConfig,
    llm_hidden_size: int,
    check_replicated: bool = True,
    parameters_only: bool = False,
) -> StateDict:
    """Join per-rank vision state dicts (or gradients by parameter name: ``parameters_only`` skips buffers)."""
    table = vision_tensor_table(config, llm_hidden_size)
    if parameters_only:
        table = {k: v for k, v in table.items() if k not in VISION_BUFFERS}
    return unshard_by_table(shards, table, check_replicated, "unshard vision")


def load_vision_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load one rank's vision state dict, every tensor accounted for (``_extra_state`` may be absent)."""
    load_checked(model, state_dict)


def radio_grid_and_tokens(state_dict: Mapping[str, torch.Tensor], prefix: Optional[str] = None) -> Tuple[int, int]:
    """``(CPE grid side, class + register tokens)`` read from a RADIO state dict, to configure the tower."""
    source = _strip_prefix(state_dict, prefix)
    pos = source["model.patch_generator.pos_embed"]
    token = source.get("model.patch_generator.cls_token.token")
    return int(round(pos.shape[1] ** 0.5)), 0 if token is None else int(token.shape[0])


def radio_vision_shape(state_dict: Mapping[str, torch.Tensor], prefix: Optional[str] = None) -> Dict[str, int]:
    """The :class:`VisionConfig` fields a RADIO state dict determines: patch size, width, depth, MLP width, CPE
    grid (as ``max_image_size``) and class + register tokens. Heads and epsilons cannot be read from weights.

    Raises:
        ConversionError: the state dict lacks RADIO's patch embedding, position grid or blocks.
    """
    source = _strip_prefix(state_dict, prefix)
    required = ("model.patch_generator.embedder.weight", "model.patch_generator.pos_embed",
                "model.blocks.0.mlp.fc1.weight")
    lacking = [name for name in required if name not in source]
    if lacking:
        shown = ", ".join(sorted(source)[:5])
        raise ConversionError(f"not a RADIO state dict: no {', '.join(lacking)} (its names start: {shown}, ...)")
    width, patch_inputs = source["model.patch_generator.embedder.weight"].shape
    patch = int(round((patch_inputs / 3) ** 0.5))
    grid, tokens = radio_grid_and_tokens(source, prefix="")
    layers = 1 + max(int(match.group(1)) for match in map(re.compile(r"model\.blocks\.(\d+)\.").match, source) if match)
    return {"patch_size": patch, "hidden_size": int(width), "num_layers": layers,
            "ffn_hidden_size": int(source["model.blocks.0.mlp.fc1.weight"].shape[0]),
            "max_image_size": grid * patch, "class_token_len": tokens}
