"""Camera maps: analytic cases of docs/puffin.md §4, an independent per-pixel reading of docs/puffin.md, batching and devices."""
import math

import numpy as np
import pytest
import torch

from megatron_puffin.camera import Camera, camera_map, camera_maps, denormalize_camera_map, normalize_camera_map

RANDOM_CAMERAS = [
    (0.31, -0.22, 1.1),
    (-0.7, 0.5, 0.4),
    (0.05, 0.78, 1.8),
    (-0.78, -0.6, 0.9),
]


def spec_pixel(roll, pitch, vfov, height, width, x, y):
    """Straight reading of docs/puffin.md §4 for one pixel, in float64 numpy, written independently of the library."""
    focal = (height / 2) / math.tan(vfov / 2)
    u, v = (x - width / 2) / focal, (y - height / 2) / focal
    gravity = np.array([-math.sin(roll) * math.cos(pitch), -math.cos(roll) * math.cos(pitch), math.sin(pitch)])
    gravity = gravity / np.linalg.norm(gravity)
    up = np.array([gravity[0] - gravity[2] * u, gravity[1] - gravity[2] * v])
    up = up / max(np.linalg.norm(up), 1e-12)
    ray = np.array([u, v, 1.0])
    ray = ray / np.linalg.norm(ray)
    latitude = math.asin(np.clip(ray @ gravity, -1 + 1e-6, 1 - 1e-6))
    return np.array([up[0], up[1], latitude])


