"""Photographic vocabulary for camera values, used to write thinking-style reasoning for synthetic data.

The reference keeps this mapping only inside its released thinking captions (docs/puffin.md §3.3); the thresholds below are
this project's documented choice. Each quantity is cut into named classes by the constants of this module (radians,
degrees in the docstrings); a value on a threshold falls into the stronger class.

Vocabulary (conventions of docs/puffin.md §4 and §3.10):
    * roll: "level" or "Dutch angle". Positive roll leans the world-up direction to the image left, i.e. the
      camera body is rotated clockwise as seen by the photographer and the horizon rises towards the right.
    * pitch: "eye-level", "low-angle" (camera tilted up, pitch > 0) or "high-angle" (tilted down), with a
      "slight"/"strong" tilt.
    * vertical field of view: "ultra-wide", "wide", "normal" or "telephoto". The 35 mm-equivalent focal length
      quoted below uses the 24 mm side of a full-frame sensor as the vertical side: f_eq = 12 mm / tan(vfov/2).
    * yaw (cross-view): "ahead", "left" (positive yaw), "behind" or "right".
"""
import logging
import math

from megatron_puffin.camera.types import Camera

logger = logging.getLogger(__name__)

LEVEL_ROLL_MAX = math.radians(3.0)
"""|roll| below 3 deg (0.0524 rad) reads as a level camera; at or above it the frame is a Dutch angle."""

STRONG_DUTCH_ROLL_MIN = math.radians(15.0)
"""|roll| at or above 15 deg (0.2618 rad) is a strong Dutch angle (clearly deliberate, not a careless hold)."""

EYE_LEVEL_PITCH_MAX = math.radians(5.0)
"""|pitch| below 5 deg (0.0873 rad) is an eye-level shot; above, low-angle (pitch > 0) or high-angle (< 0)."""

STRONG_TILT_PITCH_MIN = math.radians(20.0)
"""|pitch| at or above 20 deg (0.3491 rad) is a strong tilt (pronounced converging verticals)."""

ULTRA_WIDE_VFOV_MIN = math.radians(70.0)
"""vfov at or above 70 deg (1.2217 rad, about 17 mm full-frame equivalent) is ultra-wide."""

WIDE_VFOV_MIN = math.radians(45.0)
"""vfov in [45, 70) deg (0.7854 rad, about 29 mm equivalent and wider) is wide."""

NORMAL_VFOV_MIN = math.radians(25.0)
"""vfov in [25, 45) deg (0.4363 rad, about 54 mm to 29 mm equivalent) is normal; below 25 deg is telephoto."""

YAW_AHEAD_MAX = math.radians(45.0)
"""A target view whose yaw is within 45 deg of 0 (wrapped to (-180, 180]) still looks ahead."""

YAW_BEHIND_MIN = math.radians(135.0)
"""A target view whose |wrapped yaw| is at or above 135 deg looks behind; between, left (yaw > 0) or right."""


def roll_term(roll: float) -> str:
    """Returns "level", "slight Dutch angle" or "strong Dutch angle"."""
    if abs(roll) < LEVEL_ROLL_MAX:
        return "level"
    return "strong Dutch angle" if abs(roll) >= STRONG_DUTCH_ROLL_MIN else "slight Dutch angle"


def roll_direction(roll: float) -> str:
    """Describes the roll direction from the photographer's side, e.g. "rotated clockwise"."""
    if abs(roll) < LEVEL_ROLL_MAX:
        return "held level"
    return "rotated clockwise" if roll > 0 else "rotated counter-clockwise"


def pitch_term(pitch: float) -> str:
    """Returns "eye-level", "low-angle" (camera tilted up) or "high-angle" (camera tilted down)."""
    if abs(pitch) < EYE_LEVEL_PITCH_MAX:
        return "eye-level"
    return "low-angle" if pitch > 0 else "high-angle"


def tilt_term(pitch: float) -> str:
    """Returns "no tilt", "slight upward tilt", "strong downward tilt", etc."""
    if abs(pitch) < EYE_LEVEL_PITCH_MAX:
        return "no tilt"
    strength = "strong" if abs(pitch) >= STRONG_TILT_PITCH_MIN else "slight"
    return f"{strength} {'upward' if pitch > 0 else 'downward'} tilt"


def fov_term(vfov: float) -> str:
    """Returns "ultra-wide", "wide", "normal" or "telephoto"."""
    if vfov >= ULTRA_WIDE_VFOV_MIN:
        return "ultra-wide"
    if vfov >= WIDE_VFOV_MIN:
        return "wide"
    return "normal" if vfov >= NORMAL_VFOV_MIN else "telephoto"


def equivalent_focal_length_mm(vfov: float) -> float:
    """35 mm-equivalent focal length with the 24 mm sensor side vertical: 12 / tan(vfov/2)."""
    return 12.0 / math.tan(vfov / 2)


def wrap_yaw_signed(yaw: float) -> float:
    """Wraps a yaw to (-pi, pi]; positive turns left (docs/puffin.md §3.10)."""
    wrapped = math.remainder(yaw, 2 * math.pi)
    return math.pi if wrapped == -math.pi else wrapped


