"""Procedural ray-cast scenes with known cameras, for the synthetic Puffin-4M dataset.

A scene is an infinite checkered ground plane (world z = 0, z up) under a sky gradient with a sun, plus a few
spheres and boxes standing on the ground. The camera stands at (0, 0, height) looking along a heading (azimuth,
counter-clockwise from +x seen from above) with the roll, pitch and vertical field of view of a
:class:`~megatron_puffin.camera.Camera`, using exactly the pinhole and gravity conventions of the camera maps
(docs/puffin.md §4): pixel (x, y) looks along u = (x - W/2)/f, v = (y - H/2)/f in a camera frame with +x right, +y down,
+z forward, and the world-up direction in that frame is (-sin r cos p, -cos r cos p, sin p). The rendered horizon
is therefore exactly where the camera map's latitude changes sign, which is what a camera estimator can learn.
A positive yaw deviation turns the heading left (counter-clockwise), as in docs/puffin.md §3.10.
"""
import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from megatron_puffin.camera import Camera

logger = logging.getLogger(__name__)

COLORS = {
    "red": (200, 40, 40), "orange": (230, 130, 30), "yellow": (225, 200, 40), "green": (50, 160, 60),
    "teal": (30, 150, 150), "blue": (40, 80, 200), "purple": (130, 60, 170), "pink": (230, 120, 170),
    "white": (235, 235, 235), "black": (30, 30, 30), "brown": (120, 80, 40), "grey": (130, 130, 130),
}
GROUND_PAIRS = (("grey", "white"), ("black", "white"), ("brown", "yellow"), ("green", "yellow"), ("teal", "white"),
                ("blue", "grey"), ("red", "white"))
SKIES = {  # name -> (horizon rgb, zenith rgb)
    "clear blue": ((190, 215, 240), (40, 100, 200)),
    "sunset orange": ((250, 170, 90), (70, 60, 130)),
    "overcast grey": ((200, 200, 205), (120, 125, 135)),
    "pale morning": ((235, 225, 210), (120, 160, 215)),
}
FOG_DISTANCE = 45.0
"""Metres over which far ground fades into a haze colour (darker than the sky, so the horizon stays visible)."""


@dataclass(frozen=True)
class SceneObject:
    """A sphere (``size`` = (radius,)) or an axis-aligned box (``size`` = half extents x, y, z) on the ground."""

    kind: str
    center: Tuple[float, float, float]
    size: Tuple[float, ...]
    color: str

    @property
    def name(self) -> str:
        if self.kind == "sphere":
            return f"{self.color} sphere"
        tall = self.size[2] > 1.5 * max(self.size[0], self.size[1])
        return f"{'tall ' if tall else ''}{self.color} {'tower' if tall else 'box'}"


@dataclass(frozen=True)
class Scene:
    """Everything needed to render any view of one procedural scene."""

    ground: Tuple[str, str]
    checker_size: float
    sky: str
    sun_direction: Tuple[float, float, float]
    objects: Tuple[SceneObject, ...]
    camera_height: float


def _sample_object(rng: np.random.Generator, azimuth: float) -> SceneObject:
    distance = rng.uniform(3.0, 12.0)
    x, y = distance * math.cos(azimuth), distance * math.sin(azimuth)
    color = str(rng.choice(list(COLORS)))
    if rng.random() < 0.5:
        radius = rng.uniform(0.3, 1.2)
        return SceneObject("sphere", (x, y, radius), (radius,), color)
    half = (rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0), rng.uniform(0.3, 2.0))
    return SceneObject("box", (x, y, half[2]), half, color)


def sample_scene(rng: np.random.Generator, heading: float, num_objects: Optional[int] = None) -> Scene:
    """Draws a scene; the first object stands roughly in front of ``heading`` so a main view usually sees it."""
    count = int(rng.integers(1, 5)) if num_objects is None else num_objects
    azimuths = [heading + rng.uniform(-0.35, 0.35)] + [rng.uniform(0, 2 * math.pi) for _ in range(count - 1)]
    sun_azimuth, sun_elevation = rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 1.2)
    sun = (math.cos(sun_elevation) * math.cos(sun_azimuth), math.cos(sun_elevation) * math.sin(sun_azimuth),
           math.sin(sun_elevation))
    pair = GROUND_PAIRS[int(rng.integers(len(GROUND_PAIRS)))]
    return Scene(
        ground=pair,
        checker_size=float(rng.uniform(0.6, 2.0)),
        sky=str(rng.choice(list(SKIES))),
        sun_direction=sun,
        objects=tuple(_sample_object(rng, azimuth) for azimuth in azimuths),
        camera_height=float(rng.uniform(1.0, 2.0)),
    )


