"""Reading the Puffin-4M folder layout (docs/puffin.md §3.1, §3.2) into typed :class:`~.format.PuffinRecord` values.

Layout below the input root (every subset optional except that at least one must exist)::

    summary.json | summary/*.json                 main subset: records {image, annotation[, camera]}
    local_folder/  cap_folder/  [cap_folder_cot/]  (cam_folder/ is ignored: camera maps are computed)
    cross_view/{summary.json, local_folder, local_folder_init, cap_folder, cap_folder_scene, cap_folder_cam}
    photography/{summary.json, local_folder, cap_folder}

Every sample problem is reported as a :class:`BadSample` with a reason from :data:`BAD_SAMPLE_REASONS`, the path
of the offending file and a detail message; nothing is ever written into the input tree.
"""
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from megatron_puffin.camera import CAMERA_SENTENCE_PREFIX, YAW_SENTENCE_PREFIX, CameraError, split_caption
from megatron_puffin.camera import split_thinking_caption
from megatron_puffin.data.format import PuffinRecord
from megatron_puffin.data.images import ImageError, decode_image, geometry_problem, limit_size
from megatron_puffin.files import read_text

logger = logging.getLogger(__name__)

BAD_SAMPLE_REASONS: Dict[str, str] = {
    "bad_record": "summary record is not an object with the required string keys",
    "duplicate_record": "summary record repeats an earlier record's annotation (the same sample twice)",
    "path_outside_input": "summary record points outside its subset folder (absolute path or '..')",
    "image_missing": "image file does not exist",
    "image_empty": "image file has zero bytes",
    "image_unreadable": "image cannot be decoded completely (truncated or corrupt)",
    "image_unsupported": "image pixels are floating-point or 32-bit integers (no faithful 8-bit reading)",
    "image_too_small": "image width or height <= 80 pixels (docs/puffin.md §3.5)",
    "image_bad_aspect": "image aspect ratio outside (0.1, 10) (docs/puffin.md §3.5)",
    "init_image_missing": "cross-view initial view does not exist",
    "init_image_empty": "cross-view initial view has zero bytes",
    "init_image_unreadable": "cross-view initial view cannot be decoded completely",
    "init_image_unsupported": "cross-view initial view pixels are floating-point or 32-bit integers",
    "init_image_too_small": "cross-view initial view side <= 80 pixels",
    "init_image_bad_aspect": "cross-view initial view aspect ratio outside (0.1, 10)",
    "caption_missing": "caption JSON file does not exist",
    "caption_bad_json": "caption file is not JSON with a string 'caption'",
    "caption_empty": "caption text is empty",
    "camera_unparsable": "camera sentence missing or malformed",
    "camera_non_finite": "camera values are NaN or infinite",
    "camera_out_of_range": "camera values outside the valid ranges",
    "camera_yaw_missing": "cross-view caption or camera text without its yaw sentence",
}
"""Reason key -> meaning, for every way a source sample can be rejected."""


RECORD_REASONS = ("bad_record", "path_outside_input")  # the summary record itself is bad: no file to name


class BadSample(Exception):
    """A source sample that cannot be used.

    Attributes:
        reason: Key of :data:`BAD_SAMPLE_REASONS`.
        path: The offending file (the subset directory for a bad summary record, :data:`RECORD_REASONS`).
        detail: Human-readable explanation.
    """

    def __init__(self, reason: str, path: Path, detail: str):
        assert reason in BAD_SAMPLE_REASONS, reason
        super().__init__(f"{path}: {reason} ({detail})")
        self.reason, self.path, self.detail = reason, str(path), detail

    def __reduce__(self):
        # exceptions are pickled as cls(*args) by default; worker processes send these back to the parent
        return (BadSample, (self.reason, self.path, self.detail))


@dataclass(frozen=True)
class SubsetLayout:
    """Where one subset's files live, relative to its directory.

    Attributes:
        name: Subset name ("main", "cross_view", "photography").
        directory: The subset directory.
        caption_folders: Role -> folder name, roles among "caption", "cot", "scene", "camera".
        init_folder: Folder of cross-view initial views, or None.
    """

    name: str
    directory: Path
    caption_folders: Dict[str, str] = field(default_factory=dict)
    init_folder: Optional[str] = None
    image_folder: str = "local_folder"


def _summary_files(directory: Path) -> List[Path]:
    for candidate in (directory / "summary.json", directory / "summary"):
        if candidate.is_file():
            return [candidate]
        if candidate.is_dir():
            return sorted(candidate.glob("*.json"))
    return []


