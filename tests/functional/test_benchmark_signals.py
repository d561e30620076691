"""A benchmark stopped by a scheduler or Ctrl-C (``bench_flags.run_main``): one line, exit status 128 + signal, and
its temporary folder (synthetic dataset, shards, cached latents; hundreds of MiB at 512²) removed, also when a
second signal follows the first. Under SIGTERM's default action the process used to end at once and leave it.

Runs ``benchmarks/bench_data_loader.py`` for real, in its own process group (as ``timeout`` and Slurm signal it),
with its DataLoader and preprocessing workers, and signals it while it works in the folder."""
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers.puffin import ROOT

TIMEOUT = 300


@pytest.mark.parametrize("signals",
                         [(signal.SIGTERM,), (signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGHUP)],
                         ids=["sigterm", "ctrl-c-twice", "sigterm-then-sighup"])
def test_a_stopped_benchmark_says_so_in_one_line_and_removes_its_temporary_data(tmp_path, signals):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch), PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "bench_data_loader.py"), "--num-samples", "400",
                             "--image-size", "128", "--repeats", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()  # printed once the dataset is written; shards and loaders come next
        assert line.startswith("synthetic data:"), line + proc.stderr.read()[-3000:]
        work = list(scratch.glob("bench_data_*"))
        assert len(work) == 1 and (work[0] / "raw").is_dir(), work
        for sig in signals:
            os.killpg(proc.pid, sig)
            time.sleep(0.05)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    name = signal.Signals(signals[0]).name
    expected = 130 if signals[0] == signal.SIGINT else 128 + int(signals[0])
    assert proc.returncode == expected, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    what = "interrupted (Ctrl-C)" if signals[0] == signal.SIGINT else f"stopped by {name}"
    assert lines[-1] == (f"bench_data_loader.py: {what}; no result; its temporary data was removed (a --work-dir "
                         "you named is kept)"), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert list(scratch.iterdir()) == [], list(scratch.iterdir())
    with pytest.raises(ProcessLookupError):  # nothing of its process group is left
        os.killpg(proc.pid, 0)