def camera_axes(camera: Camera, heading: float) -> np.ndarray:
    """World directions of the camera axes: rows (right, down, forward), float64 [3, 3].

    Built so that world up (0, 0, 1) expressed in camera coordinates is (-sin r cos p, -cos r cos p, sin p).
    """
    cp, sp = math.cos(camera.pitch), math.sin(camera.pitch)
    forward = np.array([cp * math.cos(heading), cp * math.sin(heading), sp])
    right0 = np.array([math.sin(heading), -math.cos(heading), 0.0])
    down0 = np.cross(forward, right0)
    cr, sr = math.cos(camera.roll), math.sin(camera.roll)
    return np.stack([cr * right0 + sr * down0, -sr * right0 + cr * down0, forward])


def _ray_directions(camera: Camera, heading: float, height: int, width: int, supersample: int) -> np.ndarray:
    """World ray directions [H*s, W*s, 3] (not normalised) at sub-pixel centres around each pixel position."""
    focal = camera.focal_length(height)
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    xs = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1) - width / 2
    ys = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1) - height / 2
    u, v = np.meshgrid(xs / focal, ys / focal)
    axes = camera_axes(camera, heading)
    return u[..., None] * axes[0] + v[..., None] * axes[1] + axes[2]


def _bounding_candidates(origin: np.ndarray, dirs: np.ndarray, dirs_sq: np.ndarray, obj: SceneObject) -> np.ndarray:
    """Indices of rays that hit the object's bounding sphere in front of the camera (cheap pre-test)."""
    radius = obj.size[0] if obj.kind == "sphere" else float(np.linalg.norm(obj.size))
    offset = origin - np.asarray(obj.center)
    b = dirs @ offset
    c = offset @ offset - radius * radius
    return np.nonzero((b * b - dirs_sq * c >= 0) & (b < 0))[0]


def _hit_sphere(origin, dirs, obj: SceneObject):
    """Ray parameter t of the first hit (inf when missed) and unit normals, for rays ``dirs`` [N, 3]."""
    offset = origin - np.asarray(obj.center)
    a = np.einsum("ij,ij->i", dirs, dirs)
    b = dirs @ offset
    c = offset @ offset - obj.size[0] ** 2
    disc = b * b - a * c
    t = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / a, np.inf)
    return np.where(t > 1e-6, t, np.inf)


def _hit_box(origin, dirs, obj: SceneObject):
    """Slab test: ray parameter t of the entry point (inf when missed), for rays ``dirs`` [N, 3]."""
    low = np.asarray(obj.center) - np.asarray(obj.size)
    high = np.asarray(obj.center) + np.asarray(obj.size)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (low - origin) / dirs, (high - origin) / dirs
    near = np.nan_to_num(np.minimum(t1, t2), nan=-np.inf)
    far = np.nan_to_num(np.maximum(t1, t2), nan=np.inf)
    t_near, t_far = near.max(axis=-1), far.min(axis=-1)
    return np.where((t_far >= t_near) & (t_near > 1e-6), t_near, np.inf)


def _normals(obj: SceneObject, points: np.ndarray) -> np.ndarray:
    """Outward unit normals at surface points [N, 3] of an object."""
    local = points - np.asarray(obj.center)
    if obj.kind == "sphere":
        return local / obj.size[0]
    scaled = np.abs(local) / np.asarray(obj.size)
    axis = scaled.argmax(axis=-1)
    normals = np.zeros_like(points)
    normals[np.arange(len(points)), axis] = np.sign(local[np.arange(len(points)), axis])
    return normals


def _sky(scene: Scene, unit_dirs: np.ndarray) -> np.ndarray:
    horizon, zenith = (np.asarray(c, dtype=np.float64) for c in SKIES[scene.sky])
    elevation = np.clip(unit_dirs[..., 2], 0, 1)[..., None]
    color = horizon + (zenith - horizon) * np.sqrt(elevation)
    glow = np.clip(unit_dirs @ np.asarray(scene.sun_direction), 0, 1)[..., None] ** 64
    return color + (255 - color) * glow


def _lambert(normals: np.ndarray, scene: Scene, ambient: float) -> np.ndarray:
    light = np.clip(normals @ np.asarray(scene.sun_direction), 0, 1)[..., None]
    return ambient + (1 - ambient) * light


