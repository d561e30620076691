"""The camera value shared by the data pipeline, the model conditioning and evaluation.

A :class:`Camera` is the pinhole camera of Puffin (docs/puffin.md §3.3, §4): roll, pitch and vertical field of view in
radians, plus an optional yaw used only by cross-view targets (§3.10). It is validated on construction so an
invalid camera can never reach a caption, a camera map or a metric.
"""
import logging
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

logger = logging.getLogger(__name__)

HALF_PI = math.pi / 2
"""Largest allowed |roll| and |pitch| (inclusive), radians."""


class CameraError(ValueError):
    """A camera text or value could not be turned into a valid :class:`Camera`.

    Raised by the strict parsers of :mod:`megatron_puffin.camera.language`; the message quotes the offending text.
    """


class CameraValues(NamedTuple):
    """Unvalidated (roll, pitch, vfov) in radians, e.g. read from model output by the tolerant parser.

    Model predictions may lie outside the valid camera ranges (a model can answer a pitch of 2.1 rad); evaluation
    must still score them, so they are carried in this plain tuple instead of a validated :class:`Camera`.
    """

    roll: float
    pitch: float
    vfov: float


def _as_float(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"camera {name} must be a real number of radians, got {value!r}") from error
    if not math.isfinite(number):
        raise ValueError(f"camera {name} must be finite, got {value!r}")
    return number


@dataclass(frozen=True)
class Camera:
    """A pinhole camera without distortion, angles in radians.

    Conventions are those of docs/puffin.md §4 (GeoCalib): positive pitch tilts the optical axis above the horizon (the
    latitude at the principal point equals the pitch); positive roll leans the world-up vector at the image centre
    to the image left, i.e. the camera body is rotated clockwise as seen by the photographer.

    Attributes:
        roll: Rotation about the optical axis, in [-pi/2, pi/2].
        pitch: Elevation of the optical axis above the horizon, in [-pi/2, pi/2].
        vfov: Vertical field of view, in the open interval (0, pi).
        yaw: Azimuth deviation of a cross-view target from the initial view (positive turns left, §3.10), any
            finite value; ``None`` when the camera is not a cross-view target. Yaw is carried only by text: camera
            maps ignore it. Captions render it wrapped to [0, 2*pi).

    Raises:
        ValueError: On a non-finite value or a value outside the ranges above; the message names the field, the
            value and the allowed range.
    """

    roll: float
    pitch: float
    vfov: float
    yaw: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("roll", "pitch", "vfov"):
            object.__setattr__(self, name, _as_float(name, getattr(self, name)))
        if self.yaw is not None:
            object.__setattr__(self, "yaw", _as_float("yaw", self.yaw))
        for name in ("roll", "pitch"):
            value = getattr(self, name)
            if abs(value) > HALF_PI:
                raise ValueError(f"camera {name} ({value!r} rad) must lie in [-pi/2, pi/2] = [-1.5708, 1.5708]")
        if not 0.0 < self.vfov < math.pi:
            raise ValueError(f"camera vfov ({self.vfov!r} rad) must lie in the open interval (0, pi) = (0, 3.1416)")

    def values(self) -> CameraValues:
        """Returns (roll, pitch, vfov), dropping the yaw."""
        return CameraValues(self.roll, self.pitch, self.vfov)

    def with_vfov(self, vfov: float) -> "Camera":
        """Returns a copy with another vertical field of view (validated)."""
        return Camera(self.roll, self.pitch, vfov, self.yaw)

    def focal_length(self, height: int) -> float:
        """Focal length in pixels for an image of ``height`` rows: f = (H/2) / tan(vfov/2) (docs/puffin.md §4)."""
        return (height / 2) / math.tan(self.vfov / 2)

    def degrees(self) -> Tuple[float, ...]:
        """Returns (roll, pitch, vfov[, yaw]) in degrees, for logs and human-readable reports."""
        angles = self.values() if self.yaw is None else (*self.values(), self.yaw)
        return tuple(math.degrees(angle) for angle in angles)
