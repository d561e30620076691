"""Camera metrics (megatron_puffin.evaluation) and tools/evaluate_camera.py on hand-made predictions whose answers
are known: the fallback for text without a camera, the first triple, the portrait vFoV restore, AUC at exactly
1/5/10 degrees, and one-line errors for bad input."""
import csv
import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_puffin.evaluation import (
    EvaluationInputError,
    GroundTruthCamera,
    error_auc,
    evaluate_predictions,
    format_table,
    read_ground_truth,
    restore_portrait_vfov,
    score_prediction,
)

ROOT = Path(__file__).resolve().parents[2]
DEG = math.pi / 180


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("evaluate_camera", ROOT / "tools" / "evaluate_camera.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sentence(roll, pitch, vfov):
    return f"A room. The camera parameters (roll, pitch, and field-of-view) are: {roll:.4f}, {pitch:.4f}, {vfov:.4f}."


def test_text_without_a_triple_scores_as_the_published_fallback():
    truth = GroundTruthCamera("a.jpg", 0.1, -0.2, 1.0, 64, 64)
    for text in ("no numbers here", "integers 1, 2, 3 do not count", "only two: 0.1, 0.2"):
        scored = score_prediction("a.jpg", text, truth)
        assert scored.used_fallback
        assert tuple(scored.predicted) == (0.0, 0.0, 0.9163)
        assert scored.error("roll") == pytest.approx(0.1 / DEG, abs=1e-12)
        assert scored.error("pitch") == pytest.approx(0.2 / DEG, abs=1e-12)
        assert scored.error("vfov") == pytest.approx((1.0 - 0.9163) / DEG, abs=1e-12)


def test_the_first_triple_anywhere_in_the_text_is_the_prediction():
    truth = GroundTruthCamera("a.jpg", 0.0, 0.0, 1.0, 64, 64)
    scored = score_prediction("a.jpg", "<think>tilted</think> <answer>0.5000, -0.2500, 1.2000</answer> 0.1, 0.2, 0.3",
                              truth)
    assert not scored.used_fallback
    assert tuple(scored.predicted) == (0.5, -0.25, 1.2)
    assert scored.error("pitch") == pytest.approx(0.25 / DEG, abs=1e-12)


def test_portrait_vfov_is_restored_from_the_square_crop_and_landscape_is_not():
    vfov = 0.8
    assert restore_portrait_vfov(vfov, width=200, height=100) == vfov
    assert restore_portrait_vfov(vfov, width=100, height=100) == vfov
    restored = restore_portrait_vfov(vfov, width=100, height=300)
    assert math.tan(restored / 2) == pytest.approx(3 * math.tan(vfov / 2), rel=1e-12)
    portrait = score_prediction("p.jpg", sentence(0, 0, vfov), GroundTruthCamera("p.jpg", 0, 0, restored, 100, 300))
    assert portrait.vfov_restored and portrait.error("vfov") == pytest.approx(0.0, abs=1e-9)
    landscape = score_prediction("l.jpg", sentence(0, 0, vfov), GroundTruthCamera("l.jpg", 0, 0, vfov, 300, 100))
    assert not landscape.vfov_restored and landscape.error("vfov") == pytest.approx(0.0, abs=1e-9)


def test_auc_at_exactly_1_5_and_10_degrees():
    # Curve (0, 1/3) (1, 1/3) (5, 2/3) (10, 1): AUC@1 = 1/3, AUC@5 = (1/3 + 2) / 5, AUC@10 = (7/3 + 25/6) / 10.
    assert error_auc([10.0, 1.0, 5.0]) == pytest.approx([1 / 3, 7 / 15, 0.65], abs=1e-12)
    # An error exactly at the minimum error counts as exact; just above it does not.
    assert error_auc([1.0])[0] == 1.0
    assert error_auc([1.0 + 1e-9])[0] == 0.0
    # Everything within 1 degree: every AUC is 1. Everything above 10 degrees (or NaN): every AUC is 0.
    assert error_auc([0.0, 0.5, 1.0]) == [1.0, 1.0, 1.0]
    assert error_auc([10.5, float("nan"), float("inf")]) == [0.0, 0.0, 0.0]
    # One error at exactly 5: the curve reaches recall 1 at x = 5, AUC@5 = (0 + (5 - 1) * 1 / 2) / 5.
    assert error_auc([5.0]) == pytest.approx([0.0, 0.4, 0.7], abs=1e-12)


def _dense_auc(errors, threshold):
    """Independent check: integrate the recall curve on a fine grid (linear between its points up to t, then held
    flat at the last recall reached, as the published evaluation does)."""
    errors = np.sort(errors)
    n, k = errors.size, int(np.sum(errors <= 1.0))
    xs = np.concatenate([[0.0, 1.0], errors[k:]])
    ys = np.concatenate([[k / n, k / n], np.arange(k + 1, n + 1) / n])
    inside = xs <= threshold
    grid = np.linspace(0.0, threshold, 200001)
    return float(np.trapezoid(np.interp(grid, xs[inside], ys[inside]), grid) / threshold)


def test_auc_equals_dense_integration_of_the_recall_curve():
    errors = np.random.default_rng(0).exponential(4.0, size=50)
    for threshold, auc in zip((1, 5, 10), error_auc(errors)):
        assert auc == pytest.approx(_dense_auc(errors, threshold), abs=1e-6)


def test_summary_has_the_published_names_means_and_medians():
    truth = {name: GroundTruthCamera(name, 0.0, 0.0, 1.0, 64, 64) for name in ("a.jpg", "b.jpg", "c.jpg")}
    predictions = [("a.jpg", sentence(0.01, 0, 1)), ("b.jpg", sentence(0.02, 0, 1)), ("c.jpg", "nothing")]
    metrics, scored = evaluate_predictions(predictions, truth)
    names = {f"{stat}_{p}_error" for stat in ("mean", "median") for p in ("roll", "pitch", "vfov")}
    names |= {f"auc_{p}_error@{t}" for p in ("roll", "pitch", "vfov") for t in (1, 5, 10)}
    assert names | {"num_images", "num_fallback"} == set(metrics)
    assert metrics["median_roll_error"] == pytest.approx(0.01 / DEG, abs=1e-9)
    assert metrics["mean_roll_error"] == pytest.approx(0.01 / DEG, abs=1e-9)  # (0.01 + 0.02 + 0) / 3 rad
    assert metrics["median_vfov_error"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["mean_vfov_error"] == pytest.approx((1 - 0.9163) / DEG / 3, abs=1e-9)
    assert (metrics["num_images"], metrics["num_fallback"]) == (3, 1)
    assert "roll" in format_table(metrics)


def _write_gt(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fname", "roll", "pitch", "vfov", "yaw", "width", "height"])
        writer.writerows(rows)


def test_cli_writes_metrics_errors_csv_and_plot(tool, tmp_path, capsys):
    _write_gt(tmp_path / "cameras.csv", [("000000/a.jpg", 0.1, 0.0, 1.0, "", 96, 96),
                                         ("000000/b.jpg", 0.0, 0.2, restore_portrait_vfov(0.9, 50, 100), "", 50, 100)])
    # ids match on the file name without folders, as in the published join on '<stem>.<suffix>'
    (tmp_path / "pred.json").write_text(json.dumps([
        {"id": "a.jpg", "output_text": "I cannot tell.", "camera": None},
        {"id": "b.jpg", "output_text": sentence(0, 0.2, 0.9)},
    ]))
    code = tool.main(["--predictions", str(tmp_path / "pred.json"), "--ground-truth", str(tmp_path / "cameras.csv"),
                      "--output-dir", str(tmp_path / "out")])
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["median_roll_error"] == pytest.approx(0.05 / DEG, abs=1e-9)  # errors 0.1 rad and 0
    assert metrics["auc_pitch_error@1"] == 1.0
    assert metrics["auc_roll_error@1"] == 0.5 and metrics["num_fallback"] == 1
    rows = list(csv.DictReader(open(tmp_path / "out" / "errors.csv")))
    assert [row["id"] for row in rows] == ["a.jpg", "b.jpg"]
    assert [row["used_fallback"] for row in rows] == ["1", "0"] and rows[1]["vfov_restored"] == "1"
    assert float(rows[1]["vfov_error_deg"]) == pytest.approx(0.0, abs=1e-6)
    with Image.open(tmp_path / "out" / "errors.png") as image:
        assert image.format == "PNG" and image.size[0] > 500
    assert "AUC@5" in capsys.readouterr().out


@pytest.mark.parametrize("case, expected", [
    ("missing_predictions", "--predictions"),
    ("bad_json", "not valid JSON"),
    ("no_output_text", "'output_text'"),
    ("missing_column", "lacks the columns"),
    ("bad_number", "column 'pitch'"),
    ("unknown_id", r"no \(unique\) row"),
    ("binary_ground_truth", "is not a UTF-8 CSV file"),
    ("output_dir_under_a_file", "--output-dir .*cannot write the report"),
])
def test_cli_bad_input_is_one_line_error(tool, tmp_path, capsys, case, expected):
    _write_gt(tmp_path / "cameras.csv", [("a.jpg", 0.1, 0.0, 1.0, "", 96, 96)])
    predictions = [{"id": "a.jpg", "output_text": "x"}]
    if case == "missing_column":
        (tmp_path / "cameras.csv").write_text("fname,roll,pitch\na.jpg,0,0\n")
    if case == "bad_number":
        _write_gt(tmp_path / "cameras.csv", [("a.jpg", 0.1, "up", 1.0, "", 96, 96)])
    if case == "no_output_text":
        predictions = [{"id": "a.jpg", "text": "x"}]
    if case == "unknown_id":
        predictions = [{"id": "zzz.jpg", "output_text": "x"}]
    if case == "binary_ground_truth":  # e.g. the errors.png of an earlier report given by mistake
        (tmp_path / "cameras.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    out = tmp_path / "out"
    if case == "output_dir_under_a_file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    if case != "missing_predictions":
        (tmp_path / "p.json").write_text("[{" if case == "bad_json" else json.dumps(predictions))
    code = tool.main(["--predictions", str(tmp_path / "p.json"), "--ground-truth", str(tmp_path / "cameras.csv"),
                      "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and re.search(expected, err) and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_ground_truth_rejects_duplicates(tmp_path):
    _write_gt(tmp_path / "cameras.csv", [("a.jpg", 0, 0, 1, "", 9, 9), ("a.jpg", 0, 0, 1, "", 9, 9)])
    with pytest.raises(EvaluationInputError, match="appears twice"):
        read_ground_truth(tmp_path / "cameras.csv")


@pytest.mark.parametrize("row, message", [
    (("a.jpg", 2.0, 0.1, 60.0, "", 640, 480), r"line 2: camera roll \(2.0 rad\) must lie in \[-pi/2, pi/2\]"),
    (("a.jpg", 0.0, 0.1, 60.0, "", 640, 480), r"line 2: camera vfov \(60.0 rad\) must lie in the open interval"),
    (("a.jpg", 0.0, 0.0, 0.0, "", 640, 480), r"camera vfov \(0.0 rad\)"),
])
def test_ground_truth_angles_out_of_range_name_the_row_and_radians(tmp_path, row, message):
    """A cameras.csv in degrees (vfov 60) would otherwise score every image against a 60-radian camera."""
    _write_gt(tmp_path / "cameras.csv", [row])
    with pytest.raises(EvaluationInputError, match=message) as error:
        read_ground_truth(tmp_path / "cameras.csv")
    assert "must be in radians (from degrees: multiply by pi/180" in str(error.value)
