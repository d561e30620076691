"""--metrics-file writes that fail (the directory removed, a full disk, a lost mount) are logged and counted, and
training goes on: the next line is tried again and says how many were lost (megatron_puffin/training/metrics.py)."""
import json
import logging
import shutil

from helpers.faults import file_size_limit
from megatron_puffin.training.metrics import MetricsWriter


def test_a_failed_metrics_line_is_logged_counted_and_training_goes_on(tmp_path, caplog):
    path = tmp_path / "logs" / "metrics.jsonl"
    writer = MetricsWriter(["image2text"], metrics_file=str(path))
    writer.write_scalars(1, {"loss/image2text": 2.5}, "iteration 1")
    shutil.rmtree(tmp_path / "logs")  # e.g. a cleanup job, or the mount gone
    with caplog.at_level(logging.WARNING, logger="megatron_puffin.training.metrics"):
        writer.write_scalars(2, {"loss/image2text": 2.4}, "iteration 2")  # must not raise
        writer.write_scalars(3, {"loss/image2text": 2.3}, "iteration 3")
        failures = [r.getMessage() for r in caplog.records if "not written" in r.getMessage()]
        assert len(failures) == 1 and "iteration 2" in failures[0] and "No such file" in failures[0], failures
        (tmp_path / "logs").mkdir()
        writer.write_scalars(4, {"loss/image2text": 2.2}, "iteration 4")
    assert any("2 line(s) before this one were lost" in r.getMessage() for r in caplog.records)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"iteration": 4, "loss/image2text": 2.2, "lost_metrics_lines": 2}]
    writer.write_scalars(5, {"loss/image2text": 2.1}, "iteration 5")
    assert json.loads(path.read_text().splitlines()[-1]) == {"iteration": 5, "loss/image2text": 2.1}


def test_tensorboard_on_a_full_disk_is_one_warning_and_training_goes_on(tmp_path, caplog, capsys):
    """TensorBoard writes its events from a thread: a full disk (here EFBIG from a per-file size limit) ended that
    thread with a printed traceback, and the writer's close() at the end of a finished run raised (exit 1)."""
    writer = MetricsWriter(["image2text"], tensorboard_dir=str(tmp_path / "tb"))
    writer.write_scalars(1, {"loss/image2text": 2.5}, "iteration 1")
    events = max(f.stat().st_size for f in (tmp_path / "tb").iterdir())
    with file_size_limit(events), caplog.at_level(logging.WARNING, logger="megatron_puffin.training.metrics"):
        for iteration in range(2, 12):
            writer.write_scalars(iteration, {"loss/image2text": 2.0}, f"iteration {iteration}")  # no raise
        writer.close()  # no raise
    failures = [r.getMessage() for r in caplog.records if "not written" in r.getMessage()]
    assert len(failures) == 1 and "File too large" in failures[0], failures  # once, not at every log line
    assert "Traceback" not in capsys.readouterr().err


def test_a_resumed_run_moves_the_lines_it_computes_again_aside_and_keeps_them(tmp_path, caplog):
    """A run killed at iteration 35 after its checkpoint at 20 left lines for 21-35 (and a torn last line); the
    resumed run computes 21-35 again. The file must hold one line per iteration, and nothing may be lost."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"iteration": i, "loss/image2text": 3.0 - i / 100}) for i in (10, 20)]
    lines.append(json.dumps({"iteration": 20, "valid_loss/image2text": 2.9}))
    lines += [json.dumps({"iteration": i, "loss/image2text": 1.0}) for i in (30,)]
    path.write_text("\n".join(lines) + "\n" + '{"iteration": 35, "loss/ima')  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="megatron_puffin.training.metrics"):
        writer = MetricsWriter(["image2text"], metrics_file=str(path), start_iteration=20)
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "2 line(s) moved to" in message and "1 of iterations after 20" in message and "1 not a JSON" in message
    writer.write_scalars(30, {"loss/image2text": 2.5}, "iteration 30")
    iterations = [json.loads(line)["iteration"] for line in path.read_text().splitlines()]
    assert iterations == [10, 20, 20, 30]
    assert (tmp_path / "metrics.jsonl.superseded").read_text() == lines[3] + "\n" + '{"iteration": 35, "loss/ima\n'
    # Not a regular file (a pipe, /dev/stdout): never read, so a reader on the other end loses nothing.
    import os
    os.mkfifo(tmp_path / "pipe")
    MetricsWriter(["image2text"], metrics_file=str(tmp_path / "pipe"), start_iteration=20)  # would block reading
    # A new run (nothing loaded) into the same file: every earlier line moves, appended after the first move.
    MetricsWriter(["image2text"], metrics_file=str(path), start_iteration=0)
    assert path.read_text() == ""
    assert len((tmp_path / "metrics.jsonl.superseded").read_text().splitlines()) == 2 + 4


def test_a_resumed_run_hides_the_tensorboard_events_it_computes_again(tmp_path):
    """TensorBoard showed both the stale value and the recomputed one for every iteration after the checkpoint
    (and only the stale ones past where the resumed run had got to): purge_step hides those events."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    first = MetricsWriter(["image2text"], tensorboard_dir=str(tmp_path / "tb"))
    for iteration in range(1, 36):  # killed at 35; its checkpoint is at 20
        first.write_scalars(iteration, {"loss/image2text": 1.0}, "")
    first.close()
    resumed = MetricsWriter(["image2text"], tensorboard_dir=str(tmp_path / "tb"), start_iteration=20)
    for iteration in range(21, 26):
        resumed.write_scalars(iteration, {"loss/image2text": 2.0}, "")
    resumed.close()
    accumulator = EventAccumulator(str(tmp_path / "tb"), size_guidance={SCALARS: 0})
    accumulator.Reload()
    events = [(event.step, event.value) for event in accumulator.Scalars("loss/image2text")]
    assert events == [(step, 1.0) for step in range(1, 21)] + [(step, 2.0) for step in range(21, 26)]
