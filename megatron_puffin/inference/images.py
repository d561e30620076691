"""Reading user images for inference (docs/puffin.md §6.1): decode, centre-crop to a square (or resize straight), resize to
the model's image size, to float32 ``[3, S, S]`` in [-1, 1]."""
from __future__ import annotations

import os
from typing import Union

import torch
from PIL import Image

from megatron_puffin.data.images import ImageError, decode_image, to_tensor

IMAGE_MODES = ("center_crop", "resize")
"""``center_crop``: the understanding demo/evaluation (crop min(w, h) at the centre, then resize); ``resize``: the
spatial-imagination and photography demos and the world-exploration initial view (straight resize)."""


def center_crop_square(image: Image.Image) -> Image.Image:
    """The centred ``min(w, h)`` square, offsets ``(w - s) // 2`` and ``(h - s) // 2`` (docs/puffin.md §6.1)."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def prepare_image(image: Image.Image, size: int, mode: str = "center_crop") -> torch.Tensor:
    """RGB PIL image -> float32 ``[3, size, size]`` in [-1, 1] (bicubic resize)."""
    if mode not in IMAGE_MODES:
        raise ValueError(f"image mode {mode!r} must be one of {', '.join(IMAGE_MODES)}")
    if mode == "center_crop":
        image = center_crop_square(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return to_tensor(image)


def load_image(source: Union[str, bytes, "os.PathLike"], size: int, mode: str = "center_crop") -> torch.Tensor:
    """Read an image file (or encoded bytes) for the model.

    Raises:
        ImageError: the file is missing or does not decode (the message names the file).
    """
    name = "<bytes>"
    if not isinstance(source, bytes):
        name = os.fspath(source)
        try:
            with open(name, "rb") as handle:
                source = handle.read()
        except OSError as error:
            raise ImageError("image_unreadable", f"{name}: {error.strerror}") from None
    try:
        image = decode_image(source)
    except ImageError as error:
        raise ImageError(error.reason, f"{name}: {error.detail}") from None
    return prepare_image(image, size, mode)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[..., 3, H, W]`` in [-1, 1] -> uint8 ``[..., H, W, 3]``: ``clamp(127.5 x + 128, 0, 255)`` (docs/puffin.md §6.2)."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).movedim(-3, -1).cpu()
