"""Reading and writing Hugging Face model directories (config.json + safetensors shards)."""
from __future__ import annotations

import json
import os
from glob import glob
from typing import Dict, Tuple

import torch


def load_hf_directory(directory: str) -> Tuple[Dict, Dict[str, torch.Tensor]]:
    """(config dict, state dict) of an HF directory with ``*.safetensors`` (or ``pytorch_model*.bin``) files."""
    from safetensors.torch import load_file

    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{directory} has no config.json; pass a Hugging Face model directory")
    with open(config_path) as handle:
        config = json.load(handle)
    state: Dict[str, torch.Tensor] = {}
    files = sorted(glob(os.path.join(directory, "*.safetensors")))
    for path in files:
        state.update(load_file(path))
    if not files:
        for path in sorted(glob(os.path.join(directory, "pytorch_model*.bin"))):
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    if not state:
        raise FileNotFoundError(f"{directory} has no *.safetensors or pytorch_model*.bin weights")
    return config, state


def save_hf_directory(directory: str, config: Dict, state_dict: Dict[str, torch.Tensor]) -> None:
    """Write ``config.json`` and one ``model.safetensors`` into a new directory."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})
