"""Images are read as a viewer shows them: EXIF orientation applied, 16-bit grayscale scaled (not clipped) to 8 bits,
pixel formats without an 8-bit reading rejected with a reason; everything else exactly PIL's RGB conversion."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_puffin.data.images import EXIF_ORIENTATION, ImageError, decode_image, load_dynamic
from megatron_puffin.data.puffin4m import BadSample, read_image
from megatron_puffin.inference.images import load_image


def _pattern(height=90, width=120):
    """An image whose every rotation and mirror is a different array."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _encode(image: Image.Image, fmt="PNG", orientation=None) -> bytes:
    buffer = io.BytesIO()
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        kwargs["exif"] = exif
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# EXIF orientation -> the numpy operation a viewer applies to the stored pixels (the EXIF 2.3 table, independent of
# PIL's own mapping): 6 = rotate 90 degrees clockwise, 8 = counter-clockwise, 3 = 180, 2/4 = mirrors, 5/7 = mirror
# left-right, then rotate 270 / 90 degrees clockwise
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.rot90(a[:, ::-1], k=1),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: np.rot90(a[:, ::-1], k=-1),
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("orientation", sorted(DISPLAYED))
def test_exif_orientation_is_applied(orientation):
    stored = _pattern()
    decoded = np.asarray(decode_image(_encode(Image.fromarray(stored), orientation=orientation)))
    np.testing.assert_array_equal(decoded, DISPLAYED[orientation](stored))


def test_images_without_orientation_decode_exactly_as_pil_converts_them():
    stored = _pattern()
    for image in (Image.fromarray(stored), Image.fromarray(stored).convert("L"), Image.fromarray(stored).convert("P"),
                  Image.fromarray(stored).convert("RGBA")):
        data = _encode(image)
        with Image.open(io.BytesIO(data)) as reference:
            expected = np.asarray(reference.convert("RGB"))
        np.testing.assert_array_equal(np.asarray(decode_image(data)), expected)
    # a tag outside 1-8 is no orientation
    data = _encode(Image.fromarray(stored), orientation=42)
    np.testing.assert_array_equal(np.asarray(decode_image(data)), stored)


def test_rotated_phone_photo_reaches_training_and_inference_upright(tmp_path):
    """A JPEG stored landscape with 'rotate 90 CW' is portrait for the data loader and for understand/generate."""
    stored = Image.fromarray(_pattern(96, 128))
    rotated = tmp_path / "phone.jpg"
    rotated.write_bytes(_encode(stored, "JPEG", orientation=6))
    upright = tmp_path / "upright.png"
    upright.write_bytes(_encode(Image.fromarray(np.asarray(decode_image(rotated.read_bytes())))))

    tensor = load_dynamic(rotated.read_bytes(), max_size=128, unit=32)
    assert tensor.shape == (3, 128, 96)  # portrait: height > width
    torch.testing.assert_close(tensor, load_dynamic(upright.read_bytes(), max_size=128, unit=32), rtol=0, atol=0)
    torch.testing.assert_close(load_image(rotated, 64), load_image(upright, 64), rtol=0, atol=0)
    # preprocessing checks the upright geometry and keeps the original bytes (read upright again by the loader)
    assert read_image(rotated, max_image_size=None) == rotated.read_bytes()


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 100 * 100).round().astype(np.uint16).reshape(100, 100)
    data = _encode(Image.fromarray(values))
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode.startswith("I")  # what a 16-bit PNG opens as
        clipped = np.asarray(opened.convert("RGB"))
    assert (clipped == 255).mean() > 0.99  # PIL's own conversion: almost white
    decoded = np.asarray(decode_image(data))
    expected = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], expected)
    assert decoded.min() == 0 and decoded.max() == 255


def test_pixels_without_an_eight_bit_reading_are_bad_samples(tmp_path):
    floating = tmp_path / "depth.tiff"
    Image.fromarray(np.full((100, 100), 0.5, dtype=np.float32)).save(floating)
    with pytest.raises(ImageError, match="floating-point pixels") as error:
        decode_image(floating.read_bytes())
    assert error.value.reason == "image_unsupported"
    with pytest.raises(BadSample) as bad:
        read_image(floating, max_image_size=None, reason_prefix="init_image")
    assert bad.value.reason == "init_image_unsupported"

    wide = tmp_path / "wide.tiff"
    Image.fromarray(np.full((100, 100), 1 << 20, dtype=np.int32)).save(wide)
    with pytest.raises(ImageError, match="32-bit integer pixels") as error:
        decode_image(wide.read_bytes())
    assert error.value.reason == "image_unsupported"
