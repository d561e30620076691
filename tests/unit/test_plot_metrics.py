"""tools/plot_metrics.py on real TensorBoard event files: the PNG, its size, smoothing, and the error messages."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.faults import file_size_limit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("plot_metrics", ROOT / "tools" / "plot_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(directory: Path, tasks=("image2text", "cam2image"), steps=range(1, 41), optimizer=True, start=0):
    """Scalars under the tag names the training loop writes."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(directory))
    for step in steps:
        for index, task in enumerate(tasks):
            writer.add_scalar(f"loss/{task}", start + (index + 1) * 2.0 / step, step)
            writer.add_scalar(f"consumed_samples/{task}", 4 * step, step)
        if optimizer:
            writer.add_scalar("learning_rate", 1e-4 * min(1.0, step / 10), step)
            writer.add_scalar("grad_norm", 1.0 / step, step)
        writer.add_scalar("tflops", 0.5, step)
    writer.close()


def test_plots_two_tasks_to_a_png_of_the_requested_size(tool, tmp_path, capsys):
    write_run(tmp_path / "tb")
    output = tmp_path / "plots" / "loss.png"
    code = tool.main(["--tensorboard-dir", str(tmp_path / "tb"), "--output", str(output), "--smooth", "5",
                      "--width", "900", "--height", "600"])
    assert code == 0
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == (900, 600)
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # curves and axes were drawn, not a blank canvas
    assert "(cam2image, image2text; up to iteration 40)" in capsys.readouterr().out


def test_reads_every_tag_and_the_loss_panel_alone(tool, tmp_path):
    write_run(tmp_path / "tb", optimizer=False)
    scalars = tool.read_scalars(tmp_path / "tb")
    assert {"loss/image2text", "loss/cam2image", "consumed_samples/image2text", "tflops"} <= set(scalars)
    steps, values = scalars["loss/cam2image"]
    assert steps.tolist() == list(range(1, 41)) and values[0] == pytest.approx(4.0)
    assert tool.main(["--tensorboard-dir", str(tmp_path / "tb"), "--output", str(tmp_path / "a.png")]) == 0
    assert Image.open(tmp_path / "a.png").size == (1200, 800)


def test_a_resumed_run_is_one_curve_with_the_rewritten_steps(tool, tmp_path):
    write_run(tmp_path / "tb", steps=range(1, 31))
    write_run(tmp_path / "tb", steps=range(21, 41), start=10.0)  # restart from a checkpoint at iteration 20
    steps, values = tool.read_scalars(tmp_path / "tb")["loss/image2text"]
    assert steps.tolist() == list(range(1, 41))
    assert values[19] == pytest.approx(2.0 / 20) and values[20] == pytest.approx(10.0 + 2.0 / 21)


