"""Reading and writing Hugging Face model directories (config.json + safetensors shards)."""
from __future__ import annotations

import json
import os
from glob import glob
from typing import Dict, Tuple

import torch

from megatron_puffin.files import read_json_object


class HFDirectoryError(ValueError):
    """A directory that is not a readable Hugging Face model directory; the message names the file."""


def _read_weights(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - garbled, truncated, or objects other than tensors
        from megatron_puffin.checkpoint_safety import weights_only_failure

        raise HFDirectoryError(f"{path} is not a readable weights file ({weights_only_failure(error)})") from None


def load_hf_directory(directory: str) -> Tuple[Dict, Dict[str, torch.Tensor]]:
    """(config dict, state dict) of an HF directory with ``*.safetensors`` files, else ``*pytorch_model*.bin`` ones
    (transformers' ``pytorch_model*.bin``, diffusers' ``diffusion_pytorch_model*.bin``)."""
    if not os.path.isdir(directory):
        raise HFDirectoryError(f"{directory} is not a directory; pass a Hugging Face model directory")
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise HFDirectoryError(f"{directory} has no config.json; pass a Hugging Face model directory")
    config = read_json_object(config_path, HFDirectoryError)
    files = sorted(glob(os.path.join(directory, "*.safetensors"))) or \
        sorted(glob(os.path.join(directory, "*pytorch_model*.bin")))
    state: Dict[str, torch.Tensor] = {}
    for path in files:
        state.update(_read_weights(path))
    if not state:
        raise HFDirectoryError(f"{directory} has no *.safetensors or *pytorch_model*.bin weights")
    return config, state


def save_hf_directory(directory: str, config: Dict, state_dict: Dict[str, torch.Tensor]) -> None:
    """Write ``config.json`` and one ``model.safetensors`` into a new directory."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})