def _closest_hits(scene: Scene, origin: np.ndarray, dirs: np.ndarray):
    """(t of the closest surface, id of the object hit: -1 ground or sky) per ray."""
    with np.errstate(divide="ignore"):
        best = np.where(dirs[:, 2] < 0, -origin[2] / dirs[:, 2], np.inf)
    owner = np.full(len(dirs), -1, dtype=np.int64)
    dirs_sq = np.einsum("ij,ij->i", dirs, dirs)
    for index, obj in enumerate(scene.objects):
        rays = _bounding_candidates(origin, dirs, dirs_sq, obj)
        if rays.size == 0:
            continue
        t = (_hit_sphere if obj.kind == "sphere" else _hit_box)(origin, dirs[rays], obj)
        closer = t < best[rays]
        best[rays[closer]] = t[closer]
        owner[rays[closer]] = index
    return best, owner


def render(scene: Scene, camera: Camera, heading: float, height: int, width: int, supersample: int = 2) -> np.ndarray:
    """Ray-casts one view.

    Args:
        scene: The scene.
        camera: Roll, pitch, vfov of the view (yaw ignored: ``heading`` is the absolute azimuth).
        heading: Azimuth of the optical axis, radians (counter-clockwise from +x seen from above).
        height: Image rows.
        width: Image columns.
        supersample: Rays per pixel side (antialiasing).

    Returns:
        uint8 array [H, W, 3].
    """
    dirs = _ray_directions(camera, heading, height, width, supersample).reshape(-1, 3)
    origin = np.array([0.0, 0.0, scene.camera_height])
    norms = np.linalg.norm(dirs, axis=-1)
    image = _sky(scene, dirs / norms[:, None])
    best, owner = _closest_hits(scene, origin, dirs)
    ground = np.nonzero(np.isfinite(best) & (owner < 0))[0]
    points = origin + best[ground, None] * dirs[ground]
    checker = (np.floor(points[:, 0] / scene.checker_size) + np.floor(points[:, 1] / scene.checker_size)) % 2
    colors = np.asarray([COLORS[scene.ground[0]], COLORS[scene.ground[1]]], dtype=np.float64)
    image[ground] = colors[checker.astype(np.int64)] * _lambert(np.array([0.0, 0.0, 1.0]), scene, 0.55)
    for index, obj in enumerate(scene.objects):
        rays = np.nonzero(owner == index)[0]
        if rays.size:
            normals = _normals(obj, origin + best[rays, None] * dirs[rays])
            image[rays] = np.asarray(COLORS[obj.color], dtype=np.float64) * _lambert(normals, scene, 0.3)
    hit = np.nonzero(np.isfinite(best))[0]
    haze = 0.5 * colors.mean(axis=0) + 0.4 * np.asarray(SKIES[scene.sky][0])
    fog = (1 - np.exp(-best[hit] * norms[hit] / FOG_DISTANCE))[:, None]
    image[hit] = image[hit] * (1 - fog) + haze * fog
    image = image.reshape(height, supersample, width, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def visible_objects(scene: Scene, camera: Camera, heading: float, height: int, width: int) -> List[Tuple[SceneObject, str, str]]:
    """Objects whose centre projects inside the view, with a horizontal position and a distance word."""
    axes = camera_axes(camera, heading)
    origin = np.array([0.0, 0.0, scene.camera_height])
    focal = camera.focal_length(height)
    seen = []
    for obj in scene.objects:
        local = axes @ (np.asarray(obj.center) - origin)
        if local[2] <= 0.1:
            continue
        x, y = focal * local[0] / local[2] + width / 2, focal * local[1] / local[2] + height / 2
        if not (0 <= x < width and 0 <= y < height):
            continue
        side = "on the left" if x < width / 3 else ("on the right" if x > 2 * width / 3 else "in the center")
        distance = float(np.linalg.norm(local))
        depth = "in the foreground" if distance < 6 else ("in the middle distance" if distance < 10 else "in the distance")
        seen.append((obj, side, depth))
    return seen


def describe_view(scene: Scene, seen: List[Tuple[SceneObject, str, str]]) -> str:
    """Scene description of one view (no camera values), e.g. "A red sphere on the left in the foreground ..."."""
    ground = f"a {scene.ground[0]} and {scene.ground[1]} checkered ground"
    sky = f"a {scene.sky} sky"
    if not seen:
        return f"An open plain of {ground} stretches under {sky}, with no objects in view."
    parts = [f"a {obj.name} {side} {depth}" for obj, side, depth in seen]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed[0].upper() + listed[1:]} {'stands' if len(parts) == 1 else 'stand'} on {ground} under {sky}."
