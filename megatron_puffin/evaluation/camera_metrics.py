"""Camera-understanding metrics, computed the way the published Puffin evaluation computes them.

Steps (one prediction per image, joined with the ground truth on the image name):

1. read the camera from the model's text with the tolerant parser of :mod:`megatron_puffin.camera.language`: the
   first ``R, P, F`` triple of ``[+-]?\\d+\\.\\d+`` numbers, else the fallback (0, 0, 0.9163) rad;
2. portrait ground-truth images (height > width): the model saw a centre-cropped square, i.e. only the middle
   ``width`` rows, so its vFoV is widened back: ``vfov <- 2 atan(tan(vfov / 2) * height / width)`` (landscape
   images keep it: the square crop keeps their full height);
3. errors in degrees, ``|prediction - ground truth| * 180 / pi`` per parameter, without angle wrapping;
4. per parameter: mean, median and AUC@1/5/10 deg of the recall curve with a 1-degree minimum error
   (:func:`error_auc`).

Everything here is plain numpy on CPU; the names of :func:`summarize` are the published ones
(``median_roll_error``, ``auc_vfov_error@5``, ...).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from megatron_puffin.camera.language import parse_camera_tolerant
from megatron_puffin.camera.types import Camera, CameraValues
from megatron_puffin.files import read_text

logger = logging.getLogger(__name__)

PARAMETERS = ("roll", "pitch", "vfov")
"""The scored camera parameters, in the order of the camera sentence."""

AUC_THRESHOLDS = (1, 5, 10)
"""AUC thresholds in degrees."""

MIN_ERROR = 1.0
"""Errors up to this many degrees count as exact in the AUC curve (the published ``min_error``)."""

GROUND_TRUTH_COLUMNS = ("fname", "roll", "pitch", "vfov", "width", "height")
"""Columns a ground-truth ``cameras.csv`` must have (angles in radians, sizes in pixels); others are ignored."""


class EvaluationInputError(ValueError):
    """A predictions or ground-truth file cannot be scored; the message names the file and the fix."""


@dataclass(frozen=True)
class GroundTruthCamera:
    """One row of a ground-truth ``cameras.csv``: angles in radians, the original image size in pixels."""

    fname: str
    roll: float
    pitch: float
    vfov: float
    width: int
    height: int

    def values(self) -> CameraValues:
        return CameraValues(self.roll, self.pitch, self.vfov)


@dataclass(frozen=True)
class ImageErrors:
    """The scoring of one image: the parsed prediction (radians, after the portrait restore) and its errors."""

    id: str
    fname: str
    predicted: CameraValues
    ground_truth: CameraValues
    used_fallback: bool
    vfov_restored: bool

    def error(self, parameter: str) -> float:
        """|prediction - ground truth| of ``parameter`` in degrees."""
        return abs(getattr(self.predicted, parameter) - getattr(self.ground_truth, parameter)) * 180.0 / math.pi


def restore_portrait_vfov(vfov: float, width: int, height: int) -> float:
    """The vFoV of the full portrait image from the vFoV predicted on its centre square crop (unchanged when
    ``height <= width``)."""
    if height <= width:
        return vfov
    return 2.0 * math.atan(math.tan(vfov / 2.0) * height / width)


def score_prediction(image_id: str, output_text: str, truth: GroundTruthCamera) -> ImageErrors:
    """Parses one model output and compares it with its ground truth (steps 1-3 of the module docstring)."""
    values, used_fallback = parse_camera_tolerant(output_text)
    vfov = restore_portrait_vfov(values.vfov, truth.width, truth.height)
    return ImageErrors(image_id, truth.fname, CameraValues(values.roll, values.pitch, vfov), truth.values(),
                       used_fallback, vfov != values.vfov)


def error_auc(errors: Sequence[float], thresholds: Iterable[float] = AUC_THRESHOLDS,
              min_error: float = MIN_ERROR) -> List[float]:
    """Area under the recall-vs-error curve up to each threshold, divided by the threshold (a fraction in [0, 1]).

    Errors are sorted (NaN counts as infinite) and the i-th smallest reaches recall i/n. With ``k`` errors at most
    ``min_error``, the curve is (0, k/n), (min_error, k/n), then (e_j, j/n) for each error e_j > min_error; it is
    integrated with the trapezoid rule on [0, t], the last recall held flat up to t. AUC@min_error is therefore
    the fraction of errors <= min_error.
    """
    values = np.sort(np.nan_to_num(np.asarray(errors, dtype=np.float64), nan=np.inf))
    if values.size == 0:
        raise ValueError("error_auc needs at least one error")
    recall = np.arange(1, values.size + 1) / values.size
    first = int(np.searchsorted(values, min_error, side="right"))
    curve_errors = np.concatenate([[0.0, min_error], values[first:]])
    curve_recall = np.concatenate([[first / values.size] * 2, recall[first:]])
    aucs = []
    for threshold in thresholds:
        last = int(np.searchsorted(curve_errors, threshold, side="right"))
        x = np.concatenate([curve_errors[:last], [threshold]])
        y = np.concatenate([curve_recall[:last], [curve_recall[last - 1]]])
        aucs.append(float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0) / threshold))
    return aucs


def summarize(scored: Sequence[ImageErrors]) -> Dict[str, float]:
    """The published metrics (degrees; AUC as fractions) plus ``num_images`` and ``num_fallback``."""
    if not scored:
        raise ValueError("no scored images: nothing to summarize")
    metrics: Dict[str, float] = {}
    for parameter in PARAMETERS:
        errors = np.array([image.error(parameter) for image in scored])
        metrics[f"mean_{parameter}_error"] = float(np.mean(errors))
        metrics[f"median_{parameter}_error"] = float(np.median(errors))
        for threshold, auc in zip(AUC_THRESHOLDS, error_auc(errors)):
            metrics[f"auc_{parameter}_error@{threshold}"] = auc
    metrics["num_images"] = len(scored)
    metrics["num_fallback"] = sum(image.used_fallback for image in scored)
    return metrics


# -- files ---------------------------------------------------------------------------------------------------------
def _number(path: Path, line: int, column: str, text: str, kind=float):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise EvaluationInputError(f"--ground-truth {path} line {line}: column {column!r} ({text!r}) is not {what}") \
            from None
    if kind is float and not math.isfinite(value):
        raise EvaluationInputError(f"--ground-truth {path} line {line}: column {column!r} ({text!r}) is not finite")
    if kind is int and value < 1:
        raise EvaluationInputError(f"--ground-truth {path} line {line}: column {column!r} ({value}) must be >= 1")
    return value


def read_ground_truth(path: os.PathLike) -> Dict[str, GroundTruthCamera]:
    """Reads ``cameras.csv`` (fname, roll, pitch, vfov, width, height; radians) into ``{fname: camera}``.

    Raises:
        EvaluationInputError: On a missing file or column, a duplicate fname or a malformed number.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(f"--ground-truth {path} does not exist; give the cameras.csv of the images")
    try:
        cameras = _read_camera_rows(path)
    except (UnicodeDecodeError, csv.Error) as error:
        raise EvaluationInputError(f"--ground-truth {path} is not a UTF-8 CSV file ({error}); give the cameras.csv "
                                   "of the images") from None
    if not cameras:
        raise EvaluationInputError(f"--ground-truth {path} has no rows")
    return cameras