def discover_subsets(root: Path) -> List[SubsetLayout]:
    """The subsets present under a Puffin-4M ``training_data`` root (a subset needs a summary)."""
    root = Path(root)
    candidates = [
        SubsetLayout("main", root, {"caption": "cap_folder", "cot": "cap_folder_cot"}),
        SubsetLayout(
            "cross_view",
            root / "cross_view",
            {"caption": "cap_folder", "scene": "cap_folder_scene", "camera": "cap_folder_cam"},
            init_folder="local_folder_init",
        ),
        SubsetLayout("photography", root / "photography", {"answer": "cap_folder"}),
    ]
    found = []
    for layout in candidates:
        if not _summary_files(layout.directory):
            continue
        present = {role: name for role, name in layout.caption_folders.items() if (layout.directory / name).is_dir()}
        required = [layout.image_folder, layout.caption_folders.get("caption") or layout.caption_folders["answer"]]
        required += [layout.init_folder] if layout.init_folder else []
        missing = [name for name in required if not (layout.directory / name).is_dir()]
        if missing:
            raise ValueError(f"{layout.name} subset at {layout.directory} has a summary but lacks folders {missing}")
        found.append(SubsetLayout(layout.name, layout.directory, present, layout.init_folder, layout.image_folder))
    return found


def load_summary(layout: SubsetLayout) -> List[Any]:
    """All summary records of a subset, in file order (a summary directory's files sorted by name).

    Raises:
        ValueError: If a summary file is not a JSON list (a broken summary is a broken dataset, not a bad sample).
    """
    records: List[Any] = []
    for path in _summary_files(layout.directory):
        try:
            items = json.loads(read_text(path))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"summary file {path} is not valid JSON: {error}") from error
        if not isinstance(items, list):
            raise ValueError(f"summary file {path} must hold a JSON list of records, got {type(items).__name__}")
        records.extend(items)
    return records


@dataclass(frozen=True)
class DuplicateRecord:
    """A summary record whose annotation an earlier record of the subset already has (see :func:`mark_duplicates`)."""

    record: Any
    index: int
    first_index: int


def mark_duplicates(items: List[Any]) -> Tuple[List[Any], int]:
    """Wraps every record that repeats an earlier record's annotation in :class:`DuplicateRecord` (rejected as
    ``duplicate_record`` by :func:`build_record`); record positions, and so shard ranges, are unchanged.

    Returns:
        The records and the number of duplicates.
    """
    first: Dict[str, int] = {}
    marked, count = [], 0
    for index, item in enumerate(items):
        annotation = item.get("annotation") if isinstance(item, dict) else None
        if isinstance(annotation, str) and annotation in first:
            marked.append(DuplicateRecord(item, index, first[annotation]))
            count += 1
            continue
        if isinstance(annotation, str):
            first[annotation] = index
        marked.append(item)
    return marked, count


def _record_path(layout: SubsetLayout, record: Any, key: str) -> str:
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, str) or not value:
        raise BadSample("bad_record", layout.directory, f"record {str(record)[:200]!r} lacks a string {key!r}")
    if Path(value).is_absolute() or ".." in Path(value).parts:
        raise BadSample("path_outside_input", layout.directory, f"{key} {value!r} leaves the subset folder")
    return value


