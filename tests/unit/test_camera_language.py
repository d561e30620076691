"""Camera as language (docs/puffin.md §3.3, §3.10, §7.1): exact rendering, strict parsing, tolerant parsing."""
import math

import numpy as np
import pytest

from megatron_puffin.camera import (
    CAMERA_SENTENCE_PREFIX,
    FALLBACK_CAMERA_VALUES,
    Camera,
    CameraError,
    CameraValues,
    format_camera,
    format_caption,
    format_thinking_caption,
    parse_camera,
    parse_camera_tolerant,
    split_caption,
    split_thinking_caption,
)

PREFIX = CAMERA_SENTENCE_PREFIX
YAW = "The deviation of the camera yaw angle is"


def test_base_sentence_is_exact():
    assert format_camera(0.1, -0.25, 1.48) == (
        "The camera parameters (roll, pitch, and field-of-view) are: 0.1000, -0.2500, 1.4800."
    )


def test_cross_view_sentence_wraps_yaw_to_0_2pi():
    base = "The camera parameters (roll, pitch, and field-of-view) are: 0.0000, 0.1000, 1.4800."
    assert format_camera(0.0, 0.1, 1.48, yaw=-math.pi / 2) == base + " The deviation of the camera yaw angle is 4.7124."
    assert format_camera(0.0, 0.1, 1.48, yaw=math.pi / 2).endswith(" is 1.5708.")
    assert format_camera(0.0, 0.1, 1.48, yaw=7.0).endswith(f" is {7.0 - 2 * math.pi:.4f}.")
    # 2*pi - 1e-6 would round to 6.2832 >= 2*pi: it is rendered as 0.
    assert format_camera(0.0, 0.1, 1.48, yaw=2 * math.pi - 1e-6).endswith(" is 0.0000.")


def test_thinking_rendering_is_the_answer():
    assert format_camera(0.1, -0.25, 1.48, thinking=True) == "<answer>0.1000, -0.2500, 1.4800</answer>"
    with pytest.raises(ValueError, match="thinking answers carry roll, pitch and vfov only"):
        format_camera(0.1, -0.25, 1.48, yaw=1.0, thinking=True)


def test_thinking_caption_and_split():
    caption = format_thinking_caption("The horizon is tilted.", Camera(0.1, 0.2, 1.0))
    assert caption == "<think>The horizon is tilted.</think> <answer>0.1000, 0.2000, 1.0000</answer>"
    assert split_thinking_caption(caption) == ("The horizon is tilted.", Camera(0.1, 0.2, 1.0))
    assert split_thinking_caption("<think>\n a\n b </think>\n<answer> 0.1, 0.2, 1.0 </answer>\n")[0] == "a\n b"
    with pytest.raises(ValueError, match="must not contain '</think>'"):
        format_thinking_caption("bad </think> reasoning", Camera(0.1, 0.2, 1.0))


def test_no_negative_zero_and_invalid_values_rejected():
    assert format_camera(-1e-6, -4e-5, 1.0).count("0.0000") == 2 and "-0.0000" not in format_camera(-1e-6, 0, 1)
    with pytest.raises(ValueError, match="pitch"):
        format_camera(0.0, 2.0, 1.0)


def test_caption_round_trip_with_description():
    camera = Camera(0.2, -0.3, 0.9, yaw=3.1416)
    caption = format_caption("  A quiet street at dusk. ", camera)
    assert caption.startswith("A quiet street at dusk. The camera parameters")
    description, parsed = split_caption(caption)
    assert description == "A quiet street at dusk." and parsed == camera
    assert split_caption(format_camera(0.2, -0.3, 0.9))[0] == ""  # mixed-motion text without description


def test_reference_tolerances_are_kept():
    # The reference base regex accepts trailing dots and whitespace after the triple.
    assert parse_camera(f"x {PREFIX}  0.1,0.2,  1.0 . \n") == Camera(0.1, 0.2, 1.0)


def test_values_at_range_limits_survive_rounding():
    for camera in (Camera(math.pi / 2, -math.pi / 2, 1.0), Camera(0.0, 0.0, math.pi - 1e-6)):
        parsed = parse_camera(format_camera(*camera.values()))
        assert parsed.values() == pytest.approx(camera.values(), abs=5e-5)


def _random_values(count: int, seed: int):
    rng = np.random.default_rng(seed)
    roll_pitch = rng.uniform(-0.7854, 0.7854, size=(count, 2))
    vfov = rng.uniform(0.3491, 1.8326, size=count)
    yaw = rng.uniform(-2 * math.pi, 4 * math.pi, size=count)
    return roll_pitch.tolist(), vfov.tolist(), yaw.tolist()


def test_format_parse_round_trip_10000_random_cameras():
    roll_pitch, vfov, yaw = _random_values(10_000, seed=3)
    for index in range(10_000):
        roll, pitch = roll_pitch[index]
        kind = index % 3
        text = format_camera(roll, pitch, vfov[index], yaw=yaw[index] if kind == 1 else None, thinking=kind == 2)
        parsed = parse_camera(text)
        assert abs(parsed.roll - roll) <= 5e-5 and abs(parsed.pitch - pitch) <= 5e-5
        assert abs(parsed.vfov - vfov[index]) <= 5e-5
        if kind == 1:
            assert 0 <= parsed.yaw < 2 * math.pi
            assert abs(math.remainder(parsed.yaw - yaw[index], 2 * math.pi)) <= 5e-5 + 1e-12
        else:
            assert parsed.yaw is None
        assert format_camera(*parsed.values(), yaw=parsed.yaw, thinking=kind == 2) == text


