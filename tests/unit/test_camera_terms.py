"""Photographic terms: thresholds, directions consistent with the camera maps, and generated reasoning."""
import math

import pytest

from megatron_puffin.camera import Camera, camera_map, describe_camera, format_thinking_caption, split_thinking_caption
from megatron_puffin.camera import terms


@pytest.mark.parametrize(
    "roll,expected",
    [(0.0, "level"), (-0.05, "level"), (terms.LEVEL_ROLL_MAX, "slight Dutch angle"), (-0.2, "slight Dutch angle"),
     (terms.STRONG_DUTCH_ROLL_MIN, "strong Dutch angle"), (-0.7, "strong Dutch angle")],
)
def test_roll_terms(roll, expected):
    assert terms.roll_term(roll) == expected


@pytest.mark.parametrize(
    "pitch,angle,tilt",
    [
        (0.0, "eye-level", "no tilt"),
        (0.1, "low-angle", "slight upward tilt"),
        (-0.1, "high-angle", "slight downward tilt"),
        (terms.STRONG_TILT_PITCH_MIN, "low-angle", "strong upward tilt"),
        (-0.7, "high-angle", "strong downward tilt"),
    ],
)
def test_pitch_terms(pitch, angle, tilt):
    assert (terms.pitch_term(pitch), terms.tilt_term(pitch)) == (angle, tilt)


@pytest.mark.parametrize(
    "degrees,expected",
    [
        (20, "telephoto"),
        (25, "normal"),
        (44.9, "normal"),
        (45, "wide"),
        (69.9, "wide"),
        (70, "ultra-wide"),
        (105, "ultra-wide"),
    ],
)
def test_fov_terms(degrees, expected):
    assert terms.fov_term(math.radians(degrees)) == expected


def test_fov_thresholds_are_ordered_and_focal_lengths_documented():
    assert terms.NORMAL_VFOV_MIN < terms.WIDE_VFOV_MIN < terms.ULTRA_WIDE_VFOV_MIN
    assert terms.equivalent_focal_length_mm(math.radians(70)) == pytest.approx(17.14, abs=0.01)
    assert terms.equivalent_focal_length_mm(math.radians(25)) == pytest.approx(54.12, abs=0.01)


@pytest.mark.parametrize(
    "yaw,expected",
    [(0.0, "ahead"), (1.5710, "left"), (3.1416, "behind"), (4.7120, "right"), (6.0, "ahead"), (-1.5708, "right"),
     (math.radians(135), "behind"), (math.radians(-134), "right")],
)
def test_yaw_terms_follow_cross_view_convention(yaw, expected):
    assert terms.yaw_term(yaw) == expected


def test_roll_direction_agrees_with_the_camera_map():
    # Positive roll leans the up vector at the centre to the image left (docs/puffin.md §4): the horizon rises to the right.
    up_x = camera_map(0.3, 0.0, 1.0, 32, 32)[0, 16, 16].item()
    assert up_x < 0 and terms.roll_direction(0.3) == "rotated clockwise"
    assert terms.roll_direction(-0.3) == "rotated counter-clockwise" and terms.roll_direction(0.0) == "held level"


@pytest.mark.parametrize("camera", [Camera(0.0, 0.2, 1.0), Camera(0.4, -0.2, 0.9), Camera(-0.2, 0.05, 1.7)])
def test_horizon_position_matches_zero_latitude_in_the_map(camera):
    height = 64
    latitude = camera_map(*camera.values(), height, height)[2, :, height // 2]
    crossing = int((latitude > 0).sum())  # rows above the horizon on the centre column
    assert 0 < terms.horizon_position(camera) < 1
    assert abs(terms.horizon_position(camera) * height - crossing) <= 1.0


def test_horizon_outside_the_frame():
    looking_down = Camera(0.4, -0.3, 0.6)
    assert terms.horizon_position(looking_down) < 0
    assert (camera_map(*looking_down.values(), 64, 64)[2, :, 32] < 0).all()  # centre column below the horizon
    assert "above the frame" in terms.thinking_reasoning(looking_down, "A street.")


def test_describe_camera():
    text = describe_camera(Camera(0.3, -0.4, math.radians(60), yaw=math.pi / 2))
    assert text.startswith("A strong Dutch angle (rotated clockwise by 17 deg), high-angle (strong downward tilt")
    assert "wide lens (vertical field of view 60 deg" in text and text.endswith("The view turns left by 90 deg.")
    assert describe_camera(Camera(0.0, 0.0, 0.3)).startswith("A level, eye-level shot with a telephoto lens")


def test_thinking_reasoning_is_consistent_and_round_trips():
    camera = Camera(-0.3, 0.35, 1.5)
    reasoning = terms.thinking_reasoning(camera, "A lighthouse on a cliff.")
    assert reasoning.startswith("The scene shows a lighthouse on a cliff.")
    assert "horizon rises towards the left" in reasoning and "converge upwards" in reasoning
    assert "ultra-wide lens" in reasoning and "lower part" in reasoning
    assert split_thinking_caption(format_thinking_caption(reasoning, camera)) == (reasoning, camera)
    level = terms.thinking_reasoning(Camera(0.0, 0.0, 0.5), "")
    assert "camera is level" in level and "eye-level view" in level and "normal lens" in level
