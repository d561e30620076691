"""Pixel-wise camera maps (the perspective field of docs/puffin.md §4), computed analytically on any device.

The reference stores one 3 MB ``.pt`` file per sample holding this map; it only depends on (roll, pitch, vfov),
so here it is computed on the fly, for one camera or for a batch at once.

Conventions (docs/puffin.md §4, generalised to non-square images):
    * focal length f = (H/2) / tan(vfov/2) in pixels, the same for x and y;
    * principal point c = (W/2, H/2) (not ((W-1)/2, (H-1)/2));
    * pixel grid x = 0..W-1 (columns, right), y = 0..H-1 (rows, down); u = (x - W/2)/f, v = (y - H/2)/f;
    * world-up in the camera frame g = (-sin r cos p, -cos r cos p, sin p);
    * up field: U = (g_x - g_z u, g_y - g_z v), up = U / max(|U|, 1e-12);
    * latitude: lat = asin(clamp(d . g, -1 + 1e-6, 1 - 1e-6)) with d = (u, v, 1)/|(u, v, 1)|;
    * map = [up_x, up_y, lat] (float32, channel order as here); model input = map / (pi/2) (docs/puffin.md §3.6).
"""
import logging
import math
from typing import Optional, Sequence, Union

import torch

from megatron_puffin.camera.types import Camera

logger = logging.getLogger(__name__)

UP_NORM_EPS = 1e-12
"""Epsilon of the up-field normalisation (``F.normalize`` default in the reference)."""

LATITUDE_CLAMP_EPS = 1e-6
"""The ray-gravity cosine is clamped to [-1 + eps, 1 - eps] before ``asin`` (reference value)."""

MAP_SCALE = math.pi / 2
"""A camera map is divided by this before it enters the VAE (docs/puffin.md §3.6)."""

CPU_CHUNK_PIXELS = 1 << 18
"""On CPU, maps are filled a few cameras at a time, about this many pixels per step (cache-sized intermediates)."""

CamerasLike = Union[Camera, Sequence[Camera], torch.Tensor]


def _check_size(height: int, width: int) -> None:
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"camera map {name} must be a positive int, got {size!r}")


def _camera_params(cameras: CamerasLike, device: Optional[torch.device]) -> torch.Tensor:
    """Turns cameras into a float32 tensor [B, 3] of (roll, pitch, vfov) on the target device."""
    if isinstance(cameras, torch.Tensor):
        if cameras.dim() != 2 or cameras.shape[1] != 3:
            raise ValueError(f"camera tensor must have shape [B, 3] = (roll, pitch, vfov), got {tuple(cameras.shape)}")
        target = cameras.device if device is None else device
        return cameras.to(device=target, dtype=torch.float32)
    if isinstance(cameras, Camera):
        cameras = [cameras]
    rows = []
    for index, camera in enumerate(cameras):
        if not isinstance(camera, Camera):
            raise TypeError(f"cameras[{index}] must be a Camera, got {type(camera).__name__}")
        rows.append(camera.values())
    if not rows:
        raise ValueError("camera_maps needs at least one camera")
    return torch.tensor(rows, dtype=torch.float32, device=device)


