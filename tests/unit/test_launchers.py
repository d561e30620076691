"""examples/train.sh and examples/slurm/train.sbatch: syntax, usage errors, the command lines they run, exit status,
signal forwarding and the Slurm stop / requeue protocol (decided by <SAVE_DIR>/run_status.json when the run wrote
one, by the exit status otherwise).

torchrun, srun and scontrol are replaced by small scripts on PATH that record how they were called (the launchers
are the things under test; the real torchrun is exercised by the distributed tests, Slurm is not available here).
So is ``python``: the scripts launch with ``python -m megatron_puffin.launch`` (torchrun's own launcher, see
``tests/functional/test_launch.py``), which the fake passes on to the fake torchrun.
"""
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SH = ROOT / "examples" / "train.sh"
SBATCH = ROOT / "examples" / "slurm" / "train.sbatch"

# What pretrain_puffin.py's rank 0 does at the end of a run with --save: write <save>/run_status.json
# (FAKE_RUN_STATUS; FAKE_STATUS_DELAY seconds later when set, like a shared file system that shows it late).
# A status file already present at launch is recorded in record.stale.
FAKE_RUN_STATUS = r"""
save=""
prev=""
for arg in "$@"; do [ "$prev" != --save ] || save="$arg"; prev="$arg"; done
[ -z "$save" ] || [ ! -e "$save/run_status.json" ] || echo stale >> "$FAKE_RECORD.stale"
write_status() {
  [ -n "${FAKE_RUN_STATUS:-}" ] && [ -n "$save" ] || return 0
  mkdir -p "$save"
  printf '{\n "status": "%s",\n "reason": %s,\n "iteration": 7,\n "train_iters": 10,\n "checkpoint": "%s"\n}' \
    "$FAKE_RUN_STATUS" "${FAKE_REASON:-null}" "$save/iter_0000007" > "$save/run_status.json.tmp"
  mv "$save/run_status.json.tmp" "$save/run_status.json"
}
end_run() {
  if [ -n "${FAKE_STATUS_DELAY:-}" ]; then
    (sleep "$FAKE_STATUS_DELAY"; write_status) > /dev/null 2>&1 &
  else
    write_status
  fi
  exit "$1"
}
"""
# Like torchrun: on SIGTERM / SIGUSR1 the ranks save and torchrun exits 1 (it reports a rank's 75 as 1).
FAKE_TORCHRUN = "#!/usr/bin/env bash\n" + FAKE_RUN_STATUS + r"""
trap 'echo TERM >> "$FAKE_RECORD.signals"; end_run 1' TERM
trap 'echo USR1 >> "$FAKE_RECORD.signals"; end_run 1' USR1
echo "fake torchrun PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-}"
printf '%s\n' "$@" > "$FAKE_RECORD"
for _ in $(seq "${FAKE_TICKS:-1}"); do sleep 0.05; done
end_run "${FAKE_EXIT:-0}"
"""
# Like srun -> torchrun, the same on SIGUSR1.
FAKE_SRUN = "#!/usr/bin/env bash\n" + FAKE_RUN_STATUS + r"""
trap 'echo USR1 >> "$FAKE_RECORD.signals"; end_run 1' USR1
printf '%s\n' "$@" > "$FAKE_RECORD"
echo "$OMP_NUM_THREADS" > "$FAKE_RECORD.omp"
for _ in $(seq "${FAKE_TICKS:-1}"); do sleep 0.05; done
end_run "${FAKE_EXIT:-0}"
"""
# `python -c ...` (train.sh's import check) succeeds; `python -m megatron_puffin.launch ARGS` is torchrun ARGS.
FAKE_PYTHON = r"""#!/usr/bin/env bash
[ "$1" != -c ] || exit 0
[ "$1 $2" = "-m megatron_puffin.launch" ] || { echo "fake python: unexpected $*" >&2; exit 9; }
shift 2
echo launch >> "$FAKE_RECORD.launcher"
exec torchrun "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") printf 'gpu-node-07\\ngpu-node-08\\n' ;;
  requeue*) echo "$2" >> "$FAKE_RECORD.requeue" ;;
  *) exit 1 ;;
esac
"""


