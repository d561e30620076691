"""Camera as language: render and parse the camera sentences of docs/puffin.md §3.3, §3.10 and §7.1.

Formats (angles in radians, 4 decimals):
    * base caption: ``<description> The camera parameters (roll, pitch, and field-of-view) are: R, P, F.``
      (the camera sentence ends the caption);
    * cross-view camera text: the base sentence followed by ``The deviation of the camera yaw angle is Y.`` with Y
      wrapped to [0, 2*pi) (§3.10); a scene description may precede it;
    * thinking caption: ``<think>{reasoning}</think> <answer>R, P, F</answer>`` (the answer ends the caption).

Two kinds of parser:
    * strict (:func:`parse_camera`, :func:`split_caption`, :func:`split_thinking_caption`) for data: they return a
      validated :class:`Camera` or raise :class:`CameraError` quoting the text;
    * tolerant (:func:`parse_camera_tolerant`) for scoring model output (§7.1): the first number triple anywhere,
      else the reference fallback (0, 0, 0.9163), returned together with a flag saying the fallback was used.
"""
import logging
import math
import re
from typing import Optional, Tuple

from megatron_puffin.camera.types import HALF_PI, Camera, CameraError, CameraValues

logger = logging.getLogger(__name__)

CAMERA_SENTENCE_PREFIX = "The camera parameters (roll, pitch, and field-of-view) are:"
"""Opening of the camera sentence; three numbers R, P, F and a full stop follow it."""

YAW_SENTENCE_PREFIX = "The deviation of the camera yaw angle is"
"""Opening of the cross-view yaw sentence; one number Y in [0, 2*pi) and a full stop follow it."""

DECIMALS = 4
"""Decimals of every rendered angle (§3.3)."""

FALLBACK_CAMERA_VALUES = CameraValues(0.0, 0.0, 0.9163)
"""What the reference evaluation assumes when model output holds no number triple (§7.1)."""

_ROUNDING_SLACK = 0.5 * 10.0**-DECIMALS
_MAX_QUOTE = 240
_NUMBER = r"([+-]?\d+(?:\.\d+)?)"
_TRIPLE = rf"{_NUMBER},\s*{_NUMBER},\s*{_NUMBER}"
_SENTENCE_RE = re.compile(re.escape(CAMERA_SENTENCE_PREFIX) + rf"\s*{_TRIPLE}(.*)$", re.DOTALL)
_YAW_TAIL_RE = re.compile(rf"\.?\s*{re.escape(YAW_SENTENCE_PREFIX)}\s*{_NUMBER}\.?\s*$")
_TAIL_CHARACTERS = ". \t\r\n"  # what the reference accepts after the triple ([.\s]*$)
_ANSWER_RE = re.compile(rf"<answer>\s*{_TRIPLE}\s*</answer>\s*$")
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_TOLERANT_RE = re.compile(r"([+-]?\d+\.\d+),\s*([+-]?\d+\.\d+),\s*([+-]?\d+\.\d+)")


def _quote(text: str) -> str:
    """repr() of the text, shortened in the middle for long captions."""
    if len(text) <= _MAX_QUOTE:
        return repr(text)
    half = _MAX_QUOTE // 2
    return f"{text[:half]!r} ... {text[-half:]!r} ({len(text)} characters)"


def _format_angle(value: float) -> str:
    text = f"{value:.{DECIMALS}f}"
    return text[1:] if text == "-" + "0." + "0" * DECIMALS else text  # no "-0.0000"


def _wrap_yaw(yaw: float) -> float:
    """Wraps yaw to [0, 2*pi) *after* rounding, so the rendered value never reads 6.2832."""
    wrapped = round(yaw % (2 * math.pi), DECIMALS)
    return 0.0 if wrapped >= 2 * math.pi else wrapped


def _triple_text(camera: Camera) -> str:
    return ", ".join(_format_angle(value) for value in camera.values())


def camera_text(camera: Camera, thinking: bool = False) -> str:
    """Renders a :class:`Camera` as its camera sentence (see :func:`format_camera`)."""
    if thinking:
        if camera.yaw is not None:
            raise ValueError(
                f"thinking answers carry roll, pitch and vfov only (§3.3), got yaw {camera.yaw!r}; drop the yaw or "
                "use thinking=False for cross-view text"
            )
        return f"<answer>{_triple_text(camera)}</answer>"
    sentence = f"{CAMERA_SENTENCE_PREFIX} {_triple_text(camera)}."
    if camera.yaw is not None:
        sentence += f" {YAW_SENTENCE_PREFIX} {_format_angle(_wrap_yaw(camera.yaw))}."
    return sentence


