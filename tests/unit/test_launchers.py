"""examples/train.sh and examples/slurm/train.sbatch: syntax, usage errors, the command lines they run, exit status
and the Slurm stop / requeue protocol.

torchrun, srun and scontrol are replaced by small scripts on PATH that record how they were called (the launchers
are the things under test; the real torchrun is exercised by the distributed tests, Slurm is not available here).
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

FAKE_TORCHRUN = """#!/usr/bin/env bash
echo "fake torchrun PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-}"
printf '%s\\n' "$@" > "$FAKE_RECORD"
exit "${FAKE_EXIT:-0}"
"""
# Like srun -> torchrun: on SIGUSR1 the ranks save and torchrun exits 1 (it reports a rank's 75 as 1).
FAKE_SRUN = """#!/usr/bin/env bash
trap 'echo USR1 >> "$FAKE_RECORD.signals"; exit 1' USR1
printf '%s\\n' "$@" > "$FAKE_RECORD"
for _ in $(seq "${FAKE_TICKS:-1}"); do sleep 0.05; done
exit "${FAKE_EXIT:-0}"
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
    for name, text in (("torchrun", FAKE_TORCHRUN), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
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


@pytest.mark.parametrize("script", [TRAIN_SH, SBATCH])
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


def test_train_sh_takes_nproc_and_a_fixed_master_port(fakes):
    tmp_path, env = fakes
    env.update(NPROC_PER_NODE="2", MASTER_PORT="29611", CUDA_VISIBLE_DEVICES="")
    assert run(TRAIN_SH, env).returncode == 0
    assert recorded(tmp_path)[:8] == ["--nnodes", "1", "--master-addr", "127.0.0.1", "--master-port", "29611",
                                      "--nproc-per-node", "2"]
    del env["NPROC_PER_NODE"]
    assert run(TRAIN_SH, env).returncode == 0
    assert recorded(tmp_path)[6:8] == ["--nproc-per-node", "1"]  # no visible GPU: one process


# -- examples/slurm/train.sbatch ---------------------------------------------------------------------------------
def slurm_env(env, tmp_path, **extra):
    env = dict(env, SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-node-[07-08]",
               SLURM_SUBMIT_DIR=str(ROOT), SAVE_DIR=str(tmp_path / "run"), PUFFIN_VENV=str(tmp_path / "no-venv"))
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
        "--kill-on-bad-exit=1", "torchrun", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "gpu-node-07:29500", "--rdzv-id", "4242", str(ROOT / "pretrain_puffin.py"),
        f"@{env['STAGE_ARGS']}", "--save", str(tmp_path / "run"), "--load", str(tmp_path / "run"), "--lr", "2e-5",
    ]
    assert not recorded(tmp_path, ".requeue")


@pytest.mark.parametrize("code, requeued, status", [(75, True, 0), (0, False, 0), (3, False, 3)])
def test_sbatch_requeues_exactly_on_exit_75(fakes, code, requeued, status):
    tmp_path, env = fakes
    result = run(SBATCH, slurm_env(env, tmp_path, FAKE_EXIT=str(code)))
    assert result.returncode == status, result.stderr
    assert recorded(tmp_path, ".requeue") == (["4242"] if requeued else [])


def test_sbatch_forwards_usr1_to_the_step_and_requeues(fakes):
    tmp_path, env = fakes
    process = subprocess.Popen(["bash", str(SBATCH)], env=slurm_env(env, tmp_path, FAKE_TICKS="400"),
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


def test_sbatch_stops_requeueing_after_max_requeues(fakes):
    tmp_path, env = fakes
    result = run(SBATCH, slurm_env(env, tmp_path, FAKE_EXIT="75", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3"))
    assert result.returncode == 75 and not recorded(tmp_path, ".requeue")
    assert "MAX_REQUEUES" in result.stderr


def test_sbatch_without_save_dir_prints_usage(fakes):
    tmp_path, env = fakes
    env = slurm_env(env, tmp_path)
    del env["SAVE_DIR"]
    result = run(SBATCH, env)
    assert result.returncode == 2 and "SAVE_DIR is not set" in result.stderr and not recorded(tmp_path)
