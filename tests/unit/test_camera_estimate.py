"""Least-squares camera estimation from camera maps: map -> camera -> map round trips within 0.01 degrees."""
import math

import numpy as np
import pytest
import torch

from megatron_puffin.camera import Camera, camera_map, estimate_camera, normalize_camera_map

TOLERANCE_RAD = math.radians(0.01)


def _random_cameras(count: int, seed: int):
    rng = np.random.default_rng(seed)
    for roll, pitch, vfov in zip(
        rng.uniform(-0.7854, 0.7854, count), rng.uniform(-0.7854, 0.7854, count), rng.uniform(0.3491, 1.8326, count)
    ):
        yield Camera(float(roll), float(pitch), float(vfov))


@pytest.mark.parametrize("height,width,seed", [(64, 64, 0), (48, 80, 1), (96, 40, 2), (33, 57, 3)])
def test_round_trip_on_random_cameras(height, width, seed):
    for camera in _random_cameras(4, seed):
        original = camera_map(*camera.values(), height, width)
        estimate = estimate_camera(original)
        for name, true, got in zip(("roll", "pitch", "vfov"), camera.values(), estimate.values()):
            assert abs(got - true) <= TOLERANCE_RAD, f"{name}: {got} vs {true} for {camera}"
        rebuilt = camera_map(*estimate.values(), height, width)
        assert (rebuilt - original).abs().max().item() <= TOLERANCE_RAD


def test_round_trip_at_512_with_zenith_in_view():
    camera = Camera(0.6, 0.78, 1.83)  # pitch + vfov/2 > pi/2: the clamped zenith is inside the map
    estimate = estimate_camera(camera_map(*camera.values(), 512, 512))
    assert estimate.values() == pytest.approx(camera.values(), abs=TOLERANCE_RAD)


def test_normalized_map_and_other_dtypes():
    camera = Camera(-0.4, 0.25, 0.5)
    normalized = normalize_camera_map(camera_map(*camera.values(), 40, 40)).double()
    estimate = estimate_camera(normalized, normalized=True)
    assert estimate.values() == pytest.approx(camera.values(), abs=TOLERANCE_RAD)
    assert estimate.yaw is None


@pytest.mark.parametrize(
    "bad,message",
    [
        (torch.zeros(2, 8, 8), r"shape \[3, H, W\]"),
        (torch.full((3, 8, 8), float("nan")), "non-finite"),
        (torch.zeros(3, 8, 8), "usable pixels"),
    ],
)
def test_invalid_maps_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        estimate_camera(bad)


def test_fit_landing_on_an_equivalent_branch_is_canonicalised():
    # Extreme camera whose fit converges to roll - 2*pi; (roll + pi, pi - pitch) is the other equivalent branch.
    camera = Camera(0.07527623086154756, 1.3521232446353104, 2.889887367661609)
    estimate = estimate_camera(camera_map(*camera.values(), 33, 57))
    assert estimate.values() == pytest.approx(camera.values(), abs=TOLERANCE_RAD)