@pytest.fixture()
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("torchrun", FAKE_TORCHRUN), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL),
                       ("python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    stage = tmp_path / "stage.args"
    stage.write_text("--train-iters 10  # a flag file\n")
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_RECORD": str(tmp_path / "record"),
        "STAGE_ARGS": str(stage), "CUDA_VISIBLE_DEVICES": "0,1,2",
    }
    return tmp_path, env


def run(script, env, **kwargs):
    return subprocess.run(["bash", str(script)], env=env, cwd=env.get("HOME"), capture_output=True, text=True,
                          timeout=30, **kwargs)


def recorded(tmp_path, suffix=""):
    path = tmp_path / f"record{suffix}"
    return path.read_text().splitlines() if path.exists() else []


SHELL_SCRIPTS = [TRAIN_SH, SBATCH, ROOT / "examples" / "quickstart.sh", ROOT / "examples" / "bootstrap_env.sh",
                 ROOT / "tests" / "run.sh", ROOT / ".ci" / "run", ROOT / "benchmarks" / "gpu_check.sh",
                 ROOT / "benchmarks" / "gpu_bench.sh"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: path.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (bash -n passed)")
    subprocess.run(["shellcheck", "-x", str(script)], check=True)


# -- examples/train.sh ------------------------------------------------------------------------------------------
def test_train_sh_without_stage_args_prints_usage_and_fails(fakes):
    tmp_path, env = fakes
    del env["STAGE_ARGS"]
    result = run(TRAIN_SH, env)
    assert result.returncode == 2
    assert "usage: STAGE_ARGS=<flag file>" in result.stderr and "STAGE_ARGS is not set" in result.stderr
    assert not recorded(tmp_path)  # torchrun never started


def test_train_sh_with_a_missing_flag_file_fails(fakes):
    tmp_path, env = fakes
    env["STAGE_ARGS"] = str(tmp_path / "nope.args")
    result = run(TRAIN_SH, env)
    assert result.returncode == 2 and "is not a file" in result.stderr


@pytest.mark.parametrize("log_dir", ["a_file", "a_file/logs"])
def test_train_sh_with_a_log_dir_it_cannot_make_fails_before_launching(fakes, log_dir):
    tmp_path, env = fakes
    (tmp_path / "a_file").write_text("not a directory\n")
    env["LOG_DIR"] = str(tmp_path / log_dir)
    result = run(TRAIN_SH, env)
    assert result.returncode == 2, result.stderr
    assert f"error: LOG_DIR={tmp_path / log_dir} cannot be made a directory" in result.stderr
    assert "mkdir:" not in result.stderr and not recorded(tmp_path)  # one line of ours; torchrun never started


def test_train_sh_runs_torchrun_on_every_visible_gpu_tees_the_log_and_keeps_its_status(fakes):
    tmp_path, env = fakes
    env.update(EXTRA_ARGS="--lr 1e-5  --save runs/x", LOG_DIR=str(tmp_path / "logs"), FAKE_EXIT="75")
    result = run(TRAIN_SH, env)
    assert result.returncode == 75
    assert recorded(tmp_path) == ["--standalone", "--nproc-per-node", "3", str(ROOT / "pretrain_puffin.py"),
                                  f"@{env['STAGE_ARGS']}", "--lr", "1e-5", "--save", "runs/x"]
    logs = list((tmp_path / "logs").glob("train-*.log"))
    assert len(logs) == 1
    assert "fake torchrun PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in logs[0].read_text()
    assert "fake torchrun" in result.stdout
    assert recorded(tmp_path, ".launcher") == ["launch"]  # through python -m megatron_puffin.launch


def test_train_sh_takes_another_launcher_and_names_one_it_cannot_find(fakes):
    tmp_path, env = fakes
    env.update(LAUNCHER="torchrun", FAKE_EXIT="75")
    assert run(TRAIN_SH, env).returncode == 75
    assert recorded(tmp_path)[:3] == ["--standalone", "--nproc-per-node", "3"]
    assert not recorded(tmp_path, ".launcher")  # plain torchrun, not python -m megatron_puffin.launch
    env.update(LAUNCHER="no-such-launcher --flag")
    result = run(TRAIN_SH, env)
    assert result.returncode == 2 and "LAUNCHER=no-such-launcher --flag: no-such-launcher not found" in result.stderr
    env.update(LAUNCHER="   ")
    result = run(TRAIN_SH, env)
    assert result.returncode == 2 and "LAUNCHER='   ' names no program" in result.stderr


def test_train_sh_takes_nproc_and_a_fixed_master_port(fakes):
    tmp_path, env = fakes
    env.update(NPROC_PER_NODE="2", MASTER_PORT="29611", CUDA_VISIBLE_DEVICES="")
    assert run(TRAIN_SH, env).returncode == 0
    assert recorded(tmp_path)[:8] == ["--nnodes", "1", "--master-addr", "127.0.0.1", "--master-port", "29611",
                                      "--nproc-per-node", "2"]
    del env["NPROC_PER_NODE"]
    assert run(TRAIN_SH, env).returncode == 0
    assert recorded(tmp_path)[6:8] == ["--nproc-per-node", "1"]  # no visible GPU: one process


def test_train_sh_with_save_dir_resumes_there_and_prints_the_run_status(fakes):
    tmp_path, env = fakes
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run_status.json").write_text('{"status": "finished"}')  # an earlier run's
    env.update(SAVE_DIR=str(run_dir), EXTRA_ARGS="--lr 1e-5", FAKE_EXIT="1", FAKE_RUN_STATUS="interrupted",
               FAKE_REASON='"--exit-duration-in-mins 30"', LOG_DIR=str(tmp_path / "logs"))
    result = run(TRAIN_SH, env)
    assert result.returncode == 1
    assert recorded(tmp_path)[3:] == [str(ROOT / "pretrain_puffin.py"), f"@{env['STAGE_ARGS']}", "--save",
                                      str(run_dir), "--load", str(run_dir), "--lr", "1e-5"]
    assert not recorded(tmp_path, ".stale")  # set aside before torchrun started
    assert (run_dir / "run_status.prev.json").read_text() == '{"status": "finished"}'
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("[train.sh] run status")]
    assert len(line) == 1 and '"status": "interrupted"' in line[0] and '"--exit-duration-in-mins 30"' in line[0]
    assert line[0] in next((tmp_path / "logs").glob("train-*.log")).read_text()


