"""The Camera value: validation with messages naming the value, immutability and helpers."""
import dataclasses
import math

import pytest

from megatron_puffin.camera import Camera, CameraError


def test_valid_camera_holds_floats():
    camera = Camera(0, -1, 1.2)
    assert (camera.roll, camera.pitch, camera.vfov, camera.yaw) == (0.0, -1.0, 1.2, None)
    assert isinstance(camera.roll, float)
    assert Camera(math.pi / 2, -math.pi / 2, 3.0, yaw=-7.0).yaw == -7.0  # limits inclusive, yaw unrestricted


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"roll": float("nan"), "pitch": 0, "vfov": 1}, "roll must be finite, got nan"),
        ({"roll": 0, "pitch": float("inf"), "vfov": 1}, "pitch must be finite, got inf"),
        ({"roll": 0, "pitch": 0, "vfov": 1, "yaw": float("-inf")}, "yaw must be finite"),
        ({"roll": 1.6, "pitch": 0, "vfov": 1}, r"roll \(1.6 rad\) must lie in \[-pi/2, pi/2\]"),
        ({"roll": 0, "pitch": -1.58, "vfov": 1}, r"pitch \(-1.58 rad\)"),
        ({"roll": 0, "pitch": 0, "vfov": 0.0}, r"vfov \(0.0 rad\) must lie in the open interval \(0, pi\)"),
        ({"roll": 0, "pitch": 0, "vfov": math.pi}, r"vfov \(3.14159"),
        ({"roll": 0, "pitch": 0, "vfov": -0.5}, r"vfov \(-0.5 rad\)"),
        ({"roll": "a", "pitch": 0, "vfov": 1}, "roll must be a real number of radians, got 'a'"),
    ],
)
def test_invalid_values_raise_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Camera(**kwargs)


def test_camera_is_frozen_and_hashable():
    camera = Camera(0.1, 0.2, 0.3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        camera.roll = 0.5
    assert {camera, Camera(0.1, 0.2, 0.3)} == {camera}


def test_helpers():
    camera = Camera(0.1, 0.2, math.pi / 2, yaw=math.pi)
    assert camera.values() == (0.1, 0.2, math.pi / 2)
    assert camera.focal_length(100) == pytest.approx(50.0)
    assert camera.degrees() == pytest.approx((math.degrees(0.1), math.degrees(0.2), 90.0, 180.0))
    assert camera.with_vfov(1.0) == Camera(0.1, 0.2, 1.0, yaw=math.pi)
    with pytest.raises(ValueError, match="vfov"):
        camera.with_vfov(4.0)


def test_camera_error_is_a_value_error():
    assert issubclass(CameraError, ValueError)
