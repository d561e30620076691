#!/usr/bin/env python
"""Plot a run's per-task loss curves (and optionally learning rate and gradient norm) from its TensorBoard events.

    python tools/plot_metrics.py --tensorboard-dir runs/stage2/tb --output stage2_loss.png --smooth 20

Reads the event files written to ``pretrain_puffin.py --tensorboard-dir`` (every file in that directory, so a
resumed run is one curve; steps logged again after a restart replace the earlier values). Draws one line per
``loss/<task>`` scalar against the iteration and, below it, ``grad_norm`` (left axis) and ``learning_rate``
(right axis) when the run logged them. ``--smooth N`` draws an N-point trailing moving average over the faint raw
curve. Tasks are the task streams' names (``image2text_photography``, not the loss it trains under). A curve is
broken where its task did not run at a logged iteration (no line bridges the gap), and a task logged sparsely
(fewer than half of the logged iterations, or an isolated point) is drawn with markers. Validation results of
``--eval-interval`` runs are drawn too: ``valid_loss/<task>`` as dashed lines (with markers) in the colour of the
task's training loss, and the median camera errors ``valid_camera/<stream>/median_*`` in a panel of their own. Writes
a PNG of exactly ``--width`` x ``--height`` pixels.
"""
import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from megatron_puffin.process_lifetime import exit_quietly_while_starting

exit_quietly_while_starting(__name__, "plot_metrics.py")  # Ctrl-C while the libraries below load: one line

import numpy as np  # noqa: E402

LOSS_PREFIX = "loss/"
VALID_LOSS_PREFIX = "valid_loss/"
VALID_CAMERA_PREFIX = "valid_camera/"
OPTIMIZER_TAGS = ("grad_norm", "learning_rate")
DPI = 100
MAX_PIXELS = 10000
"""Largest --width / --height (a 10,000-pixel square figure takes about 400 MB to draw)."""
Series = Tuple[np.ndarray, np.ndarray]  # (iterations, values)


class UsageError(Exception):
    """A problem with the command line, reported as ``error: ...`` with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensorboard-dir", required=True, type=Path,
                        help="The run's --tensorboard-dir (the folder holding events.out.tfevents.* files).")
    parser.add_argument("--output", required=True, type=Path, help="Plot file to write: .png (default), .pdf, .svg or .jpg by its suffix (parent "
                             "folders are created).")
    parser.add_argument("--smooth", type=int, default=1,
                        help="Trailing moving average over this many logged points (default 1: no smoothing).")
    parser.add_argument("--no-optimizer-panel", action="store_true",
                        help="Draw only the loss panel, without grad_norm / learning_rate.")
    parser.add_argument("--width", type=int, default=1200, help="Image width in pixels (default 1200).")
    parser.add_argument("--height", type=int, default=800, help="Image height in pixels (default 800).")
    return parser


OUTPUT_FORMATS = {".png": "png", "": "png", ".pdf": "pdf", ".svg": "svg", ".jpg": "jpg", ".jpeg": "jpg"}
"""--output suffix -> matplotlib format."""


def check_args(args: argparse.Namespace) -> None:
    """Every command-line problem at once, each naming its flag and the fix."""
    problems = []
    if not args.tensorboard_dir.is_dir():
        problems.append(f"--tensorboard-dir {args.tensorboard_dir} is not a directory; pass the folder given to "
                        "pretrain_puffin.py --tensorboard-dir")
    if args.smooth < 1:
        problems.append(f"--smooth ({args.smooth}) must be at least 1 (1 = no smoothing)")
    for flag, value in (("--width", args.width), ("--height", args.height)):
        if not 100 <= value <= MAX_PIXELS:
            problems.append(f"{flag} ({value}) must be between 100 and {MAX_PIXELS} pixels")
    if args.output.suffix.lower() not in OUTPUT_FORMATS:
        # was a PNG under any name: an SVG viewer or a LaTeX \includegraphics of plot.pdf failed on the file
        problems.append(f"--output {args.output}: the format is chosen by the suffix, one of "
                        f"{', '.join(sorted(set(OUTPUT_FORMATS) - {''}))} (no suffix: PNG)")
    if args.output.is_dir():
        problems.append(f"--output {args.output} is a folder; give the path of the PNG to write")
    else:
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            problems.append(f"--output {args.output}: cannot create its folder ({error.strerror or error})")
    if problems:
        raise UsageError("\n  ".join(problems))


def read_scalars(directory: Path) -> Dict[str, Series]:
    """Every scalar tag of the event files in ``directory``: tag -> (iterations, values), sorted by iteration,
    one value per iteration (the last one written)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    # A resumed run's events hide those of the iterations it computed again (pretrain_puffin.py sets TensorBoard's
    # purge_step); the accumulator applies that and says so in a warning that blames "a TensorFlow restart".
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    accumulator = EventAccumulator(str(directory), size_guidance={SCALARS: 0})  # 0: keep every point
    accumulator.Reload()
    scalars = {}
    for tag in accumulator.Tags().get("scalars", []):
        by_step = {event.step: event.value for event in accumulator.Scalars(tag)}
        steps = np.array(sorted(by_step), dtype=np.int64)
        scalars[tag] = (steps, np.array([by_step[step] for step in steps], dtype=np.float64))
    return scalars


