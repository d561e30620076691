"""Geometry-consistent image transforms: every transform returns the image *and* the camera of the result.

Each function takes a PIL image or a tensor [C, H, W] plus the :class:`Camera` of that image, and returns
(transformed image of the same kind, Camera of the transformed image), so augmentation never desynchronises image and
camera. Geometry follows docs/puffin.md §4 (f = (H/2)/tan(vfov/2), principal point at (W/2, H/2)):

    * a crop keeps the focal length in pixels, so a crop to H' rows gives vfov' = 2 atan(tan(vfov/2) H'/H)
      (:func:`cropped_vfov`); only a centred crop keeps the principal point at the image centre;
    * a resize scales f with the rows, so vfov is unchanged. An aspect-changing resize (the 'dynamic' rounding to
      multiples of 32, §3.5) makes pixels non-square, which the pinhole model (fx = fy) cannot express: the vertical
      field is kept and the horizontal field is taken as implied by the new aspect, as the reference does;
    * padding adds pixels outside the original field, so vfov grows (same formula with H' > H). The camera map of
      the padded image (``camera_map(camera', H', W')``) continues the perspective field over the padded border:
      those pixels get the up vector and latitude of the rays they would see on a larger sensor, while the image
      there holds only the fill value.

A sub-pixel caveat: the reference principal point is (W/2, H/2), not ((W-1)/2, (H-1)/2) (docs/puffin.md §9.14). Crops with
an even size difference are exact; an odd difference and any resize shift the true principal point by a fraction
of a pixel relative to the convention.
"""
import logging
import math
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image

from megatron_puffin.camera.types import Camera

logger = logging.getLogger(__name__)

ImageLike = Union[Image.Image, torch.Tensor]
"""A PIL image, or a tensor [C, H, W] (float of any range, or uint8)."""

DYNAMIC_MAX_SIZE = 512
"""Longest side of the 'dynamic' resize (§3.5)."""

DYNAMIC_UNIT = 32
"""Both sides of the 'dynamic' resize are multiples of this (§3.5)."""


def image_size(image: ImageLike) -> Tuple[int, int]:
    """Returns (height, width) of a PIL image or a tensor [C, H, W]."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor):
        if image.dim() != 3:
            raise ValueError(f"image tensor must have shape [C, H, W], got {tuple(image.shape)}")
        return int(image.shape[1]), int(image.shape[2])
    raise TypeError(f"image must be a PIL.Image.Image or a torch.Tensor [C, H, W], got {type(image).__name__}")


def cropped_vfov(vfov: float, height: int, new_height: float) -> float:
    """Vertical field of view after changing the number of rows at a fixed focal length.

    Args:
        vfov: Field of view of the original image, radians.
        height: Original number of rows.
        new_height: Rows after cropping (smaller) or padding (larger).

    Returns:
        2 * atan(tan(vfov/2) * new_height / height), radians.
    """
    return 2 * math.atan(math.tan(vfov / 2) * new_height / height)


def _resize_tensor(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic, antialiased resize of [C, H, W] (PIL's bicubic filter), keeping the dtype."""
    work = image if image.is_floating_point() else image.float()
    resized = F.interpolate(work[None], size=(height, width), mode="bicubic", align_corners=False, antialias=True)[0]
    if image.is_floating_point():
        return resized.to(image.dtype)
    info = torch.iinfo(image.dtype)
    return resized.round().clamp(info.min, info.max).to(image.dtype)


def resize(image: ImageLike, camera: Camera, size: Tuple[int, int]) -> Tuple[ImageLike, Camera]:
    """Resizes to ``size`` = (height, width) with a bicubic filter; the camera is unchanged.

    Returns:
        (resized image of the same kind, the same camera). vfov is unchanged because the rows still span the same
        vertical angle; see the module docstring for aspect-changing resizes.
    """
    old_height, old_width = image_size(image)
    height, width = size
    if height <= 0 or width <= 0:
        raise ValueError(f"resize size must be positive (height, width), got {size!r}")
    stretch = (width / height) / (old_width / old_height)
    if abs(stretch - 1) > 1e-6:
        logger.debug(
            "resize %sx%s -> %sx%s stretches pixels horizontally by %.4f", old_height, old_width, height, width, stretch
        )
    if isinstance(image, Image.Image):
        return image.resize((width, height), Image.BICUBIC), camera
    return _resize_tensor(image, height, width), camera