def format_camera(roll: float, pitch: float, vfov: float, yaw: Optional[float] = None, thinking: bool = False) -> str:
    """Renders camera values as the camera sentence of §3.3.

    Args:
        roll: Roll in radians.
        pitch: Pitch in radians.
        vfov: Vertical field of view in radians.
        yaw: Cross-view yaw in radians (any finite value; rendered wrapped to [0, 2*pi)), or None.
        thinking: False renders ``The camera parameters (roll, pitch, and field-of-view) are: R, P, F.`` (plus the
            yaw sentence when yaw is given). True renders only the answer part of a thinking caption,
            ``<answer>R, P, F</answer>``; the reasoning is added by :func:`format_thinking_caption`.

    Returns:
        The sentence, every angle with 4 decimals.

    Raises:
        ValueError: On invalid camera values, or a yaw together with thinking=True.
    """
    return camera_text(Camera(roll, pitch, vfov, yaw), thinking=thinking)


def format_caption(description: str, camera: Camera) -> str:
    """Renders a base (or, with yaw, cross-view) caption: ``{description} {camera sentence}``."""
    description = description.strip()
    sentence = camera_text(camera)
    return f"{description} {sentence}" if description else sentence


def format_thinking_caption(reasoning: str, camera: Camera) -> str:
    """Renders a thinking caption: ``<think>{reasoning}</think> <answer>R, P, F</answer>``.

    Raises:
        ValueError: If the reasoning contains think/answer tags (the caption would not parse back) or the camera
            has a yaw.
    """
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        if tag in reasoning:
            raise ValueError(f"thinking reasoning must not contain {tag!r}: {_quote(reasoning)}")
    return f"<think>{reasoning}</think> {camera_text(camera, thinking=True)}"


def _snap_to_range(roll: float, pitch: float, vfov: float) -> Tuple[float, float, float]:
    """Moves values that exceed a range limit by less than the rounding of 4 decimals back onto it.

    A valid pitch of pi/2 renders as 1.5708 > pi/2; without this, such captions would not parse back.
    """
    def snap_half_pi(value: float) -> float:
        return math.copysign(HALF_PI, value) if HALF_PI < abs(value) <= HALF_PI + _ROUNDING_SLACK else value

    if math.pi <= vfov < math.pi + _ROUNDING_SLACK:
        vfov = math.nextafter(math.pi, 0.0)
    return snap_half_pi(roll), snap_half_pi(pitch), vfov


def _build_camera(numbers, yaw_text: Optional[str], text: str) -> Camera:
    roll, pitch, vfov = _snap_to_range(*(float(number) for number in numbers))
    yaw = None if yaw_text is None else float(yaw_text)
    if yaw is not None and not 0.0 <= yaw < 2 * math.pi:
        raise CameraError(f"cross-view yaw ({yaw_text}) must lie in [0, 2*pi) = [0, 6.2832) in {_quote(text)}")
    try:
        return Camera(roll, pitch, vfov, yaw)
    except ValueError as error:
        raise CameraError(f"invalid camera values in {_quote(text)}: {error}") from error


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise CameraError(f"camera text must be a str, got {type(text).__name__}: {text!r}")


def _match_sentence(text: str) -> Tuple[int, Tuple[str, ...], Optional[str]]:
    """Finds the camera sentence (with optional yaw sentence) that must end the text.

    Returns:
        (start of the camera sentence, the three number strings, the yaw number string or None).
    """
    _check_text(text)
    count = text.count(CAMERA_SENTENCE_PREFIX)
    if count == 0:
        raise CameraError(f"no camera sentence {CAMERA_SENTENCE_PREFIX!r} in {_quote(text)}")
    if count > 1:
        raise CameraError(f"{count} camera sentences in {_quote(text)}; a caption holds exactly one")
    match = _SENTENCE_RE.search(text)
    tail = match.group(4) if match is not None else ""
    yaw = _YAW_TAIL_RE.match(tail) if tail.strip(_TAIL_CHARACTERS) else None
    if match is None or (tail.strip(_TAIL_CHARACTERS) and yaw is None):
        rest = text[text.index(CAMERA_SENTENCE_PREFIX) + len(CAMERA_SENTENCE_PREFIX):]
        raise CameraError(
            f"the camera sentence must end the text as 'R, P, F.' (optionally followed by "
            f"'{YAW_SENTENCE_PREFIX} Y.'), decimal numbers only; got {_quote(rest.strip())} in {_quote(text)}"
        )
    if text.count(YAW_SENTENCE_PREFIX) != (yaw is not None):
        raise CameraError(f"the yaw sentence must directly follow the camera sentence, once: {_quote(text)}")
    return match.start(), match.groups()[:3], None if yaw is None else yaw.group(1)


