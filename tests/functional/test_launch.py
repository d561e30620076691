"""``python -m megatron_puffin.launch``: torchrun's own launcher, run for real (two ranks, c10d rendezvous), ending
with the first failed rank's exit status and one line instead of torchrun's 1 and traceback.

The ranks are a small Python script (no torch import, so each launch costs the launcher's start only); the real
trainer under the launcher is covered by ``test_signals.py`` (SIGTERM to ``examples/train.sh``).
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers.puffin import ROOT

# Rank RANK exits with RANK_<RANK>_EXIT ("kill": kills itself with SIGKILL; default 0), after RANK_<RANK>_SLEEP s.
# With STOP_FILE set it runs until a stop signal, writes STOP_FILE.<RANK> and exits 75 (like pretrain_puffin.py
# after saving).
RANK_SCRIPT = r"""
import os, signal, sys, time
rank = os.environ["RANK"]
if os.environ.get("STOP_FILE"):
    def stop(signum, frame):
        open(os.environ["STOP_FILE"] + "." + rank, "w").write(signal.Signals(signum).name)
        sys.exit(75)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, stop)
    open(os.environ["STOP_FILE"] + ".ready." + rank, "w").close()
    while True:
        time.sleep(0.05)
time.sleep(float(os.environ.get(f"RANK_{rank}_SLEEP", "0")))
code = os.environ.get(f"RANK_{rank}_EXIT", "0")
if code == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(code))
"""
TIMEOUT = 120


def _launch(tmp_path, environment=None, flags=(), **env):
    """The launcher on two ranks of RANK_SCRIPT, with ``tmp_path/tmp`` as its TMPDIR (see ``_left_in_tmp``)."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    environment = dict(os.environ if environment is None else environment, PYTHONWARNINGS="ignore",
                       TMPDIR=str(tmp_path / "tmp"), **env)
    return subprocess.Popen([sys.executable, "-m", "megatron_puffin.launch", "--standalone", "--nproc-per-node", "2",
                             *flags, str(script)], cwd=tmp_path, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _left_in_tmp(tmp_path):
    """What the launch left in its TMPDIR: torchrun leaves a ``torchelastic_*`` tree of empty folders per launch."""
    return sorted(path.name for path in (tmp_path / "tmp").iterdir())


def _finish(proc):
    output, _ = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, output


@pytest.mark.parametrize("exits, status, line", [
    ({}, 0, None),
    # rank 1 fails first (rank 0 is still sleeping when torchrun stops it): its status, not torchrun's 1
    ({"RANK_0_SLEEP": "30", "RANK_1_EXIT": "75"}, 75,
     r"megatron_puffin.launch: rank 1 \(local rank 1 on \S+\) exited with status 75 first; it stopped early after "
     r"saving a checkpoint: run the same command with --load <the --save folder> to resume$"),
    ({"RANK_0_EXIT": "2", "RANK_1_SLEEP": "30"}, 2,
     r"megatron_puffin.launch: rank 0 \(local rank 0 on \S+\) exited with status 2 first; the ranks' error lines "
     r"above say which flags to fix$"),
    ({"RANK_0_SLEEP": "30", "RANK_1_EXIT": "kill"}, 128 + signal.SIGKILL,
     r"megatron_puffin.launch: rank 1 \(local rank 1 on \S+\) was killed by SIGKILL first; its log above says why$"),
])
def test_the_exit_status_is_the_first_failed_ranks_and_the_ending_one_line(tmp_path, exits, status, line):
    import re

    code, output = _finish(_launch(tmp_path, **exits))
    assert code == status, output[-3000:]
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-3000:]
    last = output.strip().splitlines()[-1] if output.strip() else ""
    if line is None:
        assert "megatron_puffin.launch:" not in output, output[-3000:]
    else:
        assert re.search(line, last), output[-3000:]
    assert _left_in_tmp(tmp_path) == [], "the launcher left its empty log folders behind"


