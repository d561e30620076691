"""The vision tower: RADIO ViT -> 2x2 fold -> gradient scale -> MLP projector into the LLM (docs/puffin.md §1.3-1.4).

Tensor parallelism: the ViT blocks split heads and MLP columns (megatron-core layers), the patch embedder is
column-parallel with a gathered output, the projector is column-parallel ``linear_fc1`` then row-parallel
``linear_fc2``. The position grid, class tokens, input conditioner and fold are replicated.

Train/eval mode: the ViT's mode only changes its CPE (random window and position-embedding dropout in train
mode). A frozen ViT (no parameter requires grad) is kept in eval mode even when the model is in train mode,
unless ``VisionConfig.frozen_train_mode`` reproduces the reference's quirk (§1.3, §9 point 10).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Optional, Tuple, Union

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_size

from megatron_puffin.models.common.build import resolve_device
from megatron_puffin.models.common.parallel_init import init_linear_like_torch_
from megatron_puffin.models.fp8 import fp8_token_multiple
from megatron_puffin.models.sequence_parallel import with_sequence_parallel
from megatron_puffin.models.vision.config import VisionConfig
from megatron_puffin.models.vision.encoder import RADIOEncoder
from megatron_puffin.models.vision.ops import FeatureNormalizer, InputConditioner, fold_patches, scale_gradient
from megatron_puffin.models.vision.token_padding import pad_rows_to_multiple
from megatron_puffin.models.vision.vision_layer_specs import get_projector_submodules, get_vision_layer_spec

logger = logging.getLogger(__name__)


class VisionTower(MegatronModule):
    """Images in [-1, 1] -> LLM input embeddings, one per ``fold x fold`` block of patches.

    Args:
        vision_config: the tower's shape and behaviour.
        config: megatron-core config of the ViT (:meth:`VisionConfig.to_transformer_config`).
        layer_spec: ViT block spec.
        projector_config: megatron-core config of the projector (:meth:`VisionConfig.projector_transformer_config`).
        projector_submodules: the projector's linears.
        pg_collection: the process groups (the ViT and the projector split over ``pg_collection.tp``).
    """

    def __init__(
        self,
        vision_config: VisionConfig,
        config: TransformerConfig,
        layer_spec: ModuleSpec,
        projector_config: TransformerConfig,
        projector_submodules: MLPSubmodules,
        pg_collection: ProcessGroupCollection,
    ) -> None:
        super().__init__(config=config)
        self.vision_config = vision_config
        self.tp_group = pg_collection.tp
        self.input_conditioner = InputConditioner()
        self.encoder = RADIOEncoder(
            vision_config, config, layer_spec, layer_spec.submodules.input_layernorm, pg_collection
        )
        self.feature_normalizer = FeatureNormalizer(config.hidden_size) if vision_config.feature_normalizer else None
        self.projector = MLP(
            projector_config, projector_submodules, input_size=vision_config.folded_hidden_size,
            ffn_hidden_size=projector_config.hidden_size, tp_group=self.tp_group,
        )
        self.llm_hidden_size = projector_config.hidden_size
        # FP8 GEMMs need row counts of a multiple: the ViT's tokens (key-masked) and the projector's rows are
        # padded to it where the tower runs FP8 (token_padding.py); 1 elsewhere.
        self.row_multiple = fp8_token_multiple(config.fp8_recipe) if config.fp8 else 1
        self.reset_projector_parameters()

    def reset_projector_parameters(self) -> None:
        """PyTorch's default ``nn.Linear`` initialisation for both projector linears (docs/puffin.md §1.4), identical at
        every tensor-parallel size."""
        fc1, fc2 = self.projector.linear_fc1, self.projector.linear_fc2
        init_linear_like_torch_(fc1.weight, fc1.bias, self.vision_config.folded_hidden_size, self.tp_group)
        init_linear_like_torch_(fc2.weight, fc2.bias, self.llm_hidden_size, self.tp_group)

    # -- modes ------------------------------------------------------------------------------------------------
    def encoder_trainable(self) -> bool:
        """Whether any ViT parameter requires grad (False once the tower is frozen)."""
        return any(param.requires_grad for param in self.encoder.parameters())

    def _sync_encoder_mode(self) -> None:
        keep_training = self.training and (self.vision_config.frozen_train_mode or self.encoder_trainable())
        if self.encoder.training != keep_training:
            self.encoder.train(keep_training)

    def train(self, mode: bool = True) -> "VisionTower":
        """Set the mode; a frozen ViT stays in eval mode unless ``frozen_train_mode`` (see module docstring)."""
        super().train(mode)
        self._sync_encoder_mode()
        return self

    # -- forward ----------------------------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        unit = self.vision_config.image_size_multiple
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"vision tower expects images [b, 3, H, W], got {tuple(images.shape)}")
        if images.shape[2] % unit or images.shape[3] % unit:
            raise ValueError(
                f"image size {tuple(images.shape[2:])} must be a multiple of {unit} "
                f"(--vision-patch-size x --vision-fold-size) in both dimensions"
            )

    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """RADIO features folded into LLM-token blocks (before the projector).

        Args:
            images: ``[b, 3, H, W]`` in [-1, 1]; H and W multiples of ``patch x fold`` (32).
            generator: source of train-mode CPE randomness (see :meth:`RADIOEncoder.forward`).

        Returns:
            ``[b, (H/32)(W/32), fold^2 * vision_hidden]`` in the parameter dtype.
        """
        self._check_images(images)
        self._sync_encoder_mode()
        pixels = self.input_conditioner(images, self.encoder.embedder.weight.dtype)
        features = self.encoder(pixels, generator=generator, row_multiple=self.row_multiple)
        if self.feature_normalizer is not None:
            features = self.feature_normalizer(features)
        patch = self.vision_config.patch_size
        grid = (images.shape[2] // patch, images.shape[3] // patch)
        return fold_patches(features, grid, self.vision_config.fold_size)

    def project(self, folded: torch.Tensor) -> torch.Tensor:
        """The MLP projector ``Linear -> SiLU -> Linear``: ``[..., fold^2 * h] -> [..., llm_hidden]`` (rows padded
        to ``row_multiple`` inside, per token, so nothing changes)."""
        fp8_context = nullcontext()
        if self.config.fp8:
            from megatron.core.fp8_utils import get_fp8_context

            fp8_context = get_fp8_context(self.config)
        with fp8_context:
            if self.row_multiple > 1:  # as [rows, 1, fold^2 * h], padded
                rows = folded.reshape(-1, 1, folded.shape[-1])
                output, bias = self.projector(pad_rows_to_multiple(rows, self.row_multiple))
                output = output[: rows.shape[0]].reshape(*folded.shape[:-1], output.shape[-1])
            else:
                output, bias = self.projector(folded)
        return output if bias is None else output + bias

    def forward(
        self,
        images: torch.Tensor,
        apply_grad_scale: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Images to LLM input embeddings.

        Args:
            images: ``[b, 3, H, W]`` in [-1, 1] (any float dtype); H and W multiples of ``patch x fold`` (32).
            apply_grad_scale: multiply the gradient reaching the ViT by ``vision_grad_scale`` (the reference
                does so for understanding losses; irrelevant while the ViT is frozen).
            generator: source of train-mode CPE randomness; None uses the global RNG.

        Returns:
            ``[b, (H/32)(W/32), llm_hidden]`` image embeddings in raster order of the 2x2 blocks.
        """
        folded = self.encode(images, generator=generator)
        if apply_grad_scale:
            folded = scale_gradient(folded, self.vision_config.vision_grad_scale)
        return self.project(folded)


