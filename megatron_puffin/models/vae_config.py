"""The VAE's ``AutoencoderKL`` config as the flags name it (``--vae-config FILE`` or ``--vae-path DIR``), read
without building the VAE or importing torch: the flag checks, the FLOPs count and the pipeline balance read its
latent channels and downsampling factor."""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Dict, Mapping, Optional

from megatron_puffin.files import read_json_object


def vae_downsample_factor(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent along each side: 2 per encoder block but the last (SD3: 8)."""
    return 2 ** (len(vae_config.get("block_out_channels", [64])) - 1)


@lru_cache(maxsize=8)
def _read_json(path: str) -> Dict[str, Any]:
    return read_json_object(path, ValueError)


def load_vae_config(model_config) -> Optional[Dict[str, Any]]:
    """The VAE's ``AutoencoderKL`` config dictionary from ``--vae-config`` or ``--vae-path`` (``model_config``: a
    :class:`~megatron_puffin.models.puffin_config.PuffinModelConfig`), or None."""
    if model_config.vae_config:
        return _read_json(model_config.vae_config)
    if model_config.vae_path:
        return _read_json(os.path.join(model_config.vae_path, "config.json"))
    return None
