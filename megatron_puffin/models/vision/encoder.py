"""The RADIO ViT on megatron-core's ``RADIOViTModel``, with any image size per call.

``RADIOViTModel`` provides the patch embedder (column-parallel, gathered), the CPE position grid and its
resampling (train mode: random window + per-sample dropout; eval mode: bilinear resize to ``max(h, w)^2`` and a
top-left crop, as RADIO's ``ViTPatchGenerator``), the class/register tokens and the ``TransformerBlock``. Its
own ``forward`` is tied to one image size (it asserts a fixed sequence length) and needs einops, so
:class:`RADIOEncoder` overrides it: Puffin feeds every multiple of 32 up to the CPE grid and beyond.

Parameter names are megatron-core's (``embedder.weight``, ``position_embeddings``, ``class_token``,
``decoder.layers.{i}.*``, ``ln_post.*``); :mod:`megatron_puffin.convert.radio` maps RADIO checkpoints onto them.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional

import torch
from megatron.core.models.vision.radio import RADIOViTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_puffin.models.sequence_parallel import (
    gather_sequence,
    replicated_input_linear,
    sequence_parallel_size,
    split_sequence,
)
from megatron_puffin.models.vision.config import VisionConfig
from megatron_puffin.models.vision.token_padding import pad_token_rows


@contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body with the global RNG of ``device`` seeded to ``seed``; restore the previous state after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        yield


class RADIOEncoder(RADIOViTModel):
    """RADIO ViT returning patch features for images of any size (class/register tokens stripped).

    Args:
        vision_config: the tower's shape.
        config: megatron-core config from :meth:`VisionConfig.to_transformer_config`.
        layer_spec: ViT block spec (:func:`~.vision_layer_specs.get_vision_layer_spec`).
        norm_impl: norm class for the optional final LayerNorm (``ln_post``).
        pg_collection: the process groups of the ViT blocks.
    """

    def __init__(
        self, vision_config: VisionConfig, config: TransformerConfig, layer_spec: ModuleSpec, norm_impl,
        pg_collection: ProcessGroupCollection,
    ) -> None:
        side = vision_config.max_image_size
        super().__init__(
            transformer_config=config,
            transformer_layer_spec=layer_spec,
            ln_post_impl=norm_impl if vision_config.final_norm else None,
            add_class_token=vision_config.class_token_len > 0,
            class_token_len=vision_config.class_token_len,
            patch_dim=vision_config.patch_size,
            img_h=side,
            img_w=side,
            max_img_h=side,
            max_img_w=side,
            pos_dropout=vision_config.cpe_pos_dropout,
            has_cpe=True,
            embedder_bias=False,
            pg_collection=pg_collection,
        )
        self.num_skip_tokens = vision_config.class_token_len
        replicated_input_linear(self.embedder)  # its input is [b, patches, c], never a sequence shard

    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, 3, H, W] -> [b, (H/p)(W/p), h]``: patches flattened channel-major ``(c, y, x)`` as RADIO's
        ``Im2Patches``, then the linear embedder."""
        batch, channels, height, width = images.shape
        p = self.patch_dim
        patches = images.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, (height // p) * (width // p), channels * p * p)
        embedded, _ = self.embedder(patches)
        return embedded

    def _position_rng(self, generator: Optional[torch.Generator], device: torch.device):
        """A context in which the CPE's train-mode randomness draws from ``generator`` (forked global RNG)."""
        if generator is None or not self.training:
            return nullcontext()
        return seeded_rng(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)), device)

    def forward(
        self, images: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None, row_multiple: int = 1,
    ) -> torch.Tensor:
        """Encode conditioned images.

        Args:
            images: ``[b, 3, H, W]`` conditioned pixels (``InputConditioner``), H and W multiples of the patch.
            attention_mask: unused (bidirectional attention over all tokens); kept for megatron's signature.
            generator: source of the train-mode CPE randomness (random window, position dropout), so it can be a
                function of seed, iteration and rank; None draws from the global RNG as megatron-core does.
            row_multiple: the blocks' token rows (images x tokens) are padded to a multiple of this, key-masked
                at the end of each image's tokens (FP8 GEMMs; 1: no padding). Real tokens compute the same.

        Returns:
            ``[b, (H/p)(W/p), h]`` patch features in raster order.
        """
        patches = self.embed_patches(images)
        with self._position_rng(generator, patches.device):
            tokens, _ = self.apply_pos_enc(patches, input_size=images.shape[2:])
        if self.add_class_token:
            tokens = torch.cat([self.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        num_tokens = tokens.shape[1]
        # FP8 row padding and the sequence-parallel split share one end-of-row padding: every row grows to a
        # multiple of TP whose per-rank share of rows (images x tokens / TP) is a multiple of the FP8 GEMM's.
        tokens, mask = pad_token_rows(tokens, row_multiple, shards=sequence_parallel_size(self.config))
        hidden, _ = split_sequence(tokens.transpose(0, 1).contiguous(), self.config, group=self.pg_collection.tp)  # [s'/TP, b, h]
        hidden = self.decoder(hidden, attention_mask=mask)
        if self.ln_post is not None:  # per token: on this rank's shard under sequence parallelism
            hidden = self.ln_post(hidden)
        hidden = gather_sequence(hidden, self.config, group=self.pg_collection.tp)  # [s', b, h]
        return hidden[self.num_skip_tokens:num_tokens].transpose(0, 1)
