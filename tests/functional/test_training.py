"""pretrain_puffin.py end to end through the real CLI on the tiny configuration (examples/tiny/*.args).

(a) a run stopped by SIGTERM and resumed with --load repeats the uninterrupted run's per-iteration losses exactly
    (fp32, CPU), and within 1e-6 when resumed at another data-parallel size;
(b) a stage hand-off (--pretrained-checkpoint) loads the weights and starts a fresh optimizer and schedule;
(c) a process killed while writing a checkpoint leaves the previous checkpoint as the latest, and it loads;
(d) golden per-iteration losses of 20 iterations of the tiny stage 2 (tests/functional/golden/stage2_sft.json;
    regenerate deliberately with PUFFIN_REGENERATE_GOLDEN=1);
(e) bad flag combinations fail before training, naming the flag.
"""
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from helpers.faults import file_size_limit_in_child
from megatron_puffin.training import host_memory
from helpers.puffin import CLI_ENV as ENV, ROOT, make_tiny_dataset, metrics_losses as _losses, process_running, \
    run_pretrain, start_script

TINY = ROOT / "examples" / "tiny"
GOLDEN = Path(__file__).parent / "golden" / "stage2_sft.json"
STAGE = [f"@{TINY / 'model.args'}", "--num-workers", "0", "--log-interval", "1"]
# Stage-2 shape (everything trains but the VAE), without the vision encoder's train-mode randomness so that a change
# of data-parallel size gives the same numbers; MICRO_BATCH_SIZE comes from --micro-batch-size.
STREAMS = ["--task-stream", "image2text:tiny/data/main", "--task-stream", "cam2image:tiny/data/main",
           "--freeze-vision", "--train-iters", "8", "--lr", "1e-3", "--lr-warmup-iters", "2"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_tiny_dataset(root / "tiny", num_samples=16, num_heldout=4)  # the tiny stage files validate on it
    return root


@pytest.fixture(scope="module")
def stage1(workdir):
    """A short stage 1 whose checkpoint later stages start from."""
    run_pretrain(workdir, *STAGE, f"@{TINY / 'stage1_alignment.args'}", "--train-iters", "3", "--lr-warmup-iters", "1", "--save", "s1",
         "--save-interval", "100")
    return workdir / "s1"


def test_sigterm_then_resume_repeats_the_uninterrupted_run_exactly(workdir):
    run_pretrain(workdir, *STAGE, *STREAMS, "--micro-batch-size", "2", "--metrics-file", "full.jsonl")
    full = _losses(workdir / "full.jsonl")
    assert sorted(full) == list(range(1, 9))

    # A real process (forked from the suite's pre-imported server, helpers.puffin.start_script) gets the SIGTERM.
    proc = start_script(ROOT / "pretrain_puffin.py", *STAGE, *STREAMS, "--micro-batch-size", "2", "--save", "run",
                        "--metrics-file", "part1.jsonl", cwd=workdir, env=ENV)
    metrics = workdir / "part1.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    output = "".join(proc.communicate(timeout=300))
    assert proc.returncode == 75, output[-3000:]
    part1 = _losses(metrics)
    stopped = max(part1)
    assert 3 <= stopped < 8, f"stopped at {stopped}"
    assert (workdir / "run" / f"iter_{stopped:07d}").is_dir()
    status = json.loads((workdir / "run" / "run_status.json").read_text())
    assert (status["status"], status["reason"], status["iteration"]) == ("interrupted", "signal", stopped)

    # The resumed half keeps freed host memory for reuse (training.host_memory): no number may change.
    resumed = run_pretrain(workdir, *STAGE, *STREAMS, "--micro-batch-size", "2", "--load", "run", "--save", "run",
                   "--metrics-file", "part2.jsonl", "--host-malloc-cache")
    assert f"at iteration {stopped}" in resumed.stderr
    if host_memory._glibc() is not None:
        assert "host memory cache: glibc" in resumed.stderr
    part2 = _losses(workdir / "part2.jsonl")
    assert sorted(part2) == list(range(stopped + 1, 9))
    assert {**part1, **part2} == full  # bit-identical floats
    assert json.loads((workdir / "run" / "run_status.json").read_text())["status"] == "finished"

    # The same checkpoint resumed at data-parallel size 2 (same global batch: 1 sample per rank per micro-batch).
    run_pretrain(workdir, *STAGE, *STREAMS, "--micro-batch-size", "1", "--load", f"run/iter_{stopped:07d}",
         "--metrics-file", "dp2.jsonl", nproc=2)
    dp2 = _losses(workdir / "dp2.jsonl")
    assert sorted(dp2) == list(range(stopped + 1, 9))
    for iteration, tasks in dp2.items():
        for task, loss in tasks.items():
            assert loss == pytest.approx(full[iteration][task], rel=1e-6, abs=0), (iteration, task)


def _plain_tensors(directory):
    import torch
    from megatron.core import dist_checkpointing

    import megatron_puffin.distributed as mpd

    mpd.initialize()
    try:
        loaded = dist_checkpointing.load_plain_tensors(str(directory))
    finally:
        mpd.destroy()
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def test_stage_handoff_loads_weights_and_starts_fresh_optimizer(workdir, stage1):
    proc = run_pretrain(workdir, *STAGE, f"@{TINY / 'stage2_sft.args'}", "--pretrained-checkpoint", "s1", "--save", "s2",
                "--train-iters", "1", "--lr", "0", "--lr-warmup-iters", "0", "--lr-warmup-init", "0",
                "--metrics-file", "handoff.jsonl")
    for tower in ("llm", "vision", "queries", "dit"):
        assert f"weights of {tower:<8} <- pretrained checkpoint" in proc.stderr
    assert sorted(_losses(workdir / "handoff.jsonl")) == [1]  # the iteration count starts again
    first = _plain_tensors(stage1 / "iter_0000003")
    second = _plain_tensors(workdir / "s2" / "iter_0000001")
    model_keys = [k for k in second if not k.startswith("optimizer.")]
    assert len(model_keys) > 50 and all(k in first for k in model_keys)
    for key in model_keys:  # lr 0: the weights are exactly stage 1's
        assert first[key].equal(second[key]), key
    # Fresh Adam state: after ONE step from zero moments, m = (1 - b1) g and v = (1 - b2) g^2, so m^2 / v is
    # (1 - 0.9)^2 / (1 - 0.95) = 0.2 wherever g != 0. Moments carried over from stage 1 would break this.
    prefix = "optimizer.state.exp_avg."
    checked = 0
    for key in [k for k in second if k.startswith(prefix)]:
        m, v = second[key], second["optimizer.state.exp_avg_sq." + key[len(prefix):]]
        nonzero = v > 1e-30
        if nonzero.any():
            ratio = m[nonzero] ** 2 / v[nonzero]
            assert ratio.sub(0.2).abs().max() < 1e-3, key
            checked += 1
    assert checked > 10
    assert any(k.startswith(prefix + "llm.") for k in second)  # the LLM trains from stage 2 on...
    assert not any(k.startswith(prefix + "llm.") for k in first)  # ...it was frozen in stage 1
    meta = json.loads((workdir / "s2" / "iter_0000001" / "puffin_meta.json").read_text())
    assert [entry["stage"] for entry in meta["lineage"]] == ["stage1_alignment", "stage2_sft"]
    assert meta["lineage"][1]["weights"]["llm"].startswith("pretrained checkpoint")


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(workdir):
    from megatron_puffin.checkpointing import resolve_checkpoint

    flags = [*STAGE, *STREAMS, "--micro-batch-size", "2", "--save", "killed", "--save-interval", "2"]
    proc = start_script(ROOT / "pretrain_puffin.py", *flags, cwd=workdir, env=ENV)  # a real process, forked
    staging = workdir / "killed" / "iter_0000004.tmp"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not staging.exists():
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert staging.exists(), "the run ended before writing its second checkpoint"
    assert resolve_checkpoint(str(workdir / "killed")) == str(workdir / "killed" / "iter_0000002")
    # Stopping earlier keeps the checkpoint's learning-rate schedule (decay over the first run's 8 iterations).
    resumed = run_pretrain(workdir, *flags, "--load", "killed", "--train-iters", "3", "--lr-decay-iters", "8")
    assert "at iteration 2" in resumed.stderr


def test_a_failed_checkpoint_write_ends_the_run_with_one_line_and_no_process_left(workdir):
    """The save directory stops being a directory after the first checkpoint (a lost mount, a cleanup script): the
    next save fails with one line naming the iteration and the newest complete checkpoint, exit 1, and neither the
    data-loader workers nor the checkpoint queue's process outlive the rank (no wait on them at exit)."""
    flags = [*STAGE, *STREAMS, "--num-workers", "2", "--micro-batch-size", "2", "--save", "lost",
             "--save-interval", "2"]
    proc = start_script(ROOT / "pretrain_puffin.py", *flags, cwd=workdir, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (workdir / "lost" / "iter_0000002").is_dir():
        time.sleep(0.01)
    children = [int(pid) for task in Path(f"/proc/{proc.pid}/task").glob("*")
                for pid in (task / "children").read_text().split()]
    (workdir / "lost").rename(workdir / "lost.moved")
    (workdir / "lost").write_text("not a directory\n")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "pretrain_puffin.py (rank 0): writing the checkpoint of iteration 4 to lost failed: [Errno 20] Not a " \
           "directory" in stderr, stderr[-3000:]
    assert len(children) >= 3  # two workers and the queue's process
    deadline = time.time() + 60
    while time.time() < deadline and any(process_running(pid) for pid in children):
        time.sleep(0.05)
    assert not [pid for pid in children if process_running(pid)]


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_frees_the_half_written_files(workdir):
    """megatron-core's writers report a failed write (ENOSPC; here EFBIG from a per-file size limit that the
    checkpoint's 1 MB shards exceed) as torch's CheckpointException, whose text is a traceback per rank."""
    import subprocess
    import sys

    command = [sys.executable, str(ROOT / "pretrain_puffin.py"), *STAGE, *STREAMS, "--micro-batch-size", "2",
               "--train-iters", "4", "--save", "full", "--save-interval", "2"]
    proc = subprocess.run(command, cwd=workdir, env=dict(ENV, PYTHONWARNINGS="ignore"), capture_output=True,
                          text=True, timeout=600, preexec_fn=file_size_limit_in_child(500_000))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("pretrain_puffin.py (rank 0): writing the checkpoint of iteration 2 to full failed: ") \
        and "MiB free on its file system); the newest complete checkpoint there: none" in line, line
    assert sorted(p.name for p in (workdir / "full").iterdir()) == [".puffin_run.lock"]  # no iter_0000002.tmp


def test_golden_losses_of_tiny_stage2(workdir):
    run_pretrain(workdir, *STAGE, f"@{TINY / 'stage2_sft.args'}", "--pretrained-checkpoint", "", "--save", "golden",
         "--train-iters", "20", "--save-interval", "100", "--metrics-file", "golden.jsonl")
    losses = _losses(workdir / "golden.jsonl")
    record = {str(iteration): tasks for iteration, tasks in sorted(losses.items())}
    if os.environ.get("PUFFIN_REGENERATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert sorted(record, key=int) == sorted(golden, key=int) == [str(i) for i in range(1, 21)]
    for iteration, tasks in golden.items():
        for task, loss in tasks.items():
            # CPU kernels may round differently on another CPU model; 1e-4 relative still catches any change of
            # the data order, the noise, the model or the optimizer.
            assert record[iteration][task] == pytest.approx(loss, rel=1e-4), (iteration, task)


def test_bad_flags_fail_before_training(workdir):
    """Three mistakes in one run (one validation pass reports them all; one process instead of three)."""
    proc = run_pretrain(workdir, *STAGE, *STREAMS, "--global-batch-size", "5", "--task-stream",
                        "image2image:tiny/data/nowhere:2", "--vae-config", "", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    for message in ("--global-batch-size (5) must be a whole number of task-stream cycles", "tiny/data/nowhere",
                    "needs the VAE"):
        assert message in proc.stderr, (message, proc.stderr[-3000:])
    assert "iter 1/" not in proc.stderr


def test_a_second_run_on_the_same_save_directory_stops_before_any_work(workdir):
    """Two runs on one --save (a job submitted twice) would remove each other's half-written iter_N.tmp and could
    publish a checkpoint of both: rank 0 holds --save's run lock, the second run stops naming the holder; the lock
    goes with the run (released at its end, and by the kernel when a holder is killed)."""
    from megatron_puffin.training.run_lock import lock_save_directory

    held = lock_save_directory(str(workdir / "shared_save"))  # this process plays the first run
    try:
        proc = run_pretrain(workdir, *STAGE, *STREAMS, "--micro-batch-size", "2", "--save", "shared_save",
                            "--load", "shared_save", check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"--save shared_save is in use by another training run (pid {os.getpid()} on" in proc.stderr
        assert "iter 1/" not in proc.stderr and not list((workdir / "shared_save").glob("iter_*"))
        with pytest.raises(Exception, match="in use by another training run"):
            lock_save_directory(str(workdir / "shared_save"))  # also within one process: one lock per open
    finally:
        held.release()
    lock_save_directory(str(workdir / "shared_save")).release()  # free again
    # a --save that cannot be created (under /proc mkdir fails for every user, root too) is one line: the flag
    # validation finds it; the lock, taken later, says so too if the folder became unwritable in between
    proc = run_pretrain(workdir, *STAGE, *STREAMS, "--micro-batch-size", "2", "--save", "/proc/puffin_run",
                        check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "--save (/proc/puffin_run): the folder /proc is not writable" in proc.stderr, proc.stderr[-2000:]
    with pytest.raises(Exception, match=r"--save /proc/puffin_run: cannot create or write there \(No such file or "
                                        r"directory\); give a folder this job can write$"):
        lock_save_directory("/proc/puffin_run")


def _memory_limited(limit_bytes: int):
    """``preexec_fn``: the child's address space is capped, so a large enough allocation really fails."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))


def test_a_step_that_runs_out_of_memory_is_one_line_and_keeps_the_steps_before_it(workdir):
    """A micro-batch too large for the memory was the allocator's traceback from inside megatron-core's schedule,
    and the steps trained since the last checkpoint were lost. Here a real process under a 3 GiB address-space limit
    (the tiny run needs under 2 GiB) trains step 1 (image2text x2) and runs out at step 2: one line naming the step
    and the remedies, exit 1, step 1 saved (a process alone: with other ranks, a failed step leaves them inside its
    collectives), and that checkpoint resumes. (The loader's own out-of-memory path, collating with --num-workers
    0, is not run here: under an address-space limit the save after it cannot start its threads.)"""
    import subprocess
    import sys

    def run(large: int, save: str) -> str:
        streams = ["--task-stream", "image2text:tiny/data/main:2", "--task-stream",
                   f"image2text:tiny/data/main:{large}", "--micro-batches-per-step", "1", "--train-iters", "3",
                   "--lr", "1e-3", "--lr-warmup-iters", "1", "--save", save]
        proc = subprocess.run([sys.executable, str(ROOT / "pretrain_puffin.py"), *STAGE, *streams], cwd=workdir,
                              env=ENV, capture_output=True, text=True, timeout=300,
                              preexec_fn=_memory_limited(3 << 30))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        status = json.loads((workdir / save / "run_status.json").read_text())
        assert (status["status"], status["iteration"]) == ("failed", 1), status
        line = proc.stderr.strip().splitlines()[-1]
        assert "Lower the streams' micro-batch sizes" in line, line
        assert line.endswith(f"The same command resumes from {save}/iter_0000001, the newest complete checkpoint"), line
        return line

    # in the step: 3000 images collate into 0.33 GB, their activations do not fit
    line = run(3000, "oom_step")
    assert line.startswith("pretrain_puffin.py (rank 0): iteration 2 (micro-batches image2text x3000) ran out of "
                           "memory (RuntimeError: "), line
    # out of memory in the first step: nothing is trained, and no checkpoint is written (one saved before any
    # step held no optimizer state and did not load: a KeyError traceback on resuming)
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain_puffin.py"), *STAGE, "--task-stream",
                           "image2text:tiny/data/main:3000", "--train-iters", "3", "--lr", "1e-3", "--lr-warmup-iters",
                           "1", "--save", "oom_first"], cwd=workdir, env=ENV, capture_output=True, text=True,
                          timeout=300, preexec_fn=_memory_limited(3 << 30))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().endswith("No complete checkpoint in oom_first yet: the same command starts over")
    assert not list((workdir / "oom_first").glob("iter_*"))
    assert json.loads((workdir / "oom_first" / "run_status.json").read_text())["checkpoint"] is None
    # the checkpoint loads: the run goes on from step 1 with micro-batches that fit
    run_pretrain(workdir, *STAGE, "--task-stream", "image2text:tiny/data/main:2", "--task-stream",
                 "image2text:tiny/data/main:2", "--micro-batches-per-step", "1", "--train-iters", "3", "--lr", "1e-3",
                 "--lr-warmup-iters", "1", "--save", "oom_step", "--load", "oom_step")
    assert json.loads((workdir / "oom_step" / "run_status.json").read_text())["status"] == "finished"


def test_load_of_a_checkpoint_with_another_model_shape_fails_before_training(workdir, stage1):
    """The tensor-shape check at load time, for a checkpoint whose puffin_meta.json stores no flags (another
    version's): the validation pass compares stored flags (tests/functional/test_flag_cli.py), the load every
    tensor."""
    from megatron_puffin.checkpoint_safety import write_manifest

    shutil.copytree(stage1, workdir / "s1_no_flags")
    checkpoint = workdir / "s1_no_flags" / "iter_0000003"
    meta = json.loads((checkpoint / "puffin_meta.json").read_text())
    del meta["args"]
    (checkpoint / "puffin_meta.json").write_text(json.dumps(meta))
    write_manifest(str(checkpoint))
    # Stage 1's freezing and schedule (other ones are refused at start-up, see test_checkpoint_resume.py), so that
    # the shape check is what fails.
    proc = run_pretrain(workdir, *STAGE, *STREAMS, "--hidden-size", "64", "--load", "s1_no_flags", "--freeze-llm",
                        "--freeze-dit", "--override-opt-param-scheduler", check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "does not fit the configured model" in proc.stderr and "llm.decoder" in proc.stderr
    assert "iter 1/" not in proc.stderr


def test_distributed_optimizer_checkpoint_resumes_at_another_data_parallel_size(workdir):
    """ZeRO-1 state saved by 2 ranks and resumed by 1 (megatron-core's fully reshardable format); one task per
    step, as the reference's stage 4, so the Adam moments of towers a task does not touch must survive too."""
    flags = [*STAGE, "--task-stream", "image2text_cross_view:tiny/data/cross_view", "--task-stream",
             "image2image:tiny/data/cross_view", "--freeze-vision", "--micro-batches-per-step", "1",
             "--train-iters", "6", "--lr", "5e-4", "--lr-warmup-iters", "2", "--use-distributed-optimizer"]
    run_pretrain(workdir, *flags, "--micro-batch-size", "1", "--save", "zero", "--save-interval", "3",
         "--metrics-file", "zero_dp2.jsonl", nproc=2)
    run_pretrain(workdir, *flags, "--micro-batch-size", "2", "--load", "zero/iter_0000003", "--metrics-file", "zero_dp1.jsonl")
    full, resumed = _losses(workdir / "zero_dp2.jsonl"), _losses(workdir / "zero_dp1.jsonl")
    assert sorted(resumed) == [4, 5, 6]
    for iteration, tasks in resumed.items():
        for task, loss in tasks.items():
            assert loss == pytest.approx(full[iteration][task], rel=1e-6, abs=0), (iteration, task)