def event_subdirectories(directory: Path) -> List[Path]:
    """Folders below ``directory`` holding event files (for the error message when it has none itself)."""
    return sorted({path.parent for path in directory.rglob("events.out.tfevents.*") if path.parent != directory})


def loss_series(scalars: Dict[str, Series], directory: Path) -> Dict[str, Series]:
    """``{task: series}`` of the ``loss/<task>`` tags; a clear error when there are none."""
    losses = {tag[len(LOSS_PREFIX):]: series for tag, series in scalars.items() if tag.startswith(LOSS_PREFIX)}
    if losses:
        return dict(sorted(losses.items()))
    nested = event_subdirectories(directory)
    if nested:
        hint = "event files are in sub-folders; pass one of them as --tensorboard-dir: " + ", ".join(map(str, nested))
    elif scalars:
        hint = f"it has only the tags {sorted(scalars)}; was it written by pretrain_puffin.py?"
    else:
        hint = ("it holds no scalars; pass the folder given to pretrain_puffin.py --tensorboard-dir, after the run "
                "has logged at least once (every --log-interval iterations)")
    raise UsageError(f"--tensorboard-dir {directory} has no {LOSS_PREFIX}<task> scalars: {hint}")


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` points (fewer at the start), same length as ``values``."""
    if window <= 1 or values.size == 0:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, values.size + 1), window)
    return (sums[1:] - sums[np.arange(1, values.size + 1) - counts]) / counts


def plot_series(axis, steps: np.ndarray, values: np.ndarray, label: Optional[str], color, smooth: int,
                marker: Optional[str] = None) -> None:
    style = {"marker": marker, "markersize": 4} if marker else {}
    if smooth > 1:
        axis.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        axis.plot(steps, moving_average(values, smooth), color=color, linewidth=1.6, label=label, **style)
    else:
        axis.plot(steps, values, color=color, linewidth=1.4, label=label, **style)


def logged_iterations(scalars: Dict[str, Series]) -> np.ndarray:
    """Every iteration at which the run logged anything (the grid a task's gaps are measured on)."""
    steps = [series[0] for series in scalars.values()]
    return np.unique(np.concatenate(steps)) if steps else np.zeros(0, dtype=np.int64)


def runs_of(series: Series, grid: np.ndarray) -> List[Series]:
    """A task's points split where it skipped a logged iteration of ``grid``: consecutive runs, each drawn as its
    own line so that no line bridges iterations where the task did not run."""
    steps, values = series
    if steps.size == 0:
        return []
    positions = np.searchsorted(grid, steps)
    breaks = np.nonzero(np.diff(positions) > 1)[0] + 1
    return list(zip(np.split(steps, breaks), np.split(values, breaks)))


def is_sparse(series: Series, grid: np.ndarray) -> bool:
    """Logged at fewer than half of the logged iterations (or only a few times): drawn with markers."""
    count = series[0].size
    return count <= 3 or count < 0.5 * grid.size


def valid_losses(scalars: Dict[str, Series]) -> Dict[str, Series]:
    """``{task: series}`` of the validation losses ``valid_loss/<task>``."""
    return {tag[len(VALID_LOSS_PREFIX):]: series for tag, series in sorted(scalars.items())
            if tag.startswith(VALID_LOSS_PREFIX)}


def camera_series(scalars: Dict[str, Series]) -> Dict[str, Series]:
    """``{"<stream> <parameter>": series}`` of the validation median camera errors (degrees)."""
    series = {}
    for tag, values in sorted(scalars.items()):
        if tag.startswith(VALID_CAMERA_PREFIX) and "/median_" in tag:
            stream, name = tag[len(VALID_CAMERA_PREFIX):].rsplit("/", 1)
            series[f"{stream} {name[len('median_'):-len('_error')]}"] = values
    return series


def draw_losses(axis, losses: Dict[str, Series], smooth: int, grid: Optional[np.ndarray] = None,
                valid: Optional[Dict[str, Series]] = None) -> None:
    valid = valid or {}
    tasks = list(losses) + [task for task in valid if task not in losses]
    colors = dict(zip(tasks, _colors(len(tasks))))
    grid = logged_iterations(losses) if grid is None else grid
    for task, series in losses.items():
        sparse = is_sparse(series, grid)
        for index, (steps, values) in enumerate(runs_of(series, grid)):
            marker = "o" if sparse or steps.size == 1 else None
            plot_series(axis, steps, values, task if index == 0 else None, colors[task], smooth, marker)
    for task, (steps, values) in valid.items():
        axis.plot(steps, values, color=colors[task], linestyle="--", marker="o", markersize=3, linewidth=1.2,
                  label=f"{task} (validation)")
    title = "loss per task" + (f" ({smooth}-point moving average)" if smooth > 1 else "")
    axis.set_title(title)
    axis.set_ylabel("loss")
    axis.grid(True, alpha=0.3)
    axis.legend(loc="upper right", fontsize="small")


def draw_optimizer(axis, scalars: Dict[str, Series], smooth: int) -> None:
    """``grad_norm`` on the left axis, ``learning_rate`` on a twin right axis."""
    handles = []
    if "grad_norm" in scalars:
        plot_series(axis, *scalars["grad_norm"], "grad_norm", "tab:red", smooth)
        axis.set_ylabel("grad norm")
        handles += axis.get_legend_handles_labels()[0]
    if "learning_rate" in scalars:
        twin = axis.twinx() if "grad_norm" in scalars else axis
        twin.plot(*scalars["learning_rate"], color="tab:blue", linewidth=1.4, label="learning_rate")
        twin.set_ylabel("learning rate")
        twin.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        handles += twin.get_legend_handles_labels()[0][-1:]
    axis.legend(handles=handles, loc="upper right", fontsize="small")
    axis.grid(True, alpha=0.3)


def draw_camera(axis, series: Dict[str, Series]) -> None:
    """Validation median camera errors (degrees) per stream and parameter."""
    for (label, (steps, values)), color in zip(series.items(), _colors(len(series))):
        axis.plot(steps, values, color=color, marker="o", markersize=3, linewidth=1.2, label=label)
    axis.set_title("validation: median camera error")
    axis.set_ylabel("degrees")
    axis.grid(True, alpha=0.3)
    axis.legend(loc="upper right", fontsize="small")


def _colors(count: int) -> List:
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[index % len(cycle)] for index in range(count)]


def render(scalars: Dict[str, Series], losses: Dict[str, Series], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    optimizer = not args.no_optimizer_panel and any(tag in scalars for tag in OPTIMIZER_TAGS)
    camera = camera_series(scalars)
    panels = ["losses"] + (["optimizer"] if optimizer else []) + (["camera"] if camera else [])
    figure, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False,
                                figsize=(args.width / DPI, args.height / DPI),
                                gridspec_kw={"height_ratios": [2] + [1] * (len(panels) - 1)})
    draw_losses(axes[0, 0], losses, args.smooth, logged_iterations(scalars), valid_losses(scalars))
    if optimizer:
        draw_optimizer(axes[panels.index("optimizer"), 0], scalars, args.smooth)
    if camera:
        draw_camera(axes[panels.index("camera"), 0], camera)
    axes[-1, 0].set_xlabel("iteration")
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + ".partial")
    try:  # whole or not at all: a full disk must not leave a cut PNG where the plot was
        figure.savefig(partial, dpi=DPI, format=OUTPUT_FORMATS[args.output.suffix.lower()])
        os.replace(partial, args.output)
    except BaseException:  # also Ctrl-C
        partial.unlink(missing_ok=True)
        raise
    finally:
        plt.close(figure)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        scalars = read_scalars(args.tensorboard_dir)
        losses = loss_series(scalars, args.tensorboard_dir)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        render(scalars, losses, args)
    except OSError as error:  # a full disk, a lost mount
        print(f"error: writing --output {args.output} failed ({error.strerror or error})", file=sys.stderr)
        return 1
    last = max(int(steps[-1]) for steps, _ in losses.values())
    extra = "".join(f"; {what} {', '.join(names)}" for what, names in
                    (("validation", list(valid_losses(scalars))), ("camera errors", list(camera_series(scalars))))
                    if names)
    print(f"wrote {args.output} ({', '.join(losses)}; up to iteration {last}{extra})")
    return 0


if __name__ == "__main__":
    from megatron_puffin.process_lifetime import exit_on_ctrl_c, exit_process

    exit_process(exit_on_ctrl_c("plot_metrics.py", main,
                            "no plot was written or replaced: run the same command again"))
