"""The frozen SD3 VAE (diffusers ``AutoencoderKL``) as a latent encoder/decoder for images and camera maps.

Always frozen and in eval mode, run without autograd (docs/puffin.md §1.9): ``train()`` cannot switch it to training
mode, its parameters never require grad. Latents are normalised with the VAE's own config:
``z = (x_latent - shift_factor) * scaling_factor`` (SD3: shift 0.0609, scale 1.5305) and decoded with the
inverse. Encoding takes the posterior **sample** (Puffin's training) or its mean, by flag.

Inputs may be a batch ``[B, 3, H, W]`` or a list of ``[3, h_i, w_i]`` images of different sizes: same-shaped
images are encoded together (one call per shape, optionally split into chunks of ``max_batch_size``), results
come back in input order. Images and camera maps are in [-1, 1]-like ranges (camera maps divided by pi/2).
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

Images = Union[torch.Tensor, Sequence[torch.Tensor]]


def group_by_shape(tensors: Sequence[torch.Tensor]) -> Dict[Tuple[int, ...], List[int]]:
    """Indices of same-shaped tensors, by shape, in order of first appearance."""
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault(tuple(tensor.shape), []).append(index)
    return groups


def autoencoder_kl_class() -> type:
    """diffusers' ``AutoencoderKL``, imported without the notice its import prints on a machine without CUDA.

    Importing it imports diffusers' transformer models, one of which decorates a method with
    ``torch.autocast("cuda")`` at import: torch then warns "CUDA is not available ... Disabling autocast" twice,
    about a model Puffin never uses. Only that notice, only during the import, is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="CUDA is not available or torch_xla is imported")
        from diffusers import AutoencoderKL
    return AutoencoderKL


class FrozenVAE(nn.Module):
    """Frozen ``AutoencoderKL`` with SD3's latent normalisation (see module docstring).

    Args:
        vae: a diffusers ``AutoencoderKL``.
        sample_posterior: default for :meth:`encode`: posterior sample (True, Puffin) or mean (False).
        max_batch_size: encode/decode at most this many images per VAE call (None: no limit).
    """

    def __init__(self, vae: nn.Module, sample_posterior: bool = True, max_batch_size: Optional[int] = None) -> None:
        super().__init__()
        self.vae = vae
        self.sample_posterior = sample_posterior
        self.max_batch_size = max_batch_size
        self.shift_factor = float(vae.config.shift_factor or 0.0)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.vae.requires_grad_(False)
        super().train(False)

    @classmethod
    def from_config(cls, config: Dict[str, Any], dtype: torch.dtype = torch.float32, **kwargs: Any) -> "FrozenVAE":
        """A randomly initialised VAE from an ``AutoencoderKL`` config dictionary (tests, benchmarks)."""
        return cls(autoencoder_kl_class().from_config(config).to(dtype), **kwargs)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.bfloat16, **kwargs: Any) -> "FrozenVAE":
        """Load a local diffusers ``vae/`` folder (``config.json`` + safetensors); never downloads."""
        return cls(autoencoder_kl_class().from_pretrained(path, torch_dtype=dtype, local_files_only=True), **kwargs)

    def train(self, mode: bool = True) -> "FrozenVAE":
        """Stays in eval mode whatever ``mode`` says (the VAE is frozen)."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def _chunks(self, batch: torch.Tensor) -> List[torch.Tensor]:
        return list(batch.split(self.max_batch_size)) if self.max_batch_size else [batch]

    def _posterior(self, images: torch.Tensor):
        """diffusers' ``DiagonalGaussianDistribution`` of a same-shaped batch ``[n, 3, H, W]``."""
        return self.vae.encode(images.to(device=self.device, dtype=self.dtype)).latent_dist

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """``(z - shift) * scale``."""
        return (latents - self.shift_factor) * self.scaling_factor

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """``z / scale + shift``."""
        return latents / self.scaling_factor + self.shift_factor

    def _encode_batch(self, images: torch.Tensor, sample: bool, generator: Optional[torch.Generator]) -> torch.Tensor:
        pieces = []
        for chunk in self._chunks(images):
            posterior = self._posterior(chunk)
            pieces.append(posterior.sample(generator=generator) if sample else posterior.mean)
        return self.normalize(torch.cat(pieces))

    @torch.no_grad()
    def encode(
        self, images: Images, generator: Optional[torch.Generator] = None, sample_posterior: Optional[bool] = None
    ) -> Images:
        """Images (or camera maps) to normalised latents.

        Args:
            images: ``[B, 3, H, W]`` or list of ``[3, h_i, w_i]``.
            generator: source of the posterior noise (on the VAE's device).
            sample_posterior: sample (True) or mean (False); default the constructor's choice.

        Returns:
            ``[B, C, H/8, W/8]`` or a list of ``[C, h_i/8, w_i/8]`` in the VAE's dtype.
        """
        sample = self.sample_posterior if sample_posterior is None else sample_posterior
        return self._map_grouped(images, lambda batch: self._encode_batch(batch, sample, generator))

    @torch.no_grad()
    def encode_moments(self, images: Images) -> Tuple[Images, Images]:
        """Posterior ``(mean, std)`` in raw latent units (not normalised), for caching latents offline while
        keeping posterior sampling (see :meth:`latents_from_moments`). Same structure as :meth:`encode`."""

        def moments_batch(batch: torch.Tensor) -> torch.Tensor:
            posteriors = [self._posterior(chunk) for chunk in self._chunks(batch)]
            means = torch.cat([p.mean for p in posteriors])
            stds = torch.cat([p.std for p in posteriors])
            return torch.stack([means, stds], dim=1)  # [n, 2, C, h, w]

        moments = self._map_grouped(images, moments_batch)
        if isinstance(moments, torch.Tensor):
            return moments[:, 0], moments[:, 1]
        return [m[0] for m in moments], [m[1] for m in moments]

    def latents_from_moments(
        self, mean: torch.Tensor, std: torch.Tensor, generator: Optional[torch.Generator] = None,
        sample_posterior: Optional[bool] = None,
    ) -> torch.Tensor:
        """Normalised latents from cached moments: ``normalize(mean + std * eps)`` (or of the mean)."""
        sample = self.sample_posterior if sample_posterior is None else sample_posterior
        if not sample:
            return self.normalize(mean)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.normalize(mean + std * noise)

    @torch.no_grad()
    def decode(self, latents: Images) -> Images:
        """Normalised latents back to images (``[B, 3, 8h, 8w]`` or a list), in the VAE's dtype."""

        def decode_batch(batch: torch.Tensor) -> torch.Tensor:
            raw = self.denormalize(batch.to(device=self.device, dtype=self.dtype))
            return torch.cat([self.vae.decode(chunk).sample for chunk in self._chunks(raw)])

        return self._map_grouped(latents, decode_batch)

    @staticmethod
    def _map_grouped(inputs: Images, batch_fn) -> Images:
        """Apply ``batch_fn`` to each group of same-shaped inputs; outputs in input order."""
        if isinstance(inputs, torch.Tensor):
            return batch_fn(inputs)
        outputs: List[Optional[torch.Tensor]] = [None] * len(inputs)
        for _, indices in group_by_shape(inputs).items():
            results = batch_fn(torch.stack([inputs[i] for i in indices]))
            for position, index in enumerate(indices):
                outputs[index] = results[position]
        return outputs