def _read_camera_rows(path: Path) -> Dict[str, GroundTruthCamera]:
    with io.StringIO(read_text(path), newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in GROUND_TRUTH_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise EvaluationInputError(f"--ground-truth {path} lacks the columns {missing}; it needs "
                                       f"{', '.join(GROUND_TRUTH_COLUMNS)} (angles in radians)")
        cameras: Dict[str, GroundTruthCamera] = {}
        for line, row in enumerate(reader, start=2):
            fname = row["fname"]
            if fname in cameras:
                raise EvaluationInputError(f"--ground-truth {path} line {line}: fname {fname!r} appears twice")
            angles = [_number(path, line, c, row[c]) for c in PARAMETERS]
            try:
                Camera(*angles)
            except ValueError as error:  # most often a file in degrees: vfov 60 is 60 radians here
                raise EvaluationInputError(f"--ground-truth {path} line {line}: {error}; the angles must be in "
                                           "radians (from degrees: multiply by pi/180 = 0.017453)") from None
            cameras[fname] = GroundTruthCamera(
                fname, *angles, *(_number(path, line, c, row[c], int) for c in ("width", "height")),
            )
    return cameras


def read_predictions(path: os.PathLike) -> List[Tuple[str, str]]:
    """Reads a predictions JSON: a list of ``{"id": image name, "output_text": model text, ...}`` (the format of
    ``tools/understand.py`` and of the published evaluation); returns ``[(id, output_text)]``.

    Raises:
        EvaluationInputError: On a missing or malformed file, naming the first bad entry.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(f"--predictions {path} does not exist; write it with tools/understand.py")
    try:
        entries = json.loads(read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EvaluationInputError(f"--predictions {path} is not valid JSON ({error})") from None
    if not isinstance(entries, list) or not entries:
        raise EvaluationInputError(f"--predictions {path} must hold a non-empty JSON list of "
                                   '{"id": ..., "output_text": ...} objects')
    predictions = []
    for index, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("id"), str)
                and isinstance(entry.get("output_text"), str)):
            raise EvaluationInputError(f"--predictions {path} entry {index} ({str(entry)[:120]}) needs a string 'id' "
                                       "and a string 'output_text'")
        predictions.append((entry["id"], entry["output_text"]))
    return predictions


def _by_basename(ground_truth: Mapping[str, GroundTruthCamera]) -> Dict[str, Optional[GroundTruthCamera]]:
    """fname basename -> camera (None when two rows share the basename, so a basename match would be ambiguous)."""
    index: Dict[str, Optional[GroundTruthCamera]] = {}
    for fname, camera in ground_truth.items():
        name = os.path.basename(fname)
        index[name] = None if name in index else camera
    return index


def match_ground_truth(predictions: Sequence[Tuple[str, str]], ground_truth: Mapping[str, GroundTruthCamera],
                       predictions_name: str = "--predictions") -> List[Tuple[str, str, GroundTruthCamera]]:
    """Joins predictions with the ground truth: on the exact fname, else on the file name without folders (the
    published join is on ``<stem>.<suffix>``). Every prediction must find exactly one row.

    Raises:
        EvaluationInputError: Listing (up to five) prediction ids without a ground-truth row, or duplicate ids.
    """
    basenames = _by_basename(ground_truth)
    joined, missing, seen = [], [], set()
    for image_id, text in predictions:
        if image_id in seen:
            raise EvaluationInputError(f"{predictions_name}: id {image_id!r} appears twice")
        seen.add(image_id)
        truth = ground_truth.get(image_id) or basenames.get(os.path.basename(image_id))
        if truth is None:
            missing.append(image_id)
        else:
            joined.append((image_id, text, truth))
    if missing:
        raise EvaluationInputError(
            f"{predictions_name}: {len(missing)} of {len(predictions)} ids have no (unique) row in the ground truth, "
            f"e.g. {missing[:5]}; ids must equal a cameras.csv fname or its file name"
        )
    return joined


def evaluate_predictions(predictions: Sequence[Tuple[str, str]],
                         ground_truth: Mapping[str, GroundTruthCamera]) -> Tuple[Dict[str, float], List[ImageErrors]]:
    """Scores ``[(id, output_text)]`` against ``ground_truth``; returns (metrics, per-image errors)."""
    scored = [score_prediction(image_id, text, truth)
              for image_id, text, truth in match_ground_truth(predictions, ground_truth)]
    return summarize(scored), scored
