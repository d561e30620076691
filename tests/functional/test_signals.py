"""Stopping signals through the real launchers, with data-loader workers (the default): the run saves, writes
run_status.json "interrupted" and leaves no process behind.

(a) SIGTERM to examples/train.sh (-> python -m megatron_puffin.launch, torchrun's launcher -> the rank's whole
    process group, workers and the checkpoint write-results queue's process of the periodic save before it
    included) saves; a second SIGTERM to the rank's process group while the checkpoint is being written does not
    kill the save; the launcher ends with one line and exit status 143;
(b) SIGUSR1 to plain torchrun (which does not handle it and dies) makes the rank save and exit, not orphan it;
(c) Ctrl-C twice to plain torchrun (SIGINT to its process group, then again) makes the rank save, not raise
    KeyboardInterrupt; Ctrl-C held down to plain python saves and still exits 75;
(d) SIGHUP to torchrun (the terminal closed), forwarded to the rank's group, saves; the workers ignore it;
(e) a rank killed with SIGKILL after a periodic save takes its data-loader workers and the queue's process with it.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.puffin import ROOT, make_tiny_dataset, process_running as _alive, start_script

TINY = ROOT / "examples" / "tiny"
ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
           PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           TORCH_ELASTIC_SHUTDOWN_TIMEOUT="600")
FLAGS = [f"@{TINY / 'model.args'}", "--num-workers", "2", "--log-interval", "1", "--task-stream",
         "image2text:tiny/data/main", "--task-stream", "cam2image:tiny/data/main", "--freeze-vision",
         "--train-iters", "200", "--lr", "1e-3", "--lr-warmup-iters", "2"]
TIMEOUT = 600


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    make_tiny_dataset(root / "tiny", num_samples=16)
    return root


def _children(pid):
    """Direct children of ``pid`` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _wait_for(predicate, proc, what):
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[0][-3000:]}"
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _metrics_lines(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


def _rank_pid(launcher_pid):
    """The pretrain_puffin.py process below a launcher (train.sh -> megatron_puffin.launch -> rank, or torchrun ->
    rank)."""
    for child in _children(launcher_pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        launcher = (b"torchrun", b"torch.distributed.run", b"megatron_puffin.launch")
        if b"pretrain_puffin.py" in cmdline and not any(name in cmdline for name in launcher):
            return child
        found = _rank_pid(child)
        if found:
            return found
    return None


def _status(run):
    return json.loads((run / "run_status.json").read_text())


def test_sigterm_to_train_sh_saves_with_workers_and_a_second_signal_does_not_kill_the_save(workdir):
    (workdir / "stage.args").write_text(" ".join(FLAGS + ["--metrics-file", "sh.jsonl", "--save-interval", "2"]) + "\n")
    env = dict(ENV, STAGE_ARGS="stage.args", SAVE_DIR="run_sh", NPROC_PER_NODE="1", LOG_DIR="logs")
    proc = subprocess.Popen(["bash", str(ROOT / "examples" / "train.sh")], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # After the periodic save of iteration 2: the rank has started megatron-core's write-results queue process.
    _wait_for(lambda: (workdir / "run_sh" / "iter_0000002").is_dir() and _metrics_lines(workdir / "sh.jsonl") >= 3,
              proc, "the first checkpoint")
    rank = _wait_for(lambda: _rank_pid(proc.pid), proc, "the rank")
    children = [pid for pid in _children(rank) if _alive(pid)]
    assert len(children) >= 3, "expected two data-loader workers and the checkpoint queue's process"
    proc.send_signal(signal.SIGTERM)
    staging = _wait_for(lambda: next((workdir / "run_sh").glob("iter_*.tmp"), None), proc, "the interrupt save")
    os.killpg(rank, signal.SIGTERM)  # as torchrun or Slurm would repeat it: the rank and its workers
    output, _ = proc.communicate(timeout=TIMEOUT)
    # The launcher (torchrun's, through megatron_puffin.launch) ends with one line and 128 + SIGTERM; plain torchrun
    # printed a SignalException traceback and exited 1.
    assert "Traceback" not in output and "killed by signal" not in output, output[-4000:]
    assert "megatron_puffin.launch: stopped by SIGTERM, which it forwarded to every rank" in output, output[-3000:]
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, output[-3000:])
    assert "BrokenPipeError" not in output, output[-4000:]
    assert "received while stopping" in output, output[-3000:]
    status = _status(workdir / "run_sh")
    assert (status["status"], status["reason"]) == ("interrupted", "signal"), status
    assert (workdir / "run_sh" / staging.name[: -len(".tmp")]).is_dir()
    assert status["checkpoint"].endswith(staging.name[: -len(".tmp")])
    assert '"status": "interrupted"' in output  # train.sh prints the status file
    _assert_all_end([rank, *children], "after the run stopped")


def _plain_torchrun(workdir, name, env=ENV):
    """``torchrun`` (its own session, as a terminal's foreground job) training with ``--save run_NAME`` after two
    iterations; returns (the torchrun process, its rank's pid). Its log folder goes under ``workdir`` (plain
    torchrun leaves a ``torchelastic_*`` tree in the system's temporary folder on every launch)."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                             "--log-dir", str(workdir / f"torchelastic_{name}"), str(ROOT / "pretrain_puffin.py"), *FLAGS, "--save", f"run_{name}", "--metrics-file",
                             f"{name}.jsonl"], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    _wait_for(lambda: _metrics_lines(workdir / f"{name}.jsonl") >= 2, proc, "two iterations")
    rank = _rank_pid(proc.pid)
    assert rank is not None
    return proc, rank


def _assert_saved_on_signal(run):
    status = _status(run)
    assert (status["status"], status["reason"]) == ("interrupted", "signal"), status
    assert (run / Path(status["checkpoint"]).name).is_dir()


def test_sigusr1_to_plain_torchrun_does_not_orphan_the_rank(workdir):
    proc, rank = _plain_torchrun(workdir, "usr1", {k: v for k, v in ENV.items() if k != "PET_SIGNALS_TO_HANDLE"})
    proc.send_signal(signal.SIGUSR1)
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGUSR1  # torchrun's own default action (see docs/training.md)
    deadline = time.time() + TIMEOUT
    while _alive(rank) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(rank), "the rank outlived torchrun"
    _assert_saved_on_signal(workdir / "run_usr1")


def test_ctrl_c_twice_to_plain_torchrun_saves(workdir):
    # Ctrl-C in a terminal: SIGINT to torchrun's process group (torchrun's ranks run in sessions of their own, so
    # torchrun forwards it to each rank's group, workers included), then a second Ctrl-C, on which torchrun sends
    # SIGTERM to the ranks. The first used to raise KeyboardInterrupt in the rank, losing every step since the last
    # save; now the rank saves at the next step boundary and ignores the second.
    proc, rank = _plain_torchrun(workdir, "int")
    assert os.getpgid(rank) != proc.pid  # what makes torchrun's forwarding the only path
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:  # torchrun already done: the rank saved faster than the second Ctrl-C came
        pass
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert "KeyboardInterrupt" not in output and "pretrain_puffin.py\", line" not in output, output[-4000:]
    _assert_saved_on_signal(workdir / "run_int")
    _assert_all_end([rank], "after torchrun ended")


def test_ctrl_c_held_down_to_python_saves_and_exits_75_without_a_traceback(workdir):
    # The key held down (the terminal's auto-repeat, or Ctrl-C mashed): SIGINT to the foreground process group every
    # 5 ms until the process is gone. The first stops the run, those during the save are ignored; those after it
    # landed, once the run had given the handlers back, in the freeing of its objects or the interpreter's
    # shutdown: KeyboardInterrupt tracebacks, and the process "killed by SIGINT" (-2) instead of 75 (3 runs of 3).
    log = workdir / "held.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain_puffin.py"), *FLAGS, "--save", "run_held",
                                 "--metrics-file", "held.jsonl"], cwd=workdir, env=ENV, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for(lambda: _metrics_lines(workdir / "held.jsonl") >= 2, proc, "two iterations")
        sent = 0
        while proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except ProcessLookupError:  # the process ended (its group has gone)
                break
            sent += 1
            time.sleep(0.005)
        proc.wait(timeout=TIMEOUT)
    output = log.read_text()
    assert proc.returncode == 75, (proc.returncode, output[-4000:])
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-4000:]
    assert sent > 20, sent
    assert 1 <= output.count("received while stopping") <= 3, output[-4000:]  # one line per 5 s, not per signal
    _assert_saved_on_signal(workdir / "run_held")


def test_the_terminal_closing_under_torchrun_saves_and_the_workers_survive_it(workdir):
    # SIGHUP (the terminal or ssh session gone) to torchrun, which forwards it to the rank's whole process group:
    # the rank used to die of it, losing the steps since the last save; its data-loader workers too.
    proc, rank = _plain_torchrun(workdir, "hup")
    workers = [pid for pid in _children(rank) if _alive(pid)]
    assert len(workers) >= 2, "expected two data-loader workers"
    proc.send_signal(signal.SIGHUP)
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert "pretrain_puffin.py\", line" not in output and "data-loader worker died" not in output, output[-4000:]
    _assert_saved_on_signal(workdir / "run_hup")
    _assert_all_end([rank, *workers], "after torchrun ended")


def test_a_rank_killed_with_sigkill_takes_its_workers_with_it(workdir):
    # The rank as a real process forked from the suite's pre-imported server (helpers.puffin.start_script); its
    # workers are its forked children, as under python or torchrun, and so is the checkpoint write-results queue's
    # process, started by the periodic save.
    proc = start_script(ROOT / "pretrain_puffin.py", *FLAGS, "--metrics-file", "kill.jsonl", "--save", "run_kill",
                        "--save-interval", "1", cwd=workdir, env=ENV)
    _wait_for(lambda: (workdir / "run_kill" / "iter_0000001").is_dir(), proc, "the first checkpoint")
    children = [pid for pid in _children(proc.pid) if _alive(pid)]
    assert len(children) >= 3, "expected two data-loader workers and the checkpoint queue's process"
    proc.kill()
    proc.wait()
    _assert_all_end(children, "after their rank was killed")


def _assert_all_end(pids, when):
    deadline = time.time() + 60
    while any(_alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.05)
    left = [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120] for pid in pids if _alive(pid)]
    assert not left, f"processes still running {when}: {left}"