MALFORMED = [
    ("", "no camera sentence"),
    ("A photo of a cat.", "no camera sentence"),
    ("the camera parameters (roll, pitch, and field-of-view) are: 0.1, 0.2, 0.3.", "no camera sentence"),
    (f"{PREFIX} 0.1, 0.2.", "must end the text"),
    (f"{PREFIX} 0.1, 0.2, 0.3, 0.4.", "must end the text"),
    (f"{PREFIX} 0.1, 0.2, 0.3. A nice day.", "must end the text"),
    (f"{PREFIX} 0.1 0.2 0.3.", "must end the text"),
    (f"{PREFIX} 0.1a, 0.2, 0.3.", "must end the text"),
    (f"{PREFIX} nan, 0.2, 0.3.", "must end the text"),
    (f"{PREFIX} 1e-3, 0.2, 0.3.", "must end the text"),
    (f"{PREFIX} 0.1, 2.0000, 0.3.", r"pitch \(2.0 rad\)"),
    (f"{PREFIX} 0.1, 0.2, 0.0000.", r"vfov \(0.0 rad\)"),
    (f"{PREFIX} 0.1, 0.2, 0.3. {PREFIX} 0.1, 0.2, 0.3.", "2 camera sentences"),
    (f"{PREFIX} 0.1, 0.2, 1.48.5", "must end the text"),
    (f"{PREFIX} 0.1, 0.2, 1.48. {YAW} .", "must end the text"),
    (f"{PREFIX} 0.1, 0.2, 1.48. {YAW} 1.5710. Then turn again.", "must end the text"),
    (f"{PREFIX} 0.1, 0.2, 1.48. {YAW} 7.0000.", r"yaw \(7.0000\) must lie in \[0, 2\*pi\)"),
    (f"{PREFIX} 0.1, 0.2, 1.48. {YAW} -1.5708.", "yaw"),
    (f"{YAW} 1.5710. {PREFIX} 0.1, 0.2, 1.48.", "yaw sentence must directly follow"),
    ("<think>x</think> <answer>0.1, 0.2</answer>", "must read '<answer>R, P, F</answer>'"),
    ("<think>x</think> <answer>0.1, 0.2, 0.3", "exactly one <answer>"),
    ("<answer>0.1, 0.2, 0.3</answer><answer>0.1, 0.2, 0.3</answer>", "exactly one <answer>"),
    ("<answer>0.1, 0.2, 0.3</answer> and more", "end the text"),
    ("<answer>roll 0.1, 0.2, 0.3</answer>", "must read"),
    ("<answer>0.1, 0.2, 4.0000</answer>", r"vfov \(4.0 rad\)"),
]


@pytest.mark.parametrize("text,message", MALFORMED)
def test_malformed_text_raises_clear_error_quoting_it(text, message):
    with pytest.raises(CameraError, match=message) as error:
        parse_camera(text)
    assert repr(text) in str(error.value)


@pytest.mark.parametrize(
    "text,message",
    [
        ("<answer>0.1, 0.2, 0.3</answer>", "needs '<think>...</think>' before"),
        ("<think>x <answer>0.1, 0.2, 0.3</answer>", "needs '<think>...</think>' before"),
        ("<answer>0.1, 0.2, 0.3</answer><think>x</think>", "end the text"),
    ],
)
def test_split_thinking_caption_requires_think_block(text, message):
    with pytest.raises(CameraError, match=message):
        split_thinking_caption(text)


def test_split_caption_rejects_thinking_and_non_strings():
    with pytest.raises(CameraError, match="no camera sentence"):
        split_caption("<think>x</think> <answer>0.1, 0.2, 0.3</answer>")
    with pytest.raises(CameraError, match="must be a str, got NoneType"):
        parse_camera(None)


def test_tolerant_parse_takes_first_triple_without_validation():
    assert parse_camera_tolerant(format_camera(0.1, -0.2, 1.2)) == (CameraValues(0.1, -0.2, 1.2), False)
    assert parse_camera_tolerant("<think>hmm</think><answer>0.5, 0.6,0.7</answer>") == ((0.5, 0.6, 0.7), False)
    # The reference takes the first triple anywhere, even inside the reasoning.
    values, fallback = parse_camera_tolerant("about 0.10, 0.20, 0.30 <answer>0.5, 0.6, 0.7</answer>")
    assert values == (0.1, 0.2, 0.3) and not fallback
    values, fallback = parse_camera_tolerant("roll +3.0, -2.5, 4.0")
    assert values == CameraValues(3.0, -2.5, 4.0) and not fallback  # out of range, returned as is


@pytest.mark.parametrize("text", ["", "I cannot tell.", "1, 2, 3", "0.1, 0.2", "0.1; 0.2; 0.3"])
def test_tolerant_parse_reports_fallback(text):
    assert parse_camera_tolerant(text) == (FALLBACK_CAMERA_VALUES, True)
    assert FALLBACK_CAMERA_VALUES == (0.0, 0.0, 0.9163)
