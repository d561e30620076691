"""A contact sheet: generated images in a grid, each labelled with its id and camera (degrees)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from megatron_puffin.camera import Camera

MIN_TILE = 300
"""Images smaller than this are enlarged (nearest neighbour) so the labels stay readable."""
LABEL_HEIGHT = 30
MARGIN = 4


def camera_label(camera: Camera) -> str:
    """``roll 5.7, pitch -11.5, vfov 57.3 deg`` (+ ``, yaw 90.0``)."""
    roll, pitch, vfov, *yaw = camera.degrees()
    label = f"roll {roll:.1f}, pitch {pitch:.1f}, vfov {vfov:.1f} deg"
    return label + (f", yaw {yaw[0] % 360:.1f}" if yaw else "")


def contact_sheet(images: Sequence[torch.Tensor], titles: Sequence[str], cameras: Sequence[Camera]) -> Image.Image:
    """A near-square grid of uint8 ``[H, W, 3]`` images with two label lines under each (title, camera)."""
    if not images:
        raise ValueError("a contact sheet needs at least one image")
    height, width = images[0].shape[:2]
    scale = max(1, math.ceil(MIN_TILE / max(height, width)))
    tile_w, tile_h = width * scale, height * scale
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w, cell_h = tile_w + 2 * MARGIN, tile_h + LABEL_HEIGHT + 2 * MARGIN
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (image, title, camera) in enumerate(zip(images, titles, cameras)):
        left, top = (index % columns) * cell_w + MARGIN, (index // columns) * cell_h + MARGIN
        tile = Image.fromarray(image.numpy()).resize((tile_w, tile_h), Image.NEAREST)
        sheet.paste(tile, (left, top))
        draw.text((left, top + tile_h + 2), title, fill="black")
        draw.text((left, top + tile_h + 15), camera_label(camera), fill="black")
    return sheet
