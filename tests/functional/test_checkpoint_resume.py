"""Checkpoint safety and resume through the real CLI (pretrain_puffin.py) on the tiny configuration.

One 4-iteration run (checkpoints at 2 and 4; shared with other modules: helpers.puffin.tiny_run) serves every
case; each case works on a copy of its directory.
(a) start-up decisions, before any work (exit 2, one message naming the directory and the fix): a typo in --load,
    another run's checkpoints in --save, a rollback over later checkpoints, a changed learning-rate schedule,
    toggled --use-distributed-optimizer / --freeze-llm, other task streams or data seed, a global batch another
    data-parallel size would change (kept when possible), a damaged checkpoint named explicitly, a crafted
    .metadata (the file it would create is not created); moved data resumes exactly, a dataset of another size is
    one line;
(b) a damaged newest checkpoint is skipped with a warning and the run resumes from the previous one, bit-exact;
(c) flipped bytes inside a .distcp: one line naming the file;
(d) --overwrite-checkpoints replaces a rolled-back run's checkpoints, bit-exact to the original run;
(e) --override-opt-param-scheduler applies the new schedule from the checkpoint's step;
(f) PP=2 with --use-distributed-optimizer resumes bit-exact, and the same checkpoint resumes at TP=2 (1e-6).
"""
import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import pytest

from helpers.puffin import RESUME_FLAGS as FLAGS, ROOT, make_tiny_dataset, metrics_losses as _losses, run_pretrain, \
    tiny_pp_run, tiny_run

MBS2 = ["--micro-batch-size", "2"]


