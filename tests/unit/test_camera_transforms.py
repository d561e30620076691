"""Geometry-consistent transforms: the map of a transformed image equals the transformed map.

A camera map is itself a [3, H, W] tensor, so each transform is applied to the map and compared with the map
re-derived from the camera the transform returns. Tolerance 2e-5 (float32 rounding) for crops and pads with even
size differences, where the convention of docs/puffin.md §4 makes them exact.
"""
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_puffin.camera import Camera, camera_map
from megatron_puffin.camera.transforms import (
    center_crop,
    crop,
    cropped_vfov,
    dynamic_resize,
    dynamic_size,
    image_size,
    pad_to_square,
    resize,
)

EXACT = 2e-5
CAMERAS = [Camera(0.3, -0.2, 1.1), Camera(-0.7, 0.6, 0.4), Camera(0.1, 0.05, 1.8)]


def _map(camera: Camera, height: int, width: int) -> torch.Tensor:
    return camera_map(*camera.values(), height, width)


def _pattern_image(height: int, width: int) -> Image.Image:
    values = (np.arange(height * width * 3, dtype=np.uint32) * 37 % 251).astype(np.uint8)
    return Image.fromarray(values.reshape(height, width, 3), "RGB")


@pytest.mark.parametrize("camera", CAMERAS)
@pytest.mark.parametrize("size", [(40, 60), (64, 20), (12, 96)])
def test_center_crop_of_map_equals_map_of_crop(camera, size):
    original = _map(camera, 64, 96)
    cropped, new_camera = center_crop(original, camera, size)
    assert new_camera.vfov == pytest.approx(cropped_vfov(camera.vfov, 64, size[0]))
    assert (new_camera.roll, new_camera.pitch) == (camera.roll, camera.pitch)
    torch.testing.assert_close(cropped, _map(new_camera, *size), atol=EXACT, rtol=0)


def test_center_crop_pil_matches_tensor_and_returns_same_camera():
    image = _pattern_image(50, 70)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    cropped_pil, camera_pil = center_crop(image, CAMERAS[0], (30, 40))
    cropped_tensor, camera_tensor = center_crop(tensor, CAMERAS[0], (30, 40))
    assert camera_pil == camera_tensor and image_size(cropped_pil) == (30, 40)
    assert np.array_equal(np.asarray(cropped_pil), cropped_tensor.permute(1, 2, 0).numpy())


def test_off_centre_crop_needs_explicit_permission(caplog):
    image = torch.zeros(3, 32, 32)
    with pytest.raises(ValueError, match="moves the principal point"):
        crop(image, CAMERAS[0], 0, 0, 16, 16)
    with caplog.at_level(logging.WARNING, logger="megatron_puffin.camera.transforms"):
        cropped, camera = crop(image, CAMERAS[0], 0, 0, 16, 16, allow_principal_point_shift=True)
    assert cropped.shape == (3, 16, 16) and "(-8.0, -8.0) px" in caplog.text
    assert camera.vfov == pytest.approx(cropped_vfov(CAMERAS[0].vfov, 32, 16))
    with pytest.raises(ValueError, match="must lie inside"):
        crop(image, CAMERAS[0], 20, 0, 16, 16)


@pytest.mark.parametrize("camera", CAMERAS)
def test_pad_landscape_to_square_extends_the_map(camera):
    original = _map(camera, 48, 80)
    padded, new_camera = pad_to_square(original, camera, fill=7.0)
    assert padded.shape == (3, 80, 80)
    assert new_camera.vfov == pytest.approx(2 * math.atan(math.tan(camera.vfov / 2) * 80 / 48))
    assert new_camera.vfov > camera.vfov
    torch.testing.assert_close(_map(new_camera, 80, 80)[:, 16:64], original, atol=EXACT, rtol=0)
    assert (padded[:, :16] == 7.0).all() and (padded[:, 64:] == 7.0).all()


@pytest.mark.parametrize("camera", CAMERAS)
def test_pad_portrait_to_square_keeps_vfov(camera):
    original = _map(camera, 80, 48)
    padded, new_camera = pad_to_square(original, camera)
    assert padded.shape == (3, 80, 80) and new_camera == camera
    torch.testing.assert_close(_map(new_camera, 80, 80)[:, :, 16:64], original, atol=EXACT, rtol=0)


def test_pad_pil_image():
    padded, camera = pad_to_square(_pattern_image(30, 50), CAMERAS[0], fill=(1, 2, 3))
    array = np.asarray(padded)
    assert array.shape == (50, 50, 3) and (array[0, 0] == (1, 2, 3)).all()
    assert np.array_equal(array[10:40], np.asarray(_pattern_image(30, 50)))
    assert camera.vfov > CAMERAS[0].vfov