def _crop_pixels(image: ImageLike, top: int, left: int, height: int, width: int) -> ImageLike:
    if isinstance(image, Image.Image):
        return image.crop((left, top, left + width, top + height))
    return image[:, top : top + height, left : left + width]


def crop(
    image: ImageLike,
    camera: Camera,
    top: int,
    left: int,
    height: int,
    width: int,
    allow_principal_point_shift: bool = False,
) -> Tuple[ImageLike, Camera]:
    """Crops the window [top, top + height) x [left, left + width); vfov shrinks with the rows.

    An off-centre window moves the principal point away from the new image centre; the :class:`Camera` (principal
    point fixed at the centre, docs/puffin.md §4) cannot express that, and the camera map of the returned camera would not
    match the crop of the original map.

    Args:
        image: PIL image or tensor [C, H, W].
        camera: Camera of ``image``.
        top: First row of the window.
        left: First column of the window.
        height: Rows of the window.
        width: Columns of the window.
        allow_principal_point_shift: Permit windows whose centre is more than half a pixel from the image centre;
            the shift is logged as a warning and the returned camera keeps roll and pitch.

    Returns:
        (cropped image, camera with vfov' = 2 atan(tan(vfov/2) height/H)).

    Raises:
        ValueError: If the window leaves the image, or is off-centre without ``allow_principal_point_shift``.
    """
    old_height, old_width = image_size(image)
    if height <= 0 or width <= 0 or top < 0 or left < 0 or top + height > old_height or left + width > old_width:
        raise ValueError(
            f"crop window (top={top}, left={left}, height={height}, width={width}) must lie inside the "
            f"{old_height}x{old_width} image"
        )
    shift_x = left + width / 2 - old_width / 2
    shift_y = top + height / 2 - old_height / 2
    if max(abs(shift_x), abs(shift_y)) > 0.5:
        if not allow_principal_point_shift:
            raise ValueError(
                f"crop window centre is ({shift_x:+.1f}, {shift_y:+.1f}) px from the image centre, which moves the "
                "principal point; use center_crop, or pass allow_principal_point_shift=True to accept a camera "
                "whose maps no longer match the crop"
            )
        logger.warning("off-centre crop moves the principal point by (%+.1f, %+.1f) px", shift_x, shift_y)
    new_camera = camera.with_vfov(cropped_vfov(camera.vfov, old_height, height))
    return _crop_pixels(image, top, left, height, width), new_camera


