"""Image decoding, validation and the 'dynamic' preprocessing of docs/puffin.md §3.5, on encoded bytes.

Images travel through the pipeline as encoded bytes (JPEG/PNG, as stored in the shards) and are decoded only in
the loader workers. Tensors handed to the model are float32 [3, H, W] in [-1, 1].
"""
import io
import logging
import re
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from megatron_puffin.camera.transforms import DYNAMIC_MAX_SIZE, DYNAMIC_UNIT, dynamic_size

logger = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 80
"""Images with width or height <= this are rejected (docs/puffin.md §3.5 step 1)."""
MIN_ASPECT, MAX_ASPECT = 0.1, 10.0
"""Images whose aspect w/h is outside the open interval (0.1, 10) are rejected (docs/puffin.md §3.5 step 1)."""
REENCODE_QUALITY = 95
"""JPEG quality used when preprocessing has to resize an image."""


class ImageError(ValueError):
    """An image is unusable; ``reason`` is a short machine-readable key (e.g. "image_unreadable")."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        return (ImageError, (self.reason, self.detail))


EXIF_ORIENTATION = 0x0112
"""The EXIF tag saying how a viewer must rotate / mirror the stored pixels (1: as stored)."""
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def decode_image(data: bytes) -> Image.Image:
    """Fully decodes encoded image bytes to an 8-bit RGB PIL image as a viewer shows it (a truncated file raises,
    it is not padded).

    * The EXIF orientation is applied (as ``transformers.image_utils.load_image`` does): a phone photo stored
      sideways with "rotate 90" in its EXIF is the upright picture its owner sees, whose roll, pitch and vertical
      field of view are the ones to learn or estimate. Images without the tag (every Puffin-4M render) are
      decoded as stored.
    * 16-bit grayscale (PNG / TIFF) is scaled to 8 bits; PIL's own ``convert("RGB")`` clips it at 255, which
      turns almost every such image white.

    Raises:
        ImageError: ``image_empty`` for zero bytes, ``image_unreadable`` for anything PIL cannot decode completely,
            ``image_unsupported`` for pixel formats without a faithful 8-bit reading (floating-point or 32-bit
            integer pixels).
    """
    if not data:
        raise ImageError("image_empty", "zero-byte image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if _orientation(image) != 1:
                image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except ImageError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        # PIL names the BytesIO it read ("<_io.BytesIO object at 0x7f...>"): an address, not the user's file
        detail = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", f"{type(error).__name__}: {error}")
        raise ImageError("image_unreadable", detail) from error


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8), 1 when absent or unreadable (a damaged EXIF block does not spoil the pixels)."""
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - PIL's EXIF parser raises anything from struct.error to SyntaxError
        return 1
    return orientation if orientation in range(1, 9) else 1


def _to_rgb(image: Image.Image) -> Image.Image:
    """An opened image's pixels as 8-bit RGB (see :func:`decode_image`)."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageError("image_unsupported", f"32-bit integer pixels (PIL mode {mode}, values "
                                                  f"{values.min()}..{values.max()}); save it as an 8-bit image")
        # 16-bit to 8-bit, rounded: 0 -> 0, 65535 -> 255
        eight_bit = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(eight_bit).convert("RGB")
    if mode == "F":
        raise ImageError("image_unsupported", "floating-point pixels (PIL mode F); save it as an 8-bit image")
    return image.convert("RGB")


def geometry_problem(width: int, height: int) -> Optional[Tuple[str, str]]:
    """(reason, detail) when an image of this size must be rejected per docs/puffin.md §3.5, else None."""
    if width <= MIN_IMAGE_SIDE or height <= MIN_IMAGE_SIDE:
        return "image_too_small", f"{width}x{height} has a side <= {MIN_IMAGE_SIDE} pixels"
    aspect = width / height
    if not MIN_ASPECT < aspect < MAX_ASPECT:
        return "image_bad_aspect", f"{width}x{height} has aspect {aspect:.3f} outside ({MIN_ASPECT}, {MAX_ASPECT})"
    return None


def limit_size(image: Image.Image, data: bytes, max_size: Optional[int]) -> bytes:
    """Returns ``data`` unchanged when the image fits ``max_size``, else a bicubic downscale re-encoded as JPEG.

    Args:
        image: The decoded image of ``data``.
        data: Its encoded bytes.
        max_size: Largest allowed side in pixels, or None for no limit.
    """
    if max_size is None or max(image.size) <= max_size:
        return data
    scale = max_size / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    buffer = io.BytesIO()
    image.resize(size, Image.BICUBIC).save(buffer, format="JPEG", quality=REENCODE_QUALITY)
    return buffer.getvalue()


def dynamic_resize_image(image: Image.Image, max_size: int = DYNAMIC_MAX_SIZE, unit: int = DYNAMIC_UNIT) -> Image.Image:
    """The 'dynamic' resize of docs/puffin.md §3.5 step 2 (bicubic; sides multiples of ``unit``, longest side <= max_size)."""
    width, height = dynamic_size(image.width, image.height, max_size, unit)
    if (width, height) == image.size:
        return image
    return image.resize((width, height), Image.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1] (x / 255 * 2 - 1, docs/puffin.md §3.5 step 3)."""
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float()
    return tensor.mul_(2.0 / 255.0).sub_(1.0)


def pad_to_square(image: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Pads [C, H, W] symmetrically (extra pixel bottom/right) to a square of the long side with ``fill``.

    Same placement as :func:`megatron_puffin.camera.transforms.pad_to_square` (which also returns a camera); this
    is the correct pad-to-square of the reference's intent (docs/puffin.md §3.5 step 4, §9.8), not its landscape crop.
    """
    height, width = image.shape[-2:]
    if height == width:
        return image
    if height > width:
        left = (height - width) // 2
        return F.pad(image, (left, height - width - left, 0, 0), value=fill)
    top = (width - height) // 2
    return F.pad(image, (0, 0, top, width - height - top), value=fill)


def load_dynamic(data: bytes, max_size: int = DYNAMIC_MAX_SIZE, unit: int = DYNAMIC_UNIT) -> torch.Tensor:
    """Decode + dynamic resize + to [-1, 1]: encoded bytes -> float32 [3, H, W], H and W multiples of ``unit``."""
    return to_tensor(dynamic_resize_image(decode_image(data), max_size, unit))