def build_vision(
    config: VisionConfig,
    llm_hidden_size: int,
    transformer_config: Optional[TransformerConfig] = None,
    transformer_impl: str = "local",
    params_dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    *,
    pg_collection: ProcessGroupCollection,
) -> VisionTower:
    """Build the vision tower for the tensor-parallel layout of ``pg_collection``.

    Args:
        config: the tower's shape and behaviour.
        llm_hidden_size: the LLM's hidden size (projector width and output).
        transformer_config: megatron-core config of the ViT; default ``config.to_transformer_config`` at the
            TP size of ``pg_collection.tp`` in ``params_dtype`` (initialised on the CPU exactly when the model goes
            there).
        transformer_impl: ``local`` or ``transformer_engine``.
        params_dtype: parameter dtype when ``transformer_config`` is not given (default fp32).
        device: where the model lives; default the current CUDA device when available, else the CPU.
        pg_collection: the process groups (from :func:`megatron_puffin.distributed.process_groups`).

    Returns:
        The tower on ``device`` in the config's parameter dtype (buffers of the conditioner stay fp32).
    """
    device = resolve_device(device)
    tp = get_pg_size(pg_collection.tp)
    if llm_hidden_size % tp:
        raise ValueError(f"the LLM hidden size ({llm_hidden_size}) must be divisible by "
                         f"--tensor-model-parallel-size ({tp}) for the vision projector")
    if transformer_config is None:
        transformer_config = config.to_transformer_config(
            tensor_model_parallel_size=tp, params_dtype=params_dtype or torch.float32,
            use_cpu_initialization=device.type == "cpu",
        )
    # The projector maps [b, tokens, h] outside the sequence-parallel region (its output is scattered into the LLM
    # input with the text embeddings, then split): no sequence parallelism there.
    projector_config = with_sequence_parallel(
        config.projector_transformer_config(llm_hidden_size, transformer_config), False
    )
    model = VisionTower(
        config, transformer_config, get_vision_layer_spec(transformer_impl), projector_config,
        get_projector_submodules(transformer_impl), pg_collection,
    )
    model = model.to(device=device, dtype=transformer_config.params_dtype)
    model.input_conditioner.float()
    if model.feature_normalizer is not None:
        model.feature_normalizer.float()
    return model


def vision_output_grid(config: VisionConfig, image_size: Tuple[int, int]) -> Tuple[int, int]:
    """``(rows, cols)`` of the LLM-token grid for an image of ``(H, W)`` pixels."""
    unit = config.image_size_multiple
    return image_size[0] // unit, image_size[1] // unit