def yaw_term(yaw: float) -> str:
    """Returns "ahead", "left", "behind" or "right" (yaw 1.5710 is left, 3.1416 behind, 4.7120 right)."""
    signed = wrap_yaw_signed(yaw)
    if abs(signed) < YAW_AHEAD_MAX:
        return "ahead"
    if abs(signed) >= YAW_BEHIND_MIN:
        return "behind"
    return "left" if signed > 0 else "right"


def horizon_position(camera: Camera) -> float:
    """Where the horizon crosses the image's vertical centre line, as a fraction of the height from the top.

    Solves latitude = 0 at u = 0: v = tan(pitch) / cos(roll), so the fraction is 0.5 + v / (2 tan(vfov/2)). Values
    outside [0, 1] mean the horizon is out of frame (above it for < 0, below it for > 1).
    """
    offset = math.tan(camera.pitch) / max(math.cos(camera.roll), 1e-9)
    return 0.5 + offset / (2 * math.tan(camera.vfov / 2))


def describe_camera(camera: Camera) -> str:
    """One-sentence photographic description, e.g. "A level, eye-level shot with a wide lens (vertical field of
    view 60 deg, about 21 mm full-frame equivalent)." followed by the yaw direction for cross-view targets."""
    fov_deg = math.degrees(camera.vfov)
    roll_part = roll_term(camera.roll)
    if roll_part != "level":
        roll_part = f"{roll_part} ({roll_direction(camera.roll)} by {abs(math.degrees(camera.roll)):.0f} deg)"
    pitch_part = pitch_term(camera.pitch)
    if pitch_part != "eye-level":
        pitch_part = f"{pitch_part} ({tilt_term(camera.pitch)} of {abs(math.degrees(camera.pitch)):.0f} deg)"
    text = (
        f"A {roll_part}, {pitch_part} shot with a {fov_term(camera.vfov)} lens (vertical field of view "
        f"{fov_deg:.0f} deg, about {equivalent_focal_length_mm(camera.vfov):.0f} mm full-frame equivalent)."
    )
    if camera.yaw is not None:
        text += f" The view turns {yaw_term(camera.yaw)} by {abs(math.degrees(wrap_yaw_signed(camera.yaw))):.0f} deg."
    return text


def _roll_cue(camera: Camera) -> str:
    if roll_term(camera.roll) == "level":
        return (
            "Vertical structures stand upright and the horizon runs parallel to the frame edges, so the camera is "
            "level."
        )
    rising, leaning = ("right", "left") if camera.roll > 0 else ("left", "right")
    return (
        f"The horizon rises towards the {rising} and verticals lean to the {leaning}, a {roll_term(camera.roll)}: the "
        f"camera is {roll_direction(camera.roll)} by roughly {abs(math.degrees(camera.roll)):.0f} degrees."
    )


def _pitch_cue(camera: Camera) -> str:
    position = horizon_position(camera)
    if position < 0 or position > 1:
        where = "above the frame" if position < 0 else "below the frame"
    else:
        where = "in the upper part" if position < 0.5 else "in the lower part"
        where = "near the middle" if abs(position - 0.5) < 0.1 else where
    if pitch_term(camera.pitch) == "eye-level":
        return f"The horizon sits {where} of the image and verticals stay parallel: an eye-level view."
    converge = "upwards" if camera.pitch > 0 else "downwards"
    return (
        f"The horizon lies {where} of the image and vertical lines converge {converge}, a {pitch_term(camera.pitch)} "
        f"view with a {tilt_term(camera.pitch)} of roughly {abs(math.degrees(camera.pitch)):.0f} degrees."
    )


def _fov_cue(camera: Camera) -> str:
    term = fov_term(camera.vfov)
    cue = {
        "ultra-wide": "strong perspective stretching towards the edges and a very deep sense of space",
        "wide": "noticeable perspective depth with objects shrinking quickly with distance",
        "normal": "natural proportions close to human vision",
        "telephoto": "compressed depth with distant objects appearing close together",
    }[term]
    return (
        f"The image shows {cue}, typical of a {term} lens; the vertical field of view is about "
        f"{math.degrees(camera.vfov):.0f} degrees."
    )


def thinking_reasoning(camera: Camera, scene_description: str) -> str:
    """Writes thinking-style reasoning that derives the camera from visual cues, for synthetic thinking captions.

    Args:
        camera: The ground-truth camera; the reasoning is consistent with it (terms above, horizon position).
        scene_description: Short description of the scene, used as the opening observation.

    Returns:
        Several sentences of reasoning (no think/answer tags), to wrap with
        :func:`megatron_puffin.camera.language.format_thinking_caption`.
    """
    scene = scene_description.strip().rstrip(".")
    parts = [f"The scene shows {scene[0].lower() + scene[1:]}." if scene else "Looking at the scene."]
    parts += [_roll_cue(camera), _pitch_cue(camera), _fov_cue(camera)]
    if camera.yaw is not None:
        parts.append(f"The target view turns {yaw_term(camera.yaw)} relative to the initial view.")
    parts.append(f"Overall: {describe_camera(camera)}")
    return " ".join(parts)