def camera_maps(
    cameras: CamerasLike,
    height: int,
    width: int,
    device: Optional[Union[str, torch.device]] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Computes the camera maps of many cameras at once (vectorised over cameras and pixels).

    Args:
        cameras: A :class:`Camera`, a sequence of cameras, or a tensor [B, 3] of (roll, pitch, vfov) radians. Tensor
            values are not validated (that would need a host sync); build :class:`Camera` values for validation.
        height: Map height H in pixels.
        width: Map width W in pixels.
        device: Device of the result; defaults to the device of ``out``, else of a tensor input, else CPU.
        out: Optional float32 tensor [B, 3, H, W] to write into. Reusing one buffer avoids allocating fresh
            memory per call, which on CPU costs more than computing the maps.

    Returns:
        float32 tensor [B, 3, H, W] (``out`` when given): channels (up_x, up_y, latitude in radians), see the module
        docstring.
    """
    _check_size(height, width)
    if device is None and out is not None:
        device = out.device
    params = _camera_params(cameras, None if device is None else torch.device(device))
    u, v, gravity = _rays_and_gravity(params, height, width)
    maps = _output_buffer(out, params, height, width)
    # On CPU, a few cameras at a time keep the intermediates in cache; accelerators take the whole batch at once.
    chunk = max(1, CPU_CHUNK_PIXELS // (height * width)) if params.device.type == "cpu" else params.shape[0]
    for start in range(0, params.shape[0], chunk):
        rows = slice(start, start + chunk)
        _fill_maps(maps[rows], u[rows], v[rows], tuple(component[rows] for component in gravity))
    return maps


def _rays_and_gravity(params: torch.Tensor, height: int, width: int):
    """Normalised pixel coordinates u [B, 1, W], v [B, H, 1] and gravity components (g_x, g_y, g_z), each [B, 1, 1]."""
    roll, pitch, vfov = (params[:, i].view(-1, 1, 1) for i in range(3))
    gravity = (-torch.sin(roll) * torch.cos(pitch), -torch.cos(roll) * torch.cos(pitch), torch.sin(pitch))
    inv_focal = torch.tan(vfov / 2) / (height / 2)  # 1 / f, [B, 1, 1]
    xs = torch.arange(width, device=params.device, dtype=torch.float32) - width / 2
    ys = torch.arange(height, device=params.device, dtype=torch.float32) - height / 2
    return xs.view(1, 1, width) * inv_focal, ys.view(1, height, 1) * inv_focal, gravity


def _output_buffer(out: Optional[torch.Tensor], params: torch.Tensor, height: int, width: int) -> torch.Tensor:
    shape = (params.shape[0], 3, height, width)
    if out is None:
        return torch.empty(shape, device=params.device, dtype=torch.float32)
    if tuple(out.shape) != shape or out.dtype != torch.float32 or out.device != params.device:
        raise ValueError(
            f"out must be a float32 tensor of shape {list(shape)} on {params.device}, got {out.dtype} "
            f"{list(out.shape)} on {out.device}"
        )
    return out


def _fill_maps(maps: torch.Tensor, u: torch.Tensor, v: torch.Tensor, gravity: tuple) -> None:
    """Writes the up field and latitude into ``maps`` [B, 3, H, W] from u [B, 1, W], v [B, H, 1], g_* [B, 1, 1].

    In-place and separable where possible: the map is memory-bound, so every full-size pass counts.
    """
    gravity_x, gravity_y, gravity_z = gravity
    up_x = gravity_x - gravity_z * u  # [B, 1, W]
    up_y = gravity_y - gravity_z * v  # [B, H, 1]
    scale = up_x * up_x + up_y * up_y  # [B, H, W], reused below
    scale.clamp_min_(UP_NORM_EPS * UP_NORM_EPS).rsqrt_()  # 1 / max(|U|, eps)
    torch.mul(up_x, scale, out=maps[:, 0])
    torch.mul(up_y, scale, out=maps[:, 1])
    torch.add(u * u, v * v + 1, out=scale).rsqrt_()  # 1 / |(u, v, 1)|
    latitude = maps[:, 2]
    torch.add(u * gravity_x, v * gravity_y + gravity_z, out=latitude).mul_(scale)  # d . g
    latitude.clamp_(-1 + LATITUDE_CLAMP_EPS, 1 - LATITUDE_CLAMP_EPS).asin_()


def camera_map(roll: float, pitch: float, vfov: float, height: int, width: int) -> torch.Tensor:
    """Computes the camera map of one camera (docs/puffin.md §4), validating the camera first.

    Args:
        roll: Roll in radians, [-pi/2, pi/2].
        pitch: Pitch in radians, [-pi/2, pi/2].
        vfov: Vertical field of view in radians, (0, pi).
        height: Map height H in pixels.
        width: Map width W in pixels.

    Returns:
        float32 CPU tensor [3, H, W]: (up_x, up_y, latitude in radians).

    Raises:
        ValueError: On an invalid camera or size.
    """
    return camera_maps(Camera(roll, pitch, vfov), height, width)[0]


def normalize_camera_map(camera_map_tensor: torch.Tensor) -> torch.Tensor:
    """Scales a camera map to the VAE input range: map / (pi/2) (docs/puffin.md §3.6).

    Args:
        camera_map_tensor: [..., 3, H, W] map in radians / unit vectors.

    Returns:
        Tensor of the same shape and dtype: up components in [-2/pi, 2/pi], latitude / (pi/2) in (-1, 1).
    """
    return camera_map_tensor / MAP_SCALE


def denormalize_camera_map(normalized_map: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_camera_map`: returns normalized_map * (pi/2), same shape and dtype."""
    return normalized_map * MAP_SCALE