@pytest.mark.parametrize("sig, group", [(signal.SIGINT, True), (signal.SIGUSR1, False)])
def test_a_stop_signal_reaches_every_rank_and_the_launcher_ends_with_one_line(tmp_path, sig, group):
    """Ctrl-C in the launcher's terminal (SIGINT to its process group), or Slurm's SIGUSR1 warning to the launcher
    alone: it is forwarded, the ranks stop (75), and the launcher exits 128 + the signal with one line, where
    torchrun printed a SignalException traceback and exited 1 (SIGINT) or died of the signal it does not handle
    without ``--signals-to-handle`` (SIGUSR1)."""
    stop = tmp_path / "stopped"
    environment = {name: value for name, value in os.environ.items()
                   if name not in ("PET_SIGNALS_TO_HANDLE", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}
    proc = _launch(tmp_path, STOP_FILE=str(stop), environment=environment)
    deadline = time.time() + TIMEOUT
    while not all((tmp_path / f"stopped.ready.{rank}").exists() for rank in (0, 1)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    if group:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    code, output = _finish(proc)
    assert code == 128 + sig, output[-3000:]
    assert "Traceback" not in output and "SignalException" not in output, output[-3000:]
    assert output.strip().splitlines()[-1].startswith(f"megatron_puffin.launch: stopped by {sig.name}, which it "
                                                      "forwarded to every rank"), output[-3000:]
    assert all((tmp_path / f"stopped.{rank}").read_text() == sig.name for rank in (0, 1))
    assert _left_in_tmp(tmp_path) == []


def test_log_files_and_a_given_log_dir_are_kept(tmp_path):
    """Only empty folders are removed: with ``--redirects`` the ranks' log files stay (and the launcher says where),
    and a ``--log-dir`` of the user's is left as torchrun leaves it."""
    code, output = _finish(_launch(tmp_path, flags=["--redirects", "3"]))
    kept = _left_in_tmp(tmp_path)
    assert code == 0 and len(kept) == 1 and kept[0].startswith("torchelastic_"), (kept, output[-3000:])
    logs = sorted(path.name for path in (tmp_path / "tmp" / kept[0]).rglob("*.log"))
    assert logs == ["stderr.log", "stderr.log", "stdout.log", "stdout.log"], logs
    assert output.strip().splitlines()[-1] == ("megatron_puffin.launch: the ranks' log files are kept under "
                                               f"{tmp_path / 'tmp' / kept[0]}"), output[-3000:]
    mine = tmp_path / "my_logs"
    code, output = _finish(_launch(tmp_path, flags=["--log-dir", str(mine)]))
    assert code == 0 and mine.is_dir() and any(mine.iterdir()), output[-3000:]
    assert "log files are kept" not in output and _left_in_tmp(tmp_path) == kept


def test_a_wrong_torchrun_flag_is_torchruns_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_puffin.launch", "--nproc-per-node", "2",
                           "--no-such-flag", str(ROOT / "pretrain_puffin.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 2 and "unrecognized arguments: --no-such-flag" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_values_torchrun_refuses_are_one_line_before_anything_is_made(tmp_path):
    """Were torchrun's tracebacks from inside its launch (a bare AssertionError for --nproc-per-node 0)."""
    cases = [(["--nproc-per-node", "0"], "--nproc-per-node (0) must be at least 1 (or gpu, cpu, auto)"),
             (["--nproc-per-node", "two"], "--nproc-per-node (two): Unsupported nproc_per_node value: two"),
             (["--nnodes", "0"], "--nnodes (0): min_nodes must be > 0"),
             (["--max-restarts", "-1"], "--max-restarts (-1): max_restarts must be >= 0"),
             (["--log-dir", str(tmp_path / "a_file")], f"--log-dir ({tmp_path / 'a_file'}) is a file; give a folder")]
    (tmp_path / "a_file").write_text("")
    script = ("import sys\nfrom megatron_puffin.launch import main\n"
              f"for flags in {[flags for flags, _ in cases]!r}:\n"
              f"    print('exit', main(['--standalone', *flags, {str(ROOT / 'pretrain_puffin.py')!r}]), flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=TIMEOUT, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert proc.stdout.split() == ["exit", "2"] * len(cases), proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == len(cases) and "Traceback" not in proc.stderr, proc.stderr
    for line, (_, message) in zip(lines, cases):
        assert line.startswith(f"megatron_puffin.launch: error: {message}"), line
    assert list(tmp_path.iterdir()) == [tmp_path / "a_file"]  # no torchelastic_* folder was made
