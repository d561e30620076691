"""The speed levers through the real CLIs (docs/performance.md): tools/cache_latents.py then pretrain_puffin.py with
--cached-latents repeats the online run's losses; --length-grouped trains and logs its padding fraction."""
import json
import os
from pathlib import Path

import pytest

from helpers.puffin import ROOT, make_tiny_dataset, run_pretrain, run_script
from megatron_puffin.training import host_memory

TINY = ROOT / "examples" / "tiny"
ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
RUN = [f"@{TINY / 'model.args'}", "--num-workers", "0", "--log-interval", "1", "--micro-batch-size", "2",
       "--task-stream", "image2text:tiny/data/main", "--task-stream", "cam2image:tiny/data/main",
       "--task-stream", "image2image:tiny/data/cross_view", "--freeze-vision", "--train-iters", "3",
       "--lr", "1e-3", "--lr-warmup-iters", "1"]


def _run(cwd, script, *args):
    """``python SCRIPT ARGS``, forked from the suite's pre-imported server (helpers.puffin.run_script)."""
    return run_script(script, *args, cwd=cwd, env=ENV, timeout=600)


def _losses(path):
    return {json.loads(line)["iteration"]: {k: v for k, v in json.loads(line).items() if k.startswith("loss/")}
            for line in Path(path).read_text().splitlines()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("levers")
    make_tiny_dataset(root / "tiny", num_samples=16)
    return root


def test_cached_latents_repeat_the_online_losses(workdir):
    run_pretrain(workdir, *RUN, "--metrics-file", "online.jsonl", env=ENV)
    # float32 moments of the training VAE (drawn from the training --seed, 1234 by default) at the training size.
    _run(workdir, ROOT / "tools" / "cache_latents.py", "--data", "tiny/data", "--vae-config", "tiny/vae_config.json",
         "--seed", "1234", "--image-size", "96", "--dtype", "float32")
    run_pretrain(workdir, *RUN, "--cached-latents", "--metrics-file", "cached.jsonl", env=ENV)
    online, cached = _losses(workdir / "online.jsonl"), _losses(workdir / "cached.jsonl")
    assert sorted(online) == sorted(cached) == [1, 2, 3]
    for iteration, losses in online.items():
        assert set(cached[iteration]) == set(losses) == {"loss/image2text", "loss/cam2image", "loss/image2image"}
        for task, loss in losses.items():
            assert cached[iteration][task] == pytest.approx(loss, rel=1e-5), (iteration, task)


def test_latents_of_another_vae_fail_before_training(workdir):
    """Runs after the test above cached latents of the seed-1234 VAE; seed 7 draws another tiny VAE."""
    proc = run_pretrain(workdir, *RUN, "--cached-latents", "--seed", "7", check=False, env=ENV)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds latents of another VAE" in proc.stderr and "Traceback" not in proc.stderr
    assert "iter 1/" not in proc.stderr


def test_validation_streams_are_checked_like_training_streams(workdir):
    """--valid-task-stream datasets are opened at start-up with the training streams (a missing field, missing
    latents: one line, exit status 2, before any model is built), and their cached latents must come from the
    training VAE (checked when the validation loader is built, as for training). Runs after the first test cached
    the seed-1234 VAE's latents of tiny/data."""
    make_tiny_dataset(workdir / "plain", num_samples=16)  # the same samples, no latents
    valid = ["--eval-interval", "1", "--eval-iters", "1", "--eval-camera-samples", "0"]
    for stream, message in (
            ("image2image:tiny/data/main", "--valid-task-stream image2image:tiny/data/main: task image2image needs "
                                           "the field 'image_init'"),
            ("image2image:plain/data/cross_view", "--cached-latents: --valid-task-stream "
                                                  "image2image:plain/data/cross_view: shard plain/data/cross_view/"
                                                  "shard-00000 has no cached latents")):
        proc = run_pretrain(workdir, *RUN, "--cached-latents", *valid, "--valid-task-stream", stream, check=False,
                            env=ENV)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "weights of" not in proc.stderr  # refused before the towers were built and loaded
    _run(workdir, ROOT / "tools" / "cache_latents.py", "--data", "plain/data", "--vae-config", "tiny/vae_config.json",
         "--seed", "7", "--image-size", "96", "--dtype", "float32")
    proc = run_pretrain(workdir, *RUN, "--cached-latents", *valid, "--valid-task-stream",
                        "image2image:plain/data/cross_view", check=False, env=ENV)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--valid-task-stream image2image:plain/data/cross_view: shard plain/data/cross_view/shard-00000 holds " \
           "latents of another VAE" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "weights of" in proc.stderr and "iter 1/" not in proc.stderr  # after the towers, before any step


def test_cache_latents_keeps_freed_host_memory_on_cpu_and_writes_the_same_latents(workdir):
    """On CPU the tool keeps freed host memory for reuse unless told not to (1.5x faster at 512^2,
    docs/performance.md); the latents are the same bytes either way."""
    written = {}
    for name, flags in (("kept", ()), ("released", ("--no-host-malloc-cache",))):
        make_tiny_dataset(workdir / name, num_samples=4)
        proc = _run(workdir, ROOT / "tools" / "cache_latents.py", "--data", f"{name}/data", "--vae-config",
                    "tiny/vae_config.json", "--image-size", "96", "--dtype", "float32", "--log-level", "INFO", *flags)
        kept = "host memory cache: glibc" in proc.stderr
        assert kept == (name == "kept" and host_memory._glibc() is not None), proc.stderr[-2000:]
        written[name] = {path.relative_to(workdir / name): path.read_bytes()
                         for path in sorted((workdir / name / "data").rglob("latent_*.bin"))}
    assert len(written["kept"]) >= 2 and written["kept"] == written["released"]


def test_length_grouped_run_logs_its_padding(workdir):
    proc = run_pretrain(workdir, *RUN, "--length-grouped", "--length-group-window", "4", env=ENV)
    lines = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if "iter 3/3" in line]
    assert lines and "| padding " in lines[-1], (proc.stderr[-2000:])