@pytest.mark.parametrize("roll,pitch,vfov", RANDOM_CAMERAS)
@pytest.mark.parametrize("height,width", [(64, 64), (48, 80), (90, 33)])
def test_matches_independent_reading_of_spec(roll, pitch, vfov, height, width):
    result = camera_map(roll, pitch, vfov, height, width)
    assert result.shape == (3, height, width) and result.dtype == torch.float32
    pixels = [(0, 0), (width - 1, 0), (0, height - 1), (width - 1, height - 1), (width // 2, height // 2), (7, 3)]
    for x, y in pixels:
        expected = spec_pixel(roll, pitch, vfov, height, width, x, y)
        np.testing.assert_allclose(result[:, y, x].double().numpy(), expected, atol=2e-6, err_msg=f"pixel {(x, y)}")


def test_hand_computed_corner():
    # vfov 90 deg on 4x4: f = 2, corner pixel (0, 0) has u = v = -1, so d.g = 1/sqrt(3) for a level camera.
    result = camera_map(0.0, 0.0, math.pi / 2, 4, 4)
    assert result[:, 0, 0].tolist() == pytest.approx([0.0, -1.0, math.asin(1 / math.sqrt(3))], abs=1e-6)


@pytest.mark.parametrize("height,width", [(32, 32), (40, 96)])
def test_level_camera_has_upward_field_everywhere(height, width):
    result = camera_map(0.0, 0.0, 1.2, height, width)
    assert torch.equal(result[0], torch.zeros(height, width))
    assert torch.equal(result[1], -torch.ones(height, width))


@pytest.mark.parametrize("roll,pitch,vfov", RANDOM_CAMERAS)
def test_latitude_at_principal_point_equals_pitch(roll, pitch, vfov):
    height, width = 48, 72  # even, so pixel (W/2, H/2) is the principal point
    centre = camera_map(roll, pitch, vfov, height, width)[2, height // 2, width // 2]
    assert centre.item() == pytest.approx(pitch, abs=1e-6)


@pytest.mark.parametrize("roll,pitch,vfov", RANDOM_CAMERAS)
def test_roll_sign_flip_mirrors_the_map(roll, pitch, vfov):
    height, width = 40, 56
    positive = camera_map(roll, pitch, vfov, height, width)
    negative = camera_map(-roll, pitch, vfov, height, width)
    # Column x mirrors to column W - x about the principal point W/2; column 0 has no partner in the grid.
    mirrored = negative[:, :, 1:].flip(-1)
    torch.testing.assert_close(positive[0, :, 1:], -mirrored[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(positive[1:, :, 1:], mirrored[1:], atol=1e-6, rtol=0)


def test_positive_roll_leans_up_to_the_left():
    result = camera_map(0.3, 0.1, 1.0, 32, 32)
    assert result[0, 16, 16].item() == pytest.approx(-math.sin(0.3), abs=1e-6)
    assert result[1, 16, 16].item() == pytest.approx(-math.cos(0.3), abs=1e-6)


@pytest.mark.parametrize("roll,pitch,vfov", [(0.0, 0.2, 1.0), (0.6, -0.3, 1.5), (-0.78, 0.1, 0.35), (0.2, -0.7, 1.8)])
def test_latitude_of_top_row_exceeds_bottom_row(roll, pitch, vfov):
    assert abs(pitch) < vfov / 2  # the condition of docs/puffin.md §4 (the last case even sees the nadir)
    latitude = camera_map(roll, pitch, vfov, 64, 48)[2]
    assert (latitude[0] > latitude[-1]).all()


@pytest.mark.parametrize("roll,pitch,vfov", [(0.0, 0.2, 1.0), (0.6, -0.3, 1.5), (-0.78, 0.1, 0.35), (0.2, -0.5, 1.2)])
def test_latitude_decreases_down_the_centre_column(roll, pitch, vfov):
    assert abs(pitch) + vfov / 2 < math.pi / 2  # neither zenith nor nadir in view: strictly monotonic
    centre_column = camera_map(roll, pitch, vfov, 64, 48)[2, :, 24]
    assert (centre_column[1:] < centre_column[:-1]).all()


def test_latitude_is_clamped_at_the_zenith():
    # pitch pi/2: the principal point (16, 16) looks straight up, d.g = 1 is clamped to 1 - 1e-6.
    latitude = camera_map(0.0, math.pi / 2, 1.0, 32, 32)[2]
    assert latitude[16, 16].item() == pytest.approx(math.asin(1 - 1e-6), abs=2e-4)
    assert latitude.max().item() < math.pi / 2


def test_batched_equals_single_and_accepts_tensors():
    cameras = [Camera(*values) for values in RANDOM_CAMERAS]
    batched = camera_maps(cameras, 24, 40)
    assert batched.shape == (4, 3, 24, 40)
    for index, values in enumerate(RANDOM_CAMERAS):
        assert torch.equal(batched[index], camera_map(*values, 24, 40))
    from_tensor = camera_maps(torch.tensor(RANDOM_CAMERAS, dtype=torch.float64), 24, 40)
    torch.testing.assert_close(from_tensor, batched, atol=1e-6, rtol=0)


def test_device_argument_and_tensor_device_are_respected():
    params = torch.tensor([[0.1, 0.2, 1.0]])
    assert camera_maps(params, 8, 8).device == params.device
    assert camera_maps([Camera(0.1, 0.2, 1.0)], 8, 8, device="cpu").device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    params = torch.tensor(RANDOM_CAMERAS)
    on_gpu = camera_maps(params.cuda(), 64, 96)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), camera_maps(params, 64, 96), atol=2e-5, rtol=0)


def test_normalisation_matches_vae_range():
    result = camera_map(0.5, 0.7, 1.8, 32, 32)
    normalized = normalize_camera_map(result)
    torch.testing.assert_close(normalized, result / (math.pi / 2))
    assert normalized[:2].abs().max() <= 2 / math.pi + 1e-6 and normalized[2].abs().max() < 1
    torch.testing.assert_close(denormalize_camera_map(normalized), result)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: camera_map(0.0, 0.0, 0.0, 8, 8), "vfov"),
        (lambda: camera_map(2.0, 0.0, 1.0, 8, 8), "roll"),
        (lambda: camera_map(0.0, 0.0, 1.0, 0, 8), "height"),
        (lambda: camera_maps(torch.zeros(2, 4), 8, 8), r"\[B, 3\]"),
        (lambda: camera_maps([], 8, 8), "at least one"),
    ],
)
def test_invalid_inputs_are_rejected(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_out_buffer_is_filled_and_checked():
    params = torch.tensor(RANDOM_CAMERAS)
    buffer = torch.full((4, 3, 16, 24), float("nan"))
    result = camera_maps(params, 16, 24, out=buffer)
    assert result is buffer
    assert torch.equal(buffer, camera_maps(params, 16, 24))
    with pytest.raises(ValueError, match=r"out must be a float32 tensor of shape \[4, 3, 16, 24\]"):
        camera_maps(params, 16, 24, out=torch.empty(4, 3, 16, 23))


def test_cpu_chunking_matches_one_shot(monkeypatch):
    params = torch.tensor(RANDOM_CAMERAS * 3)
    whole = camera_maps(params, 20, 30)
    monkeypatch.setattr("megatron_puffin.camera.maps.CPU_CHUNK_PIXELS", 20 * 30 * 2)  # two cameras per step
    assert torch.equal(camera_maps(params, 20, 30), whole)