def _match_answer(text: str) -> re.Match:
    """Finds the single ``<answer>R, P, F</answer>`` that must end a thinking caption."""
    _check_text(text)
    opened, closed = text.count("<answer>"), text.count("</answer>")
    if opened != 1 or closed != 1:
        raise CameraError(
            f"a thinking caption needs exactly one <answer>...</answer>, found {opened} '<answer>' and {closed} "
            f"'</answer>' in {_quote(text)}"
        )
    match = _ANSWER_RE.search(text)
    if match is None:
        raise CameraError(
            f"the answer must read '<answer>R, P, F</answer>' with decimal numbers and end the text; got "
            f"{_quote(text)}"
        )
    return match


def split_caption(text: str) -> Tuple[str, Camera]:
    """Splits a base or cross-view caption into its scene description and camera.

    Args:
        text: ``<description> The camera parameters (...) are: R, P, F.[ The deviation ... is Y.]``; the
            description may be empty (mixed-motion cross-view text, §3.10).

    Returns:
        (description stripped of surrounding whitespace, validated camera; yaw set iff the yaw sentence is present).

    Raises:
        CameraError: If the text has no camera sentence, more than one, extra text after it, malformed numbers or
            invalid values; the message quotes the text.
    """
    start, numbers, yaw_text = _match_sentence(text)
    return text[:start].strip(), _build_camera(numbers, yaw_text, text)


def split_thinking_caption(text: str) -> Tuple[str, Camera]:
    """Splits a thinking caption into its reasoning and camera.

    Args:
        text: ``<think>{reasoning}</think> ... <answer>R, P, F</answer>``.

    Returns:
        (stripped text inside the first ``<think>...</think>``, validated camera without yaw).

    Raises:
        CameraError: If the think block or the answer is missing or malformed; the message quotes the text.
    """
    camera = parse_camera_answer(text)
    think = _THINK_RE.search(text)
    if think is None or think.end() > text.index("<answer>"):
        raise CameraError(f"a thinking caption needs '<think>...</think>' before its <answer>: {_quote(text)}")
    return think.group(1).strip(), camera


def parse_camera_answer(text: str) -> Camera:
    """Strictly parses the ``<answer>R, P, F</answer>`` that ends a thinking caption (think block optional)."""
    match = _match_answer(text)
    return _build_camera(match.groups(), None, text)


def parse_camera(text: str) -> Camera:
    """Strictly parses a caption or camera text into a validated :class:`Camera`.

    Accepts a base caption, cross-view camera text (with the yaw sentence, yaw set on the result) and a thinking
    caption or bare ``<answer>R, P, F</answer>`` (chosen when the text contains an answer tag). Values that exceed
    a range limit only by the 4-decimal rounding (pitch 1.5708) are moved onto the limit.

    Raises:
        CameraError: With the text quoted, on any deviation from these formats or on invalid values.
    """
    _check_text(text)
    if "<answer>" in text or "</answer>" in text:
        return parse_camera_answer(text)
    return split_caption(text)[1]


def parse_camera_tolerant(text: str) -> Tuple[CameraValues, bool]:
    """Reads a camera from model output the way the reference evaluation does (§7.1).

    Takes the first ``R, P, F`` triple of ``[+-]?\\d+\\.\\d+`` numbers separated by a comma and optional whitespace
    anywhere in the text. Values are not validated: predictions outside the camera ranges are still scored.

    Args:
        text: Generated text.

    Returns:
        (values, used_fallback): values are :data:`FALLBACK_CAMERA_VALUES` and used_fallback is True when the text
        holds no triple. Callers should count fallbacks and report them with the metrics.
    """
    _check_text(text)
    match = _TOLERANT_RE.search(text)
    if match is None:
        logger.debug("no camera triple in model output %s; using the fallback %s", _quote(text), FALLBACK_CAMERA_VALUES)
        return FALLBACK_CAMERA_VALUES, True
    return CameraValues(*(float(number) for number in match.groups())), False
