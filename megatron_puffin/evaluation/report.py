"""Writing camera-evaluation results: ``metrics.json``, per-image ``errors.csv``, an error-distribution plot and a
printable table."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from megatron_puffin.evaluation.camera_metrics import AUC_THRESHOLDS, PARAMETERS, ImageErrors

METRICS_FILE = "metrics.json"
ERRORS_FILE = "errors.csv"
PLOT_FILE = "errors.png"
ERROR_COLUMNS = ("id", "fname", *(f"{kind}_{p}" for kind in ("pred", "gt") for p in PARAMETERS),
                 *(f"{p}_error_deg" for p in PARAMETERS), "used_fallback", "vfov_restored")


def write_metrics(metrics: Dict[str, float], path: os.PathLike) -> None:
    Path(path).write_text(json.dumps(metrics, indent=1) + "\n")


def write_errors_csv(scored: Sequence[ImageErrors], path: os.PathLike) -> None:
    """One row per image: predicted and ground-truth angles (radians), errors (degrees), fallback and restore flags."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(ERROR_COLUMNS)
        for image in scored:
            writer.writerow([image.id, image.fname, *image.predicted, *image.ground_truth,
                             *(f"{image.error(p):.6f}" for p in PARAMETERS), int(image.used_fallback),
                             int(image.vfov_restored)])


def format_table(metrics: Dict[str, float], title: str = "") -> str:
    """A fixed-width table: one row per parameter with mean / median error (deg) and AUC@1/5/10 (%)."""
    header = f"{'':6s} {'mean':>8s} {'median':>8s} " + " ".join(f"{'AUC@' + str(t):>7s}" for t in AUC_THRESHOLDS)
    lines = ([title] if title else []) + [header]
    for parameter in PARAMETERS:
        aucs = " ".join(f"{100 * metrics[f'auc_{parameter}_error@{t}']:6.1f}%" for t in AUC_THRESHOLDS)
        lines.append(f"{parameter:6s} {metrics[f'mean_{parameter}_error']:7.2f}° "
                     f"{metrics[f'median_{parameter}_error']:7.2f}° {aucs}")
    lines.append(f"{int(metrics['num_images'])} images, {int(metrics['num_fallback'])} without a parsable camera "
                 "(scored as the fallback 0, 0, 0.9163)")
    return "\n".join(lines)


def plot_errors(scored: Sequence[ImageErrors], path: os.PathLike, title: str = "") -> None:
    """One panel per parameter: the recall-vs-error curve (share of images within x degrees) and a histogram of the
    errors, with the AUC thresholds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PARAMETERS), figsize=(13, 4), squeeze=False)
    for axis, parameter in zip(axes[0], PARAMETERS):
        errors = np.sort(np.array([image.error(parameter) for image in scored]))
        finite = errors[np.isfinite(errors)]
        limit = max(AUC_THRESHOLDS[-1] * 1.5, float(np.percentile(finite, 95)) * 1.1 if finite.size else 0.0)
        bins = np.linspace(0.0, limit, 31)
        histogram = axis.twinx()
        histogram.hist(np.clip(finite, 0, limit), bins=bins, color="tab:gray", alpha=0.35)
        histogram.set_ylabel("images")
        recall = np.arange(1, errors.size + 1) / errors.size
        axis.step(np.concatenate([[0.0], errors]), np.concatenate([[0.0], recall]), where="post",
                  color="tab:blue", linewidth=1.6, label="share of images within x deg")
        for threshold in AUC_THRESHOLDS:
            axis.axvline(threshold, color="tab:red", linewidth=0.8, linestyle=":")
        axis.set_xlim(0.0, limit)
        axis.set_ylim(0.0, 1.0)
        axis.set_zorder(histogram.get_zorder() + 1)
        axis.patch.set_visible(False)
        axis.set_title(f"{parameter}: median {np.median(errors):.2f} deg")
        axis.set_xlabel("error (deg)")
        axis.set_ylabel("share of images")
        axis.grid(True, alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)


def write_report(metrics: Dict[str, float], scored: Sequence[ImageErrors], output_dir: os.PathLike,
                 title: str = "") -> List[Path]:
    """Writes metrics.json, errors.csv and errors.png into ``output_dir`` (created); returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / METRICS_FILE, output_dir / ERRORS_FILE, output_dir / PLOT_FILE]
    write_metrics(metrics, paths[0])
    write_errors_csv(scored, paths[1])
    plot_errors(scored, paths[2], title)
    return paths

