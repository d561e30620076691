"""Least-squares recovery of (roll, pitch, vfov) from a camera map: the inverse of :func:`camera_maps`.

Used to check stored or generated maps and, later, to evaluate the maps of generated images. The fit is a
Levenberg-Marquardt least-squares fit of the full forward model of docs/puffin.md §4 to a grid of sampled pixels, with the
field of view parametrised as t = log(tan(vfov/2)) so every iterate is a valid vfov. Pixels whose latitude is within
``SINGULAR_LATITUDE_MARGIN`` of +-pi/2 are left out: there the reference clamps the latitude and the up field is
undefined (zenith / nadir inside the image).
"""
import logging
import math
from typing import Tuple

import torch

from megatron_puffin.camera.maps import MAP_SCALE
from megatron_puffin.camera.types import HALF_PI, Camera

logger = logging.getLogger(__name__)

SINGULAR_LATITUDE_MARGIN = 0.01
"""Pixels with |latitude| > pi/2 - margin (radians) are excluded from the fit."""

UNIT_NORM_TOLERANCE = 1e-3
"""Pixels whose up vector is not unit length within this tolerance (e.g. zero padding) are excluded."""

MAX_FIT_POINTS = 1024
"""Default number of sampled pixels (a regular grid) used by the fit; the model has three parameters.

Kept below 2048, the grain at which PyTorch's vectorised unary ops (sqrt, sin, exp) go multi-threaded: the fit runs
hundreds of such small ops, and on a busy machine each OpenMP barrier can cost milliseconds.
"""

_NUM_FOV_CANDIDATES = 90
_MAX_ITERATIONS = 100
_FD_STEP = 1e-6


def _sample_grid(camera_map: torch.Tensor, max_points: int) -> Tuple[torch.Tensor, ...]:
    """Samples a regular pixel grid; returns float64 CPU vectors x - W/2, y - H/2, up_x, up_y, sin(lat)."""
    _, height, width = camera_map.shape
    side = max(2, int(math.isqrt(max_points)))
    rows = torch.linspace(0, height - 1, min(side, height)).round().long().unique()
    cols = torch.linspace(0, width - 1, min(side, width)).round().long().unique()
    grid = camera_map[:, rows][:, :, cols].detach().to("cpu", torch.float64)  # [3, h, w]
    ys, xs = torch.meshgrid(rows.double() - height / 2, cols.double() - width / 2, indexing="ij")
    up_x, up_y, latitude = grid.reshape(3, -1)
    valid = (latitude.abs() < HALF_PI - SINGULAR_LATITUDE_MARGIN) & (
        (torch.hypot(up_x, up_y) - 1).abs() < UNIT_NORM_TOLERANCE
    )
    return xs.reshape(-1)[valid], ys.reshape(-1)[valid], up_x[valid], up_y[valid], torch.sin(latitude[valid])


def _residuals(params: torch.Tensor, xs, ys, up_x, up_y, sin_lat, height: int) -> torch.Tensor:
    """Residual vector [3N] of the forward model at params = (roll, pitch, log tan(vfov/2))."""
    roll, pitch, log_tan_half_fov = params
    gravity_x = -torch.sin(roll) * torch.cos(pitch)
    gravity_y = -torch.cos(roll) * torch.cos(pitch)
    gravity_z = torch.sin(pitch)
    inv_focal = torch.exp(log_tan_half_fov) / (height / 2)
    u, v = xs * inv_focal, ys * inv_focal
    model_up_x = gravity_x - gravity_z * u
    model_up_y = gravity_y - gravity_z * v
    norm = torch.sqrt(model_up_x**2 + model_up_y**2).clamp_min(1e-12)
    model_sin_lat = (u * gravity_x + v * gravity_y + gravity_z) / torch.sqrt(u * u + v * v + 1)
    return torch.cat([model_up_x / norm - up_x, model_up_y / norm - up_y, model_sin_lat - sin_lat])


