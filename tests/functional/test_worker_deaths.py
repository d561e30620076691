"""A data-loader worker killed during a real run (pretrain_puffin.py, tiny configuration, one worker per loader), as
the out-of-memory killer does it (SIGKILL): a training worker is restarted and the run trains exactly the losses of an
uninterrupted one; a validation worker killed with --max-worker-restarts 0 ends the run, after saving the step just
trained, with one line that names the flag and that checkpoint, not a traceback; a training worker killed past
--max-worker-restarts ends the run after saving the last trained step, from which the same command resumes the
uninterrupted run's losses."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from helpers.puffin import ROOT, make_tiny_dataset, metrics_losses, run_pretrain

TINY = ROOT / "examples" / "tiny"
ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
FLAGS = [f"@{TINY / 'model.args'}", "--num-workers", "1", "--log-interval", "1", "--task-stream",
         "image2text:tiny/data/main", "--task-stream", "cam2image:tiny/data/main", "--micro-batch-size", "2",
         "--freeze-vision", "--train-iters", "4", "--lr", "1e-3", "--lr-warmup-iters", "2"]
VALID = ["--valid-task-stream", "image2text:tiny/heldout/main", "--eval-interval", "1",
         "--eval-iters", "300"]  # far more validation micro-batches than the worker makes before the kill lands


def _workers(cwd: Path):
    """PIDs of the data-loader worker processes (torch names them pt_data_worker) running in ``cwd``: this test's
    run only, whatever else runs on the machine."""
    pids = set()
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/comm").read_text().strip() == "pt_data_worker" \
                    and os.readlink(f"/proc/{entry}/cwd") == str(cwd):
                pids.add(int(entry))
        except OSError:  # the process ended between listing and reading
            pass
    return pids


class _Killer(threading.Thread):
    """SIGKILLs the first worker of generation ``generation`` (1: the first worker set seen, 2: the next new one),
    once ``ready()`` says so."""

    def __init__(self, cwd: Path, generation: int, ready=lambda: True):
        super().__init__(daemon=True)
        self.cwd, self.generation, self.ready = cwd, generation, ready
        self.killed, self.done = None, threading.Event()

    def run(self):
        seen = set()
        while not self.done.is_set() and self.killed is None:
            if not self.ready():
                time.sleep(0.002)
                continue
            pids = _workers(self.cwd)
            new = sorted(pids - seen)
            if new and (self.generation == 1 or seen):
                os.kill(new[0], signal.SIGKILL)
                self.killed = new[0]
            seen |= pids
            time.sleep(0.002)


def _run_killing(cwd, generation, *flags, ready=lambda: True):
    killer = _Killer(cwd, generation, ready)
    killer.start()
    try:
        proc = run_pretrain(cwd, *FLAGS, *flags, check=False, env=ENV)
    finally:
        killer.done.set()
        killer.join()
    assert killer.killed is not None, "no worker of that generation was seen"
    return proc, killer.killed


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker_deaths")
    make_tiny_dataset(root / "tiny", num_samples=8, num_heldout=4)
    return root.resolve()


def test_a_killed_training_worker_is_restarted_and_a_killed_validation_worker_is_one_line(workdir):
    run_pretrain(workdir, *FLAGS, "--metrics-file", "plain.jsonl", env=ENV)

    proc, pid = _run_killing(workdir, 1, "--metrics-file", "killed.jsonl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"data-loader worker (pid {pid}) is killed by signal" in proc.stderr, proc.stderr[-3000:]
    assert "restarting the workers at micro-batch" in proc.stderr and "Traceback" not in proc.stderr
    assert metrics_losses(workdir / "killed.jsonl") == metrics_losses(workdir / "plain.jsonl")

    proc, pid = _run_killing(workdir, 2, *VALID, "--max-worker-restarts", "0", "--save", "run")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if "validation at iteration 1:" in line]
    assert len(error) == 1, proc.stderr[-3000:]
    assert f"data-loader worker (pid {pid}) is killed by signal" in error[0]
    # the step trained before the validation is saved first, and the line names it
    assert "(--max-worker-restarts 0)" in error[0] and error[0].endswith(
        "The same command resumes from run/iter_0000001, the newest complete checkpoint"), error[0]
    status = json.loads((workdir / "run" / "run_status.json").read_text())
    assert (status["status"], status["reason"], status["iteration"]) == ("failed", "validation data loader", 1)


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


def test_a_training_worker_killed_past_the_restarts_saves_the_last_trained_step_and_resumes_exactly(workdir):
    """The rank stops before the step whose micro-batches it could not fetch, with the others (one agreement per
    step), saves, and names that checkpoint; the micro-batches drawn for the untrained step are handed out again."""
    six = ["--train-iters", "6"]
    run_pretrain(workdir, *FLAGS, *six, "--metrics-file", "plain6.jsonl", env=ENV)

    proc, pid = _run_killing(workdir, 1, *six, "--max-worker-restarts", "0", "--save", "lost", "--metrics-file",
                             "lost.jsonl", ready=lambda: _lines(workdir / "lost.jsonl") >= 2)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    trained = max(metrics_losses(workdir / "lost.jsonl"))
    assert 2 <= trained < 6, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if f"data-loader worker (pid {pid}) is killed" in line]
    assert len(error) == 1 and "(--max-worker-restarts 0)" in error[0], proc.stderr[-3000:]
    assert error[0].endswith(f"The same command resumes from lost/iter_{trained:07d}, the newest complete "
                             "checkpoint"), error[0]
    status = json.loads((workdir / "lost" / "run_status.json").read_text())
    assert (status["status"], status["reason"], status["iteration"]) == ("failed", "data loader", trained)

    run_pretrain(workdir, *FLAGS, *six, "--save", "lost", "--load", "lost", "--metrics-file", "resumed.jsonl",
                 env=ENV)
    resumed = {**metrics_losses(workdir / "lost.jsonl"), **metrics_losses(workdir / "resumed.jsonl")}
    assert sorted(metrics_losses(workdir / "resumed.jsonl")) == list(range(trained + 1, 7))
    assert resumed == metrics_losses(workdir / "plain6.jsonl")