def center_crop(image: ImageLike, camera: Camera, size: Tuple[int, int]) -> Tuple[ImageLike, Camera]:
    """Crops the centred window of ``size`` = (height, width).

    The offsets are floor((H - height) / 2) and floor((W - width) / 2); for an odd size difference the window is
    half a pixel off-centre (see the module docstring). Camera maps of the result equal the crop of the original
    camera map when both differences are even.

    Returns:
        (cropped image, camera with vfov' = 2 atan(tan(vfov/2) height/H)).
    """
    old_height, old_width = image_size(image)
    height, width = size
    if not (0 < height <= old_height and 0 < width <= old_width):
        raise ValueError(f"center_crop size {size!r} must be positive and fit in the {old_height}x{old_width} image")
    return crop(image, camera, (old_height - height) // 2, (old_width - width) // 2, height, width)


def _pad_pixels(image: ImageLike, top: int, bottom: int, left: int, right: int, fill) -> ImageLike:
    """Pads (or, for negative amounts, crops) each side; ``fill`` is the value of new pixels."""
    if isinstance(image, torch.Tensor):
        return F.pad(image, (left, right, top, bottom), value=fill)
    height, width = image.height + top + bottom, image.width + left + right
    if min(top, bottom, left, right) < 0:
        return image.crop((-left, -top, image.width + right, image.height + bottom))
    canvas = Image.new(image.mode, (width, height), fill)
    canvas.paste(image, (left, top))
    return canvas


def pad_to_square(
    image: ImageLike, camera: Camera, fill: Union[int, float, tuple] = 0, reference_behaviour: bool = False
) -> Tuple[ImageLike, Camera]:
    """Pads the short side symmetrically (extra pixel at the bottom/right) to a square of the long side.

    A portrait image keeps its rows (vfov unchanged, the horizontal field grows); a landscape image gains rows, so
    vfov' = 2 atan(tan(vfov/2) W/H). Padded pixels hold ``fill`` (0 = black for PIL; 0 = grey for tensors in
    [-1, 1], the reference's pad value); their camera map values are explained in the module docstring.

    Args:
        image: PIL image or tensor [C, H, W].
        camera: Camera of ``image``.
        fill: Value of the padded pixels.
        reference_behaviour: Reproduce the reference ``pad_an_image_tensor`` (docs/puffin.md §3.5 step 4, §9.8): landscape
            images get negative top/bottom padding, i.e. are cropped to (2H - W) x W rows x columns (floor of the
            half difference on top; [inferred] for odd differences); the returned camera has the cropped vfov.
            Portrait and square images behave as without it.

    Returns:
        (square image, or the reference's cropped landscape image, camera of that image).

    Raises:
        ValueError: With ``reference_behaviour`` when W >= 2H (the reference would fail to pad there).
    """
    height, width = image_size(image)
    if height >= width:
        left = (height - width) // 2
        return _pad_pixels(image, 0, 0, left, height - width - left, fill), camera
    if reference_behaviour:
        if width >= 2 * height:
            raise ValueError(f"reference pad_to_square crops a {height}x{width} image to {2 * height - width} rows")
        top = (height - width) // 2  # negative: rows are removed
        new_camera = camera.with_vfov(cropped_vfov(camera.vfov, height, 2 * height - width))
        return _pad_pixels(image, top, height - width - top, 0, 0, fill), new_camera
    top = (width - height) // 2
    new_camera = camera.with_vfov(cropped_vfov(camera.vfov, height, width))
    return _pad_pixels(image, top, width - height - top, 0, 0, fill), new_camera


def dynamic_size(
    width: int, height: int, max_size: int = DYNAMIC_MAX_SIZE, unit: int = DYNAMIC_UNIT
) -> Tuple[int, int]:
    """Target (width, height) of the 'dynamic' resize (docs/puffin.md §3.5 step 2), same float arithmetic as the reference.

    If the longer side reaches ``max_size`` it becomes ``max_size`` and the other side is scaled and rounded up to a
    multiple of ``unit``; otherwise both sides are rounded up to multiples of ``unit``.
    """
    if width <= 0 or height <= 0 or max_size <= 0 or unit <= 0 or max_size % unit:
        raise ValueError(
            f"dynamic resize needs positive sizes and max_size ({max_size}) divisible by unit ({unit}); "
            f"got image {width}x{height}"
        )
    if width >= height and width >= max_size:
        return max_size, math.ceil(height * max_size / width / unit) * unit
    if height >= width and height >= max_size:
        return math.ceil(width * max_size / height / unit) * unit, max_size
    return math.ceil(width / unit) * unit, math.ceil(height / unit) * unit


def dynamic_resize(
    image: ImageLike, camera: Camera, max_size: int = DYNAMIC_MAX_SIZE, unit: int = DYNAMIC_UNIT
) -> Tuple[ImageLike, Camera]:
    """The reference 'dynamic' image resize (docs/puffin.md §3.5 step 2); the camera is unchanged (vfov kept).

    Returns:
        (image of :func:`dynamic_size`, same camera).
    """
    height, width = image_size(image)
    new_width, new_height = dynamic_size(width, height, max_size, unit)
    return resize(image, camera, (new_height, new_width))