def _lrs(path):
    return {json.loads(line)["iteration"]: json.loads(line)["learning_rate"]
            for line in Path(path).read_text().splitlines()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    shutil.copytree(tiny_run(), root, dirs_exist_ok=True)  # the shared 4-iteration run (helpers.puffin.tiny_run)
    assert sorted(_losses(root / "full.jsonl")) == [1, 2, 3, 4]
    return root


def _copy(workdir, name):
    shutil.rmtree(workdir / name, ignore_errors=True)
    shutil.copytree(workdir / "run", workdir / name)
    return workdir / name


class CreatesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _startup(monkeypatch, capsys, workdir, *flags):
    """pretrain_puffin.main() in this process, for cases decided before any process group: (exit code, stderr)."""
    spec = importlib.util.spec_from_file_location("pretrain_puffin_cli", ROOT / "pretrain_puffin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(workdir)
    code = module.main([*FLAGS, *map(str, flags)])
    return code, capsys.readouterr().err


def test_startup_decisions(workdir, monkeypatch, capsys):
    run = workdir / "run"
    cases = [
        (["--load", "rnu"], "--load rnu: no such directory; check the path"),
        (["--save", "run"], "--save run already holds checkpoints of another run (iter_0000002, iter_0000004); "
                            "resume it with --load run"),
        (["--load", "run/iter_0000002", "--save", "run"], "holds checkpoints newer than --load run/iter_0000002 "
                                                          "(iteration 2): iter_0000004"),
        (["--load", "run", "--lr", "2e-3"], "--lr 0.001 (checkpoint) vs 0.002 (now)"),
        (["--load", "run", "--train-iters", "6"], "decay iterations (--lr-decay-iters, else --train-iters) 4 "
                                                  "(checkpoint) vs 6 (now)"),
        (["--load", "run", "--use-distributed-optimizer"], "was trained without --use-distributed-optimizer"),
        (["--load", "run", "--freeze-llm"], "was trained without --freeze-llm: the checkpoint holds that tower's "
                                            "optimizer state"),
        (["--load", "run", "--task-stream", "text2text:tiny/data/main"],
         "--load run/iter_0000004 was trained on the task streams image2text#0, cam2image#0"),
        (["--load", "run", "--seed", "7"], "drew its sample order with data seed 1234 (--data-seed, else --seed); this "
                                           "run gives 7. Resume with --data-seed 1234, or start from its weights with "
                                           "a new data order and optimizer: --pretrained-checkpoint run/iter_0000004"),
    ]
    for flags, message in cases:
        code, err = _startup(monkeypatch, capsys, workdir, *MBS2, *flags)
        assert code == 2 and message in err, (flags, err)
        assert "Traceback" not in err

    # Explicitly named damaged checkpoints: one problem naming the file.
    damaged = _copy(workdir, "damaged")
    (damaged / "iter_0000002" / "common.pt").unlink()
    (damaged / "iter_0000004" / ".metadata").write_bytes(b"")
    code, err = _startup(monkeypatch, capsys, workdir, *MBS2, "--load", "damaged/iter_0000002")
    assert code == 2 and "damaged/iter_0000002/common.pt is missing" in err
    code, err = _startup(monkeypatch, capsys, workdir, *MBS2, "--load", "damaged/iter_0000004")
    assert code == 2 and "damaged/iter_0000004/.metadata has 0 bytes, the manifest records" in err
    (damaged / "iter_0000004" / "puffin_meta.json").write_text("[1, 2")
    code, err = _startup(monkeypatch, capsys, workdir, *MBS2, "--load", "damaged")
    assert code == 2 and "damaged: no usable checkpoint; the newest, damaged/iter_0000004, is damaged: " \
        "damaged/iter_0000004/puffin_meta.json has 5 bytes, the manifest records" in err

    code, err = _startup(monkeypatch, capsys, workdir, *MBS2, "--pretrained-checkpoint", "damaged/iter_0000002",
                         "--llm-checkpoint", "nowhere")
    assert code == 2 and "--pretrained-checkpoint damaged/iter_0000002: damaged/iter_0000002/common.pt is missing" \
        in err and err.count("nowhere") == 1 and "--llm-checkpoint (nowhere) does not exist; check the path" in err

    # A crafted .metadata (with a matching manifest) is refused before any work; its file is never created.
    from megatron_puffin.checkpoint_safety import write_manifest

    crafted = _copy(workdir, "crafted")
    victim = workdir / "created_by_metadata"
    (crafted / "iter_0000004" / ".metadata").write_bytes(pickle.dumps(CreatesFile(victim)))
    write_manifest(str(crafted / "iter_0000004"))
    proc = run_pretrain(workdir, *FLAGS, *MBS2, "--load", "crafted/iter_0000004", check=False)
    assert proc.returncode == 2 and "crafted/iter_0000004/.metadata asks to create" in proc.stderr
    assert not victim.exists()

    # The checkpoint's global batch (4 samples per step) is kept when this run's flags would change it and it is a
    # whole number of task-stream cycles; otherwise the run is refused.
    from megatron_puffin.config import ConfigError
    from megatron_puffin.training.preflight import parse_run_args
    from megatron_puffin.training.resume import samples_per_step

    args = parse_run_args([*FLAGS, "--micro-batch-size", "1", "--load", str(run)])  # 2 samples per cycle
    assert args.training.global_batch_size == 4 and samples_per_step(args) == 4
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parse_run_args([*FLAGS, "--micro-batch-size", "1", "--load", str(run)])  # 2 ranks x 1: the same batch
    assert args.training.global_batch_size is None and samples_per_step(args) == 4
    with pytest.raises(ConfigError, match="was trained with 4 samples per optimizer step; this run's flags give 8 "
                                          r"\(data-parallel size 2") as refused:
        parse_run_args([*FLAGS, *MBS2, "--load", str(run)])
    # the fix it names: each stream's micro-batch size halved (2 -> 1), after which the batch is kept
    assert "MICRO_BATCH_SIZE x 1/2 where they are set (image2text:tiny/data/main:1, cam2image:tiny/data/main:1)" \
        in str(refused.value) and "set --global-batch-size 8" in str(refused.value)
    # A program that parses its flags with config.parse_args (which reads no checkpoint) and builds the trainer gets
    # the same refusal from the trainer, before any process group.
    from megatron_puffin.config import parse_args
    from megatron_puffin.training.loop import Trainer

    with pytest.raises(ConfigError, match="was trained with 4 samples per optimizer step; this run's flags give 8"):
        Trainer(parse_args([*FLAGS, *MBS2, "--load", str(run)]))


def test_moved_data_resumes_and_a_dataset_of_another_size_is_one_line(workdir):
    """Stream names do not hold paths: the same data elsewhere resumes; a dataset whose sample count changed (found
    when the loader opens it, after the process group) is one line naming the stream, the counts and the fix."""
    flags = [flag for i, flag in enumerate(FLAGS) if "--task-stream" not in FLAGS[max(i - 1, 0):i + 1]]
    shutil.rmtree(workdir / "moved", ignore_errors=True)
    shutil.copytree(workdir / "tiny" / "data", workdir / "moved")
    streams = ["--task-stream", "image2text:moved/main", "--task-stream", "cam2image:moved/main"]
    run_pretrain(workdir, *flags, *MBS2, *streams, "--load", "run/iter_0000002", "--metrics-file", "moved.jsonl")
    assert _losses(workdir / "moved.jsonl") == {i: _losses(workdir / "full.jsonl")[i] for i in (3, 4)}

    make_tiny_dataset(workdir / "smaller", num_samples=8)
    streams = ["--task-stream", "image2text:smaller/data/main", "--task-stream", "cam2image:smaller/data/main"]
    proc = run_pretrain(workdir, *flags, *MBS2, *streams, "--load", "run", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "--load run/iter_0000004: stream image2text#0 had 16 samples when saved, now 8: the dataset changed, so " \
        "the saved order cannot be continued; point --task-stream at the data it was trained on" in proc.stderr


def _rewrite_meta(checkpoint, **changes):
    """Make ``checkpoint``'s metadata say it was trained otherwise (its manifest rewritten to match)."""
    from megatron_puffin.checkpoint_safety import write_manifest

    meta = json.loads((checkpoint / "puffin_meta.json").read_text())
    meta["args"]["parallel"].update(changes.pop("parallel", {}))
    meta.update(changes)
    (checkpoint / "puffin_meta.json").write_text(json.dumps(meta))
    write_manifest(str(checkpoint))


def test_fsdp2_startup_refusals(workdir, monkeypatch, capsys):
    """What --use-torch-fsdp2 cannot load is refused before any work, one line naming the fix: a distributed
    optimizer's state, and an FSDP2 checkpoint saved at DP 2 before FSDP2 checkpoints resharded (its metadata lacks
    the fsdp2_records mark), also as --pretrained-checkpoint; with the mark it is accepted."""
    from megatron_puffin.config import parse_args
    from megatron_puffin.training.resume import startup_problems

    checkpoint = _copy(workdir, "fsdp2_meta") / "iter_0000004"
    name = checkpoint.relative_to(workdir)
    _rewrite_meta(checkpoint, parallel={"use_distributed_optimizer": True})
    code, err = _startup(monkeypatch, capsys, workdir, *MBS2, "--use-torch-fsdp2", "--load", name)
    assert code == 2 and f"--load {name} was trained with --use-distributed-optimizer, whose optimizer state " \
        "--use-torch-fsdp2 cannot read; resume it without --use-torch-fsdp2" in err, err
    _rewrite_meta(checkpoint, parallel={"use_distributed_optimizer": False, "use_torch_fsdp2": True},
                  layout={"tp": 1, "pp": 1, "dp": 2})
    code, err = _startup(monkeypatch, capsys, workdir, *MBS2, "--use-torch-fsdp2", "--load", name)
    assert code == 2 and f"--load {name} was saved with --use-torch-fsdp2 at data-parallel size 2 by a version " in err
    code, err = _startup(monkeypatch, capsys, workdir, *MBS2, "--pretrained-checkpoint", name)
    assert code == 2 and f"--pretrained-checkpoint {name} was saved with --use-torch-fsdp2" in err, err
    assert "Traceback" not in err
    _rewrite_meta(checkpoint, fsdp2_records=2)
    assert startup_problems(parse_args([*FLAGS, *MBS2, "--pretrained-checkpoint", str(name)])) == []


def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(workdir):
    fallback = _copy(workdir, "fallback")
    shard = sorted((fallback / "iter_0000004").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    proc = run_pretrain(workdir, *FLAGS, *MBS2, "--load", "fallback", "--save", "fallback", "--metrics-file", "fb.jsonl")
    assert f"skipping damaged checkpoint fallback/iter_0000004: fallback/iter_0000004/{shard.name} has 1000 " \
        "bytes" in proc.stderr
    assert "at iteration 2" in proc.stderr
    full = _losses(workdir / "full.jsonl")
    assert _losses(workdir / "fb.jsonl") == {3: full[3], 4: full[4]}  # bit-identical
    kept = [p.name for p in fallback.iterdir() if p.name.startswith("iter_0000004.replaced-")]
    assert len(kept) == 1 and (fallback / kept[0] / shard.name).stat().st_size == 1000  # the damaged one, kept
    from megatron_puffin.checkpointing import checkpoint_problems

    assert checkpoint_problems(str(fallback / "iter_0000004")) == []


def test_flipped_bytes_are_reported_naming_the_file(workdir):
    flipped = _copy(workdir, "flipped")
    shard = sorted((flipped / "iter_0000004").glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    for i in range(8):
        data[len(data) // 2 + i] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_pretrain(workdir, *FLAGS, *MBS2, "--load", "flipped/iter_0000004", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"flipped/iter_0000004/{shard.name} does not match its SHA-256 in puffin_manifest.json" in last
    assert "Traceback" not in proc.stderr


def test_overwrite_checkpoints_replaces_a_rolled_back_run(workdir):
    rollback = _copy(workdir, "rollback")
    shutil.copytree(rollback / "iter_0000004", rollback / "iter_0000006")  # a later checkpoint of the old run
    old_inode = (rollback / "iter_0000004").stat().st_ino
    proc = run_pretrain(workdir, *FLAGS, *MBS2, "--load", "rollback/iter_0000002", "--save", "rollback",
                "--overwrite-checkpoints", "--metrics-file", "rb.jsonl")
    full = _losses(workdir / "full.jsonl")
    assert _losses(workdir / "rb.jsonl") == {3: full[3], 4: full[4]}
    assert "replaced checkpoint rollback/iter_0000004 (--overwrite-checkpoints)" in proc.stderr
    assert sorted(p.name for p in rollback.iterdir() if p.name.startswith("iter_")) == \
        ["iter_0000002", "iter_0000004"]
    assert (rollback / "iter_0000004").stat().st_ino != old_inode


def test_override_opt_param_scheduler_applies_the_new_schedule(workdir):
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    run_pretrain(workdir, *FLAGS, *MBS2, "--load", "run", "--train-iters", "6", "--override-opt-param-scheduler",
         "--metrics-file", "override.jsonl")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    expected = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=1e-3, min_lr=0.0, lr_warmup_steps=2,
                                       lr_decay_steps=6, lr_decay_style="cosine", start_wd=0.05, end_wd=0.05,
                                       wd_incr_steps=6, wd_incr_style="constant")
    expected.step(5)
    lrs = _lrs(workdir / "override.jsonl")
    assert sorted(lrs) == [5, 6]
    assert lrs[5] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12) and lrs[5] > 1e-5
    # The checkpoint's own schedule (decay over 4 steps) had reached --min-lr 0 at its 4th and last step.
    assert _lrs(workdir / "full.jsonl")[4] == 0.0


def test_pipeline_parallel_distributed_optimizer_resume_is_exact_and_reshards_to_tp_with_sequence_parallel(workdir):
    common = [*FLAGS, *MBS2, "--use-distributed-optimizer"]
    shared = tiny_pp_run()  # the PP=2 run with checkpoints at 2 and 4 (also exported by test_export.py)
    for name in ("pp", "pp_full.jsonl"):  # already in workdir when another module (test_export.py) trained it first
        if not (workdir / name).exists():
            (shutil.copytree if (shared / name).is_dir() else shutil.copy)(shared / name, workdir / name)
    full = _losses(workdir / "pp_full.jsonl")
    run_pretrain(workdir, *common, "--pipeline-model-parallel-size", "2", "--load", "pp/iter_0000002",
         "--metrics-file", "pp_resumed.jsonl", nproc=2)
    assert _losses(workdir / "pp_resumed.jsonl") == {3: full[3], 4: full[4]}  # bit-identical
    # The TP=2 resume also runs sequence parallelism (docs/parallelism.md): same losses within the same tolerance.
    run_pretrain(workdir, *common, "--tensor-model-parallel-size", "2", "--sequence-parallel", "--load",
         "pp/iter_0000002", "--metrics-file", "tp_resumed.jsonl", nproc=2)
    tp = _losses(workdir / "tp_resumed.jsonl")
    assert sorted(tp) == [3, 4]
    for iteration, tasks in tp.items():
        for task, loss in tasks.items():
            assert loss == pytest.approx(full[iteration][task], rel=1e-6, abs=0), (iteration, task)