def test_train_sh_says_when_the_run_wrote_no_status(fakes):
    tmp_path, env = fakes
    env.update(SAVE_DIR=str(tmp_path / "run"), FAKE_EXIT="3")
    result = run(TRAIN_SH, env)
    assert result.returncode == 3 and "ended before writing its status" in result.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_train_sh_forwards_term_and_usr1_to_torchrun(fakes, sig):
    tmp_path, env = fakes
    env.update(SAVE_DIR=str(tmp_path / "run"), FAKE_TICKS="400", FAKE_RUN_STATUS="interrupted")
    process = subprocess.Popen(["bash", str(TRAIN_SH)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not recorded(tmp_path) and time.monotonic() < deadline:  # torchrun has started
        time.sleep(0.05)
    os.kill(process.pid, sig)
    out, err = process.communicate(timeout=20)
    assert process.returncode == 1, err
    assert recorded(tmp_path, ".signals") == [sig.name.removeprefix("SIG")]
    assert '"status": "interrupted"' in out


# -- examples/slurm/train.sbatch ---------------------------------------------------------------------------------
def slurm_env(env, tmp_path, **extra):
    env = dict(env, SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-node-[07-08]",
               SLURM_SUBMIT_DIR=str(ROOT), SAVE_DIR=str(tmp_path / "run"), PUFFIN_VENV=str(tmp_path / "no-venv"),
               STATUS_WAIT="0")
    env.update(extra)
    return env


def test_sbatch_header_asks_for_the_agreed_allocation():
    directives = [line.split(None, 1)[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    for wanted in ("--ntasks-per-node=1", "--gpus-per-node=8", "--signal=B:USR1@300", "--requeue",
                   "--output=logs/%x-%j.out"):
        assert wanted in directives
    assert any(d.startswith("--nodes=") for d in directives)


def test_sbatch_runs_one_torchrun_per_node_resuming_from_save_dir(fakes):
    tmp_path, env = fakes
    result = run(SBATCH, slurm_env(env, tmp_path, EXTRA_ARGS="--lr 2e-5"))
    assert result.returncode == 0, result.stderr
    assert recorded(tmp_path) == [
        "--kill-on-bad-exit=1", "python", "-m", "megatron_puffin.launch", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "gpu-node-07:29500", "--rdzv-id", "4242", str(ROOT / "pretrain_puffin.py"),
        f"@{env['STAGE_ARGS']}", "--save", str(tmp_path / "run"), "--load", str(tmp_path / "run"), "--lr", "2e-5",
    ]
    assert not recorded(tmp_path, ".requeue")
    assert run(SBATCH, slurm_env(env, tmp_path, LAUNCHER="torchrun")).returncode == 0
    assert recorded(tmp_path)[1:3] == ["torchrun", "--nnodes"]
    result = run(SBATCH, slurm_env(env, tmp_path, LAUNCHER=" "))
    assert result.returncode == 2 and "LAUNCHER=' ' names no program" in result.stderr


@pytest.mark.parametrize("run_status, code, requeued, status", [
    ("interrupted", 1, True, 0),  # torchrun's report of the ranks' 75
    ("interrupted", 75, True, 0),
    ("finished", 0, False, 0),
    ("stopped", 0, False, 0),  # --exit-interval: deliberate, not requeued
    ("finished", 1, False, 1),  # done, but a process failed afterwards: report it, nothing to resume
])
def test_sbatch_requeues_exactly_when_the_run_status_says_interrupted(fakes, run_status, code, requeued, status):
    tmp_path, env = fakes
    result = run(SBATCH, slurm_env(env, tmp_path, FAKE_EXIT=str(code), FAKE_RUN_STATUS=run_status))
    assert result.returncode == status, result.stderr
    assert recorded(tmp_path, ".requeue") == (["4242"] if requeued else [])
    assert f"run_status.json: {run_status} at iteration 7/10 (reason: null)" in result.stdout


@pytest.mark.parametrize("code, requeued, status", [(75, True, 0), (0, False, 0), (3, False, 3), (1, False, 1)])
def test_sbatch_without_a_status_file_requeues_exactly_on_exit_75(fakes, code, requeued, status):
    tmp_path, env = fakes
    result = run(SBATCH, slurm_env(env, tmp_path, FAKE_EXIT=str(code)))
    assert result.returncode == status, result.stderr
    assert recorded(tmp_path, ".requeue") == (["4242"] if requeued else [])
    if code:
        assert "deciding from the exit status" in result.stderr


@pytest.mark.parametrize("earlier, code, requeued", [("interrupted", 1, False), ("finished", 75, True)])
def test_sbatch_is_not_fooled_by_an_earlier_jobs_status_file(fakes, earlier, code, requeued):
    tmp_path, env = fakes
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = '{"status": "%s", "reason": null, "iteration": 3, "train_iters": 10}' % earlier
    (run_dir / "run_status.json").write_text(stale)
    result = run(SBATCH, slurm_env(env, tmp_path, FAKE_EXIT=str(code)))  # this step crashes: writes no status
    assert not recorded(tmp_path, ".stale")  # set aside before the step started
    assert (run_dir / "run_status.prev.json").read_text() == stale
    assert recorded(tmp_path, ".requeue") == (["4242"] if requeued else [])
    assert result.returncode == (0 if requeued else code)


def test_sbatch_waits_for_a_status_file_that_shows_up_late(fakes):
    tmp_path, env = fakes
    result = run(SBATCH, slurm_env(env, tmp_path, FAKE_EXIT="1", FAKE_RUN_STATUS="interrupted",
                                   FAKE_STATUS_DELAY="0.5", STATUS_WAIT="10"))
    assert result.returncode == 0, result.stderr
    assert recorded(tmp_path, ".requeue") == ["4242"]


@pytest.mark.parametrize("run_status", ["interrupted", ""])  # "": no status file, the forwarded stop decides
def test_sbatch_forwards_usr1_to_the_step_and_requeues(fakes, run_status):
    tmp_path, env = fakes
    process = subprocess.Popen(["bash", str(SBATCH)],
                               env=slurm_env(env, tmp_path, FAKE_TICKS="400", FAKE_RUN_STATUS=run_status),
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not recorded(tmp_path) and time.monotonic() < deadline:  # the step has started
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGUSR1)  # what Slurm's --signal=B:USR1@300 does
    out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert recorded(tmp_path, ".signals") == ["USR1"]
    assert recorded(tmp_path, ".requeue") == ["4242"]
    assert "asking the ranks to save and stop" in err and "step exited with 1" in out


@pytest.mark.parametrize("code, run_status", [(75, ""), (1, "interrupted")])
def test_sbatch_stops_requeueing_after_max_requeues(fakes, code, run_status):
    tmp_path, env = fakes
    result = run(SBATCH, slurm_env(env, tmp_path, FAKE_EXIT=str(code), FAKE_RUN_STATUS=run_status,
                                   SLURM_RESTART_COUNT="3", MAX_REQUEUES="3"))
    assert result.returncode == code and not recorded(tmp_path, ".requeue")
    assert "MAX_REQUEUES" in result.stderr


@pytest.mark.parametrize("flag", ["--save", "--load=/elsewhere"])
def test_sbatch_refuses_save_or_load_in_extra_args(fakes, flag):
    tmp_path, env = fakes
    result = run(SBATCH, slurm_env(env, tmp_path, EXTRA_ARGS=f"--lr 1e-5 {flag} /elsewhere"))
    assert result.returncode == 2 and "set it instead" in result.stderr and not recorded(tmp_path)


def test_sbatch_without_save_dir_prints_usage(fakes):
    tmp_path, env = fakes
    env = slurm_env(env, tmp_path)
    del env["SAVE_DIR"]
    result = run(SBATCH, env)
    assert result.returncode == 2 and "SAVE_DIR is not set" in result.stderr and not recorded(tmp_path)


@pytest.mark.parametrize("allocation, gpus, threads", [
    ({"SLURM_GPUS_PER_NODE": "1", "SLURM_CPUS_PER_TASK": "16"}, "1", "16"),
    ({"SLURM_GPUS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "16"}, "2", "8"),
    ({"SLURM_GPUS_PER_NODE": "h100:4", "SLURM_CPUS_PER_TASK": "64"}, "4", "16"),  # typed --gpus-per-node
    ({"SLURM_GPUS_ON_NODE": "4"}, "4", "8"),
    ({"GPUS_PER_NODE": "2", "SLURM_GPUS_PER_NODE": "8", "OMP_NUM_THREADS": "3"}, "2", "3"),  # explicit wins
])
def test_sbatch_runs_one_rank_per_allocated_gpu_and_shares_the_cpus(fakes, allocation, gpus, threads):
    tmp_path, env = fakes
    result = run(SBATCH, slurm_env(env, tmp_path, **allocation))
    assert result.returncode == 0, result.stderr
    command = recorded(tmp_path)
    assert command[command.index("--nproc-per-node") + 1] == gpus
    assert recorded(tmp_path, ".omp") == [threads]


def test_sbatch_rejects_a_gpu_count_that_is_not_a_number(fakes):
    tmp_path, env = fakes
    result = run(SBATCH, slurm_env(env, tmp_path, GPUS_PER_NODE="four"))
    assert result.returncode == 2 and "set GPUS_PER_NODE" in result.stderr
    assert not recorded(tmp_path)


def test_sourcing_the_bootstrap_leaves_the_callers_shell_options_alone(tmp_path):
    """bootstrap_env.sh is sourced into interactive shells: errexit / nounset / pipefail stay as they were, and a
    failure returns instead of closing the shell."""
    import sys

    venv = Path(sys.prefix)
    stamp = venv / ".puffin_install_stamp"
    import hashlib

    expected = hashlib.sha256((ROOT / "setup.py").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != expected:
        pytest.skip("the active environment was not installed by examples/bootstrap_env.sh from this setup.py "
                    "(sourcing it would reinstall)")
    script = (f'source "{ROOT}/examples/bootstrap_env.sh" > /dev/null; echo "rc=$?"; set -o | grep -E '
              '"^(errexit|nounset|pipefail)"; echo "python=$(command -v python)"; echo alive')
    env = dict(os.environ, PUFFIN_VENV=str(venv))
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    lines = result.stdout.split("\n")
    assert "rc=0" in lines and "alive" in lines, result.stdout + result.stderr
    for option in ("errexit", "nounset", "pipefail"):
        assert any(line.split() == [option, "off"] for line in lines), result.stdout
    assert f"python={venv}/bin/python" in lines

    broken = tmp_path / "venv"  # an environment whose python cannot import anything: the bootstrap must fail
    (broken / "bin").mkdir(parents=True)
    (broken / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")
    (broken / "bin" / "python").chmod(0o755)
    (broken / "bin" / "activate").write_text(f'PATH="{broken}/bin:$PATH"\n')
    script = (f'set -u; source "{ROOT}/examples/bootstrap_env.sh" > /dev/null 2>&1; echo "rc=$?"; '
              'set -o | grep -E "^(errexit|nounset|pipefail)"; echo alive')
    env = dict(os.environ, PUFFIN_VENV=str(broken), PIP_NO_INDEX="1")
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    lines = result.stdout.split("\n")
    assert "alive" in lines and "rc=0" not in lines, result.stdout + result.stderr
    assert any(line.split() == ["nounset", "on"] for line in lines)  # the caller's own option is kept
    assert any(line.split() == ["errexit", "off"] for line in lines)


# -- benchmarks/gpu_check.sh ------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_tests", [False, True], ids=["benchmarks", "with_tests"])
def test_gpu_check_runs_the_benchmarks_and_the_gpu_tests_only_when_asked(tmp_path, with_tests):
    """The interpreter is a stand-in recording each call (every one succeeds, as on a GPU machine): gpu_check.py
    gets the flags meant for it, never --with-tests; both benchmarks run; pytest tests/gpu only with --with-tests."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$*" >> "$FAKE_RECORD"\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_RECORD": str(tmp_path / "record"),
           "PYTHON": str(fake)}
    flags = ["--with-tests"] * with_tests + ["--batch", "2"]
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *flags], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = recorded(tmp_path)
    assert calls[0] == "benchmarks/gpu_check.py --batch 2"
    assert sum("benchmarks/bench_dit.py" in call for call in calls) == 2  # eager and --compile
    assert sum("benchmarks/bench_training.py --full-size" in call for call in calls) == 2  # levers off and on
    assert ("-m pytest tests/gpu -q -rs" in calls) == with_tests
    assert ("== tests/gpu" in result.stdout) == with_tests and "status 0" in result.stdout