@pytest.mark.parametrize("height,width,rows,top", [(48, 64, 32, 8), (47, 64, 30, 9), (384, 512, 256, 64)])
def test_reference_behaviour_crops_landscape(height, width, rows, top):
    camera = CAMERAS[0]
    original = _map(camera, height, width)
    cropped, new_camera = pad_to_square(original, camera, reference_behaviour=True)
    assert cropped.shape == (3, rows, width) and rows == 2 * height - width
    torch.testing.assert_close(cropped, original[:, top : top + rows], atol=0, rtol=0)
    assert new_camera.vfov == pytest.approx(cropped_vfov(camera.vfov, height, rows)) and new_camera.vfov < camera.vfov
    if (height - width) % 2 == 0:
        torch.testing.assert_close(cropped, _map(new_camera, rows, width), atol=EXACT, rtol=0)
    pil, pil_camera = pad_to_square(_pattern_image(height, width), camera, reference_behaviour=True)
    assert image_size(pil) == (rows, width) and pil_camera == new_camera


def test_reference_behaviour_fails_where_the_reference_cannot_pad():
    with pytest.raises(ValueError, match="crops a 30x60 image to 0 rows"):
        pad_to_square(torch.zeros(3, 30, 60), CAMERAS[0], reference_behaviour=True)
    square, camera = pad_to_square(torch.ones(3, 30, 30), CAMERAS[0], reference_behaviour=True)
    assert square.shape == (3, 30, 30) and camera == CAMERAS[0]


@pytest.mark.parametrize(
    "width,height,kwargs,expected",
    [
        (1000, 750, {}, (512, 384)),
        (750, 1000, {}, (384, 512)),
        (1000, 700, {}, (512, 384)),  # 358.4 rounds up to 384
        (1024, 100, {}, (512, 64)),
        (300, 200, {}, (320, 224)),  # both below 512: each side rounded up
        (512, 512, {}, (512, 512)),
        (600, 600, {}, (512, 512)),
        (1000, 750, {"max_size": 256, "unit": 16}, (256, 192)),
    ],
)
def test_dynamic_size_follows_reference_rule(width, height, kwargs, expected):
    assert dynamic_size(width, height, **kwargs) == expected


def test_dynamic_size_rejects_bad_configuration():
    with pytest.raises(ValueError, match="max_size \\(500\\) divisible by unit \\(32\\)"):
        dynamic_size(100, 100, max_size=500)


def test_dynamic_resize_keeps_camera_for_pil_and_tensor():
    camera = CAMERAS[1]
    resized, new_camera = dynamic_resize(_pattern_image(150, 200), camera, max_size=128)
    assert image_size(resized) == (96, 128) and new_camera == camera
    tensor = torch.randint(0, 256, (3, 150, 200), dtype=torch.uint8)
    resized_tensor, _ = dynamic_resize(tensor, camera, max_size=128)
    assert resized_tensor.shape == (3, 96, 128) and resized_tensor.dtype == torch.uint8


@pytest.mark.parametrize("camera", CAMERAS)
def test_resize_of_map_matches_map_at_new_size(camera):
    # A resize keeps vfov. Exact agreement is impossible because the reference principal point (W/2, H/2) is not
    # the pixel-grid centre: halving the size moves it by a quarter output pixel. Tolerance: the latitude change
    # across half an output pixel, vfov / H_out / 2.
    resized, new_camera = resize(_map(camera, 128, 192), camera, (64, 96))
    assert new_camera == camera
    tolerance = camera.vfov / 64 / 2
    assert (resized - _map(camera, 64, 96))[:, 2:-2, 2:-2].abs().max().item() <= tolerance


def test_cropped_vfov_inverts_and_matches_evaluation_uncrop():
    vfov = 1.2
    square = cropped_vfov(vfov, 640, 480)  # portrait 640x480 centre-cropped to 480x480
    assert cropped_vfov(square, 480, 640) == pytest.approx(vfov)
    # §7.1 un-crop for portrait ground truth: 2 atan(tan(v/2) h / w).
    assert cropped_vfov(square, 480, 640) == pytest.approx(2 * math.atan(math.tan(square / 2) * 640 / 480))


def test_non_images_are_rejected():
    with pytest.raises(TypeError, match="PIL.Image.Image or a torch.Tensor"):
        center_crop(np.zeros((3, 8, 8)), CAMERAS[0], (4, 4))
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        center_crop(torch.zeros(8, 8), CAMERAS[0], (4, 4))