def test_moving_average_is_trailing_with_a_short_start(tool):
    smoothed = tool.moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2)
    np.testing.assert_allclose(smoothed, [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(tool.moving_average(np.arange(5.0), 1), np.arange(5.0))


def test_missing_directory_fails_naming_the_flag_and_the_fix(tool, tmp_path, capsys):
    code = tool.main(["--tensorboard-dir", str(tmp_path / "nope"), "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code != 0 and "--tensorboard-dir" in err and "pretrain_puffin.py --tensorboard-dir" in err
    assert not (tmp_path / "x.png").exists()


def test_directory_without_loss_tags_fails_naming_the_flag_and_the_fix(tool, tmp_path, capsys):
    write_run(tmp_path / "tb", tasks=())
    code = tool.main(["--tensorboard-dir", str(tmp_path / "tb"), "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code != 0 and "--tensorboard-dir" in err and "no loss/<task> scalars" in err
    assert "grad_norm" in err  # names what it did find
    (tmp_path / "empty").mkdir()
    assert tool.main(["--tensorboard-dir", str(tmp_path / "empty"), "--output", str(tmp_path / "x.png")]) != 0
    assert "--log-interval" in capsys.readouterr().err


def test_events_in_a_sub_folder_are_pointed_out(tool, tmp_path, capsys):
    write_run(tmp_path / "runs" / "stage1")
    assert tool.main(["--tensorboard-dir", str(tmp_path / "runs"), "--output", str(tmp_path / "x.png")]) != 0
    assert str(tmp_path / "runs" / "stage1") in capsys.readouterr().err


def test_bad_smoothing_and_size_are_reported_together(tool, tmp_path, capsys):
    write_run(tmp_path / "tb")
    code = tool.main(["--tensorboard-dir", str(tmp_path / "tb"), "--output", str(tmp_path / "x.png"),
                      "--smooth", "0", "--width", "10"])
    err = capsys.readouterr().err
    assert code != 0 and "--smooth (0)" in err and "--width (10)" in err


def test_an_output_that_cannot_be_drawn_or_written_is_named_before_reading(tool, tmp_path, capsys):
    """A figure too large to allocate, an --output that is a folder or lies under a file: errors, not tracebacks."""
    write_run(tmp_path / "tb")
    (tmp_path / "file").write_text("")
    for output, extra, message in ((tmp_path / "x.png", ["--height", "100000"], "--height (100000) must be between"),
                                   (tmp_path, [], "is a folder; give the path of the PNG"),
                                   (tmp_path / "file" / "x.png", [], "cannot create its folder")):
        code = tool.main(["--tensorboard-dir", str(tmp_path / "tb"), "--output", str(output), *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and message in err, err


def test_sparse_tasks_get_markers_and_curves_do_not_bridge_iterations_a_task_skipped(tool, tmp_path):
    """A stream logged once or sparsely (photography: 1 micro-batch in a long cycle) is visible as markers, and a
    task that did not run for a while is drawn as separate lines, not one line across the gap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    for step in range(1, 41):
        writer.add_scalar("loss/image2text_cross_view", 3.0 / step, step)
        writer.add_scalar("learning_rate", 1e-4, step)
        if step <= 10 or step > 20:
            writer.add_scalar("loss/image2image", 2.0 / step, step)
        if step in (10, 30):
            writer.add_scalar("loss/image2text_photography", 1.0, step)
    writer.close()
    scalars = tool.read_scalars(tmp_path / "tb")
    losses = tool.loss_series(scalars, tmp_path / "tb")
    figure, axis = plt.subplots()
    try:
        tool.draw_losses(axis, losses, smooth=1, grid=tool.logged_iterations(scalars))
        lines = {}
        for line in axis.get_lines():
            lines.setdefault(line.get_color(), []).append(line)
        by_task = {text.get_text(): handle.get_color()
                   for handle, text in zip(axis.get_legend().legend_handles, axis.get_legend().get_texts())}
    finally:
        plt.close(figure)
    assert set(by_task) == {"image2image", "image2text_cross_view", "image2text_photography"}
    full = lines[by_task["image2text_cross_view"]]
    assert len(full) == 1 and full[0].get_xdata().tolist() == list(range(1, 41)) and full[0].get_marker() == "None"
    gap = lines[by_task["image2image"]]
    assert [line.get_xdata().tolist() for line in gap] == [list(range(1, 11)), list(range(21, 41))]
    sparse = lines[by_task["image2text_photography"]]
    assert [line.get_xdata().tolist() for line in sparse] == [[10], [30]]
    assert all(line.get_marker() == "o" for line in sparse)
def test_validation_losses_and_camera_errors_are_drawn(tool, tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    write_run(tmp_path / "tb")
    plain = tmp_path / "plain.png"
    assert tool.main(["--tensorboard-dir", str(tmp_path / "tb"), "--output", str(plain)]) == 0
    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    for step in (10, 20, 30, 40):  # what --eval-interval 10 writes
        writer.add_scalar("valid_loss/image2text", 3.0 / step, step)
        for parameter in ("roll", "pitch", "vfov"):
            writer.add_scalar(f"valid_camera/image2text/median_{parameter}_error", 40.0 / step, step)
        writer.add_scalar("valid_camera/image2text/num_images", 8, step)
    writer.close()
    scalars = tool.read_scalars(tmp_path / "tb")
    assert list(tool.valid_losses(scalars)) == ["image2text"]
    assert sorted(tool.camera_series(scalars)) == ["image2text pitch", "image2text roll", "image2text vfov"]
    output = tmp_path / "valid.png"
    assert tool.main(["--tensorboard-dir", str(tmp_path / "tb"), "--output", str(output)]) == 0
    assert "validation image2text; camera errors image2text pitch" in capsys.readouterr().out
    with Image.open(output) as image, Image.open(plain) as reference:
        assert image.size == reference.size == (1200, 800)
        assert np.abs(np.asarray(image, dtype=float) - np.asarray(reference, dtype=float)).mean() > 1.0


def test_a_full_disk_is_one_line_and_leaves_no_cut_png(tool, tmp_path, capsys):
    """A write that fails (ENOSPC; here EFBIG from a per-file size limit below the PNG): one line, exit 1, and
    no partial file where the plot (or a previous one) was."""
    write_run(tmp_path / "tb")
    output = tmp_path / "loss.png"
    output.write_bytes(b"the previous plot")
    with file_size_limit(2_000):
        code = tool.main(["--tensorboard-dir", str(tmp_path / "tb"), "--output", str(output)])
    assert code == 1
    assert capsys.readouterr().err.strip() == f"error: writing --output {output} failed (File too large)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "tb"]
    assert output.read_bytes() == b"the previous plot"


def test_the_suffix_of_output_chooses_the_format(tool, tmp_path, capsys):
    """Every --output was a PNG whatever its name: plot.svg and plot.pdf did not open as what they claimed to be."""
    write_run(tmp_path / "tb", optimizer=False)
    heads = {"plot.png": b"\x89PNG", "plot": b"\x89PNG", "plot.pdf": b"%PDF", "plot.JPG": b"\xff\xd8\xff",
             "plot.svg": b"<?xml"}
    for name, head in heads.items():
        assert tool.main(["--tensorboard-dir", str(tmp_path / "tb"), "--output", str(tmp_path / name)]) == 0
        assert (tmp_path / name).read_bytes().startswith(head), name
    capsys.readouterr()
    assert tool.main(["--tensorboard-dir", str(tmp_path / "tb"), "--output", str(tmp_path / "plot.gif")]) == 2
    assert "plot.gif: the format is chosen by the suffix, one of .jpeg, .jpg, .pdf, .png, .svg" in capsys.readouterr().err
    assert not (tmp_path / "plot.gif").exists()