def _initial_params(camera_map: torch.Tensor, samples, height: int) -> torch.Tensor:
    """Roll and pitch from the up vector and latitude at the image centre, vfov by a coarse scan."""
    centre = camera_map[:, height // 2, camera_map.shape[2] // 2].detach().to("cpu", torch.float64)
    roll = torch.atan2(-centre[0], -centre[1]).clamp(-HALF_PI, HALF_PI)
    pitch = centre[2].clamp(-HALF_PI, HALF_PI)
    fovs = torch.linspace(math.radians(1.0), math.radians(179.0), _NUM_FOV_CANDIDATES, dtype=torch.float64)
    candidates = torch.log(torch.tan(fovs / 2))
    losses = [
        _residuals(torch.stack([roll, pitch, t]), *samples, height).square().sum() for t in candidates
    ]
    return torch.stack([roll, pitch, candidates[int(torch.stack(losses).argmin())]])


def _jacobian(residual_fn, params: torch.Tensor) -> torch.Tensor:
    """Central-difference Jacobian [3N, 3] in float64 (six cheap evaluations; autodiff costs far more here).

    Its ~1e-10 relative error only affects the convergence rate, not the optimum the iteration settles on.
    """
    columns = []
    for index in range(params.numel()):
        offset = torch.zeros_like(params)
        offset[index] = _FD_STEP
        columns.append((residual_fn(params + offset) - residual_fn(params - offset)) / (2 * _FD_STEP))
    return torch.stack(columns, dim=1)


def _levenberg_marquardt(params: torch.Tensor, samples, height: int) -> torch.Tensor:
    """Minimises the squared residuals over the three parameters; returns the optimum (float64 [3])."""

    def residual_fn(p: torch.Tensor) -> torch.Tensor:
        return _residuals(p, *samples, height)

    damping = 1e-3
    residual = residual_fn(params)
    loss = residual.square().sum()
    for _ in range(_MAX_ITERATIONS):
        jacobian = _jacobian(residual_fn, params)  # [3N, 3]
        normal = jacobian.T @ jacobian
        gradient = jacobian.T @ residual
        step = torch.linalg.solve(normal + damping * torch.diag(normal.diagonal() + 1e-12), -gradient)
        candidate = params + step
        candidate_residual = residual_fn(candidate)
        candidate_loss = candidate_residual.square().sum()
        if candidate_loss < loss:
            params, residual, loss = candidate, candidate_residual, candidate_loss
            damping = max(damping / 3, 1e-12)
            if step.abs().max() < 1e-10:
                break
        else:
            damping *= 4
            if damping > 1e8:
                break
    return params


def _canonical_angles(roll: float, pitch: float) -> Tuple[float, float]:
    """Maps fitted angles to the valid branch: (roll, pitch) and (roll + pi, pi - pitch) give the same gravity."""
    roll, pitch = math.remainder(roll, 2 * math.pi), math.remainder(pitch, 2 * math.pi)
    if abs(pitch) > HALF_PI:
        pitch = math.copysign(math.pi, pitch) - pitch
        roll = math.remainder(roll + math.pi, 2 * math.pi)
    return roll, pitch


def estimate_camera(camera_map: torch.Tensor, normalized: bool = False, max_points: int = MAX_FIT_POINTS) -> Camera:
    """Estimates the camera that produced a camera map (least squares over the forward model of docs/puffin.md §4).

    Args:
        camera_map: [3, H, W] map (up_x, up_y, latitude), any float dtype and device.
        normalized: True when the map was divided by pi/2 (the VAE-range map of §3.6).
        max_points: Number of pixels sampled on a regular grid for the fit.

    Returns:
        The fitted :class:`Camera` (no yaw). On maps produced by :func:`camera_map` the error is far below
        0.01 degrees.

    Raises:
        ValueError: If the map has the wrong shape, is not finite, has fewer than three usable pixels, or the fit
            ends outside the valid camera ranges.
    """
    if camera_map.dim() != 3 or camera_map.shape[0] != 3:
        raise ValueError(f"camera map must have shape [3, H, W], got {tuple(camera_map.shape)}")
    if not torch.isfinite(camera_map).all():
        raise ValueError("camera map contains non-finite values")
    if normalized:
        camera_map = camera_map * MAP_SCALE
    height = camera_map.shape[1]
    samples = _sample_grid(camera_map, max_points)
    if samples[0].numel() < 3:
        raise ValueError(
            f"camera map has {samples[0].numel()} usable pixels (unit up vector, |latitude| < pi/2 - "
            f"{SINGULAR_LATITUDE_MARGIN}); at least 3 are needed"
        )
    params = _levenberg_marquardt(_initial_params(camera_map, samples, height), samples, height)
    roll, pitch, log_tan_half_fov = params.tolist()
    roll, pitch = _canonical_angles(roll, pitch)
    camera = Camera(roll, pitch, 2 * math.atan(math.exp(log_tan_half_fov)))
    logger.debug("estimated camera %s from a %s map", camera, tuple(camera_map.shape))
    return camera