def read_caption(path: Path, reason_prefix: str = "caption") -> str:
    """The stripped ``caption`` string of a caption JSON file.

    Raises:
        BadSample: ``caption_missing``, ``caption_bad_json`` or ``caption_empty``.
    """
    try:
        payload = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise BadSample(f"{reason_prefix}_missing", path, "no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadSample(f"{reason_prefix}_bad_json", path, str(error)) from None
    text = payload.get("caption") if isinstance(payload, dict) else None
    if not isinstance(text, str):
        raise BadSample(f"{reason_prefix}_bad_json", path, "no string value under key 'caption'")
    text = text.strip()
    if not text:
        raise BadSample(f"{reason_prefix}_empty", path, "empty caption")
    return text


_TRIPLE_TOKENS = re.compile(r"^\s*([^,\s]+)\s*,\s*([^,\s]+)\s*,\s*([^,\s]+?)\s*\.?\s*$")


def _camera_reason(text: str, error: CameraError) -> Tuple[str, str]:
    """Tells an unparsable camera sentence from one holding non-finite or out-of-range numbers."""
    if CAMERA_SENTENCE_PREFIX in text:
        tail = text.split(CAMERA_SENTENCE_PREFIX)[-1].split(YAW_SENTENCE_PREFIX)[0]
        match = _TRIPLE_TOKENS.match(tail)
        if match:
            try:
                numbers = [float(token) for token in match.groups()]
            except ValueError:
                numbers = None
            if numbers is not None:
                if not all(math.isfinite(number) for number in numbers):
                    return "camera_non_finite", f"camera values {match.groups()}"
                return "camera_out_of_range", str(error)
    return "camera_unparsable", str(error)


def parse_caption_camera(text: str, path: Path):
    """(description, Camera) of a base or cross-view caption, else :class:`BadSample` with the precise reason."""
    try:
        return split_caption(text)
    except CameraError as error:
        reason, detail = _camera_reason(text, error)
        raise BadSample(reason, path, detail) from None


def read_image(path: Path, max_image_size: Optional[int], reason_prefix: str = "image") -> bytes:
    """Reads, fully decodes and checks one image; returns its bytes (downscaled+re-encoded if above the limit)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadSample(f"{reason_prefix}_missing", path, "no such file") from None
    try:
        image = decode_image(data)
    except ImageError as error:
        reason = error.reason.replace("image", reason_prefix, 1)
        raise BadSample(reason, path, error.detail) from None
    problem = geometry_problem(image.width, image.height)
    if problem:
        raise BadSample(problem[0].replace("image", reason_prefix, 1), path, problem[1])
    return limit_size(image, data, max_image_size)


def _caption_file(layout: SubsetLayout, role: str, annotation: str) -> Path:
    return layout.directory / layout.caption_folders[role] / annotation


def _main_record(layout: SubsetLayout, annotation: str, record: PuffinRecord) -> None:
    caption_path = _caption_file(layout, "caption", annotation)
    record.caption, record.camera = parse_caption_camera(read_caption(caption_path), caption_path)
    if "cot" in layout.caption_folders:
        cot_path = _caption_file(layout, "cot", annotation)
        cot_text = read_caption(cot_path)
        try:
            record.reasoning = split_thinking_caption(cot_text)[0]
        except CameraError as error:
            raise BadSample(_camera_reason(cot_text, error)[0], cot_path, str(error)) from None


def _cross_view_camera(path: Path):
    """(description, Camera) of a cross-view text, whose camera sentence must be followed by the yaw sentence."""
    description, camera = parse_caption_camera(read_caption(path), path)
    if camera.yaw is None:
        raise BadSample("camera_yaw_missing", path, f"a cross-view target needs '{YAW_SENTENCE_PREFIX} Y.' after "
                        "its camera sentence (Y in radians, [0, 2*pi))")
    return description, camera


def _cross_view_record(layout: SubsetLayout, annotation: str, record: PuffinRecord) -> None:
    record.caption, record.camera = _cross_view_camera(_caption_file(layout, "caption", annotation))
    if "camera" in layout.caption_folders:
        record.camera = _cross_view_camera(_caption_file(layout, "camera", annotation))[1]
    if "scene" in layout.caption_folders:
        record.scene = read_caption(_caption_file(layout, "scene", annotation))


def build_record(layout: SubsetLayout, record: Any, max_image_size: Optional[int] = None) -> PuffinRecord:
    """Reads and validates one summary record of a subset into a typed record.

    Args:
        layout: The subset.
        record: One summary entry (dict with ``image``, ``annotation`` and, for cross-view, ``image_init``).
        max_image_size: Downscale images whose longest side exceeds this (None keeps the source bytes).

    Raises:
        BadSample: With the reason, the offending path and details.
    """
    if isinstance(record, DuplicateRecord):
        raise BadSample("duplicate_record", layout.directory,
                        f"record {record.index} repeats the annotation of record {record.first_index}")
    annotation = _record_path(layout, record, "annotation")
    image_rel = _record_path(layout, record, "image")
    result = PuffinRecord(key=f"{layout.name}/{annotation}")
    if layout.name == "main":
        _main_record(layout, annotation, result)
    elif layout.name == "cross_view":
        _cross_view_record(layout, annotation, result)
    else:
        result.answer = read_caption(_caption_file(layout, "answer", annotation))
    result.image = read_image(layout.directory / layout.image_folder / image_rel, max_image_size)
    if layout.init_folder is not None:
        init_rel = _record_path(layout, record, "image_init")
        result.image_init = read_image(layout.directory / layout.init_folder / init_rel, max_image_size, "init_image")
    return result
