"""Validation during training through the real CLI: a tiny run at data-parallel size 2 with --eval-interval logs
held-out per-task losses equal to a separate no-grad pass (one process, the model called directly, no schedule) over
the same held-out samples with the saved weights, and validating does not change the training losses."""
import json
import os
from pathlib import Path

import pytest
import torch

from helpers.puffin import ROOT, make_tiny_dataset, run_pretrain
from megatron_puffin.training.objectives import puffin_loss

TINY = ROOT / "examples" / "tiny"
ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
COMMON = [f"@{TINY / 'model.args'}", "--num-workers", "0", "--log-interval", "1",
          "--task-stream", "image2text:tiny/data/main", "--task-stream", "cam2image:tiny/data/main",
          "--train-iters", "2", "--lr", "1e-3"]
VALID = ["--valid-task-stream", "image2text:tiny/heldout/main", "--valid-task-stream", "cam2image:tiny/heldout/main",
         "--eval-iters", "2", "--eval-camera-samples", "3", "--eval-max-new-tokens", "24"]


def _run(cwd, *flags, nproc=2, timeout=900):
    """The two ranks forked from the suite's pre-imported server, as torchrun would start them (helpers.puffin)."""
    return run_pretrain(cwd, *COMMON, *flags, nproc=nproc, env=ENV, timeout=timeout)


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _reference_losses(workdir, checkpoint, camera_samples=3):
    """Per-task validation losses with one process (sum of per-micro-batch loss sums / sum of counts) and the
    camera metric."""
    from megatron_puffin.config import parse_args
    from megatron_puffin.data import PuffinTokenizer
    import megatron_puffin.distributed as mpd
    from megatron_puffin.config.model import puffin_config
    from megatron_puffin.models.puffin import build_puffin
    from megatron_puffin.checkpointing import load_module
    from megatron_puffin.training.validation import build_validation_loader, validation_micro_batches

    cwd = os.getcwd()
    os.chdir(workdir)
    mpd.initialize()
    try:
        args = parse_args([*COMMON, *VALID, "--micro-batch-size", "2", "--eval-interval", "1"])
        tokenizer = PuffinTokenizer(args.data.tokenizer)
        args.model.image_pad_token_id = tokenizer.image_pad_id
        model = build_puffin(puffin_config(args), pg_collection=mpd.process_groups())
        load_module(model, str(checkpoint))
        model.eval()
        loader = iter(build_validation_loader(args, tokenizer, 0, 1))
        sums, counts = {}, {}
        with torch.no_grad():
            for _ in range(validation_micro_batches(args)):
                output = puffin_loss(model, next(loader))
                sums[output.task] = sums.get(output.task, 0.0) + float(output.loss_sum)
                counts[output.task] = counts.get(output.task, 0.0) + float(output.count)
            loader.close()
        camera = _reference_camera(args, tokenizer, model, camera_samples)
    finally:
        mpd.destroy()
        os.chdir(cwd)
    return {task: sums[task] / counts[task] for task in sums}, counts, camera


def _reference_camera(args, tokenizer, model, count):
    """The camera metric by hand: the first ``count`` held-out images, centre-cropped, decoded in one batch, scored."""
    from megatron_puffin.data.format import PuffinDataset
    from megatron_puffin.evaluation import GroundTruthCamera, score_prediction, summarize
    from megatron_puffin.inference import load_image, understand

    dataset = PuffinDataset(["tiny/heldout/main"])
    samples = [dataset[index] for index in range(count)]
    images = [load_image(sample["image"], 96) for sample in samples]
    texts = [output.text for output in understand(model, tokenizer, images, max_new_tokens=24)]
    truths = [GroundTruthCamera(str(i), *s["camera"].values(), 96, 96) for i, s in enumerate(samples)]
    return summarize([score_prediction(t.fname, text, t) for t, text in zip(truths, texts)])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    make_tiny_dataset(root / "tiny", num_samples=8, num_heldout=4)
    return root


@pytest.fixture(scope="module")
def validated_run(workdir):
    """The run with validation at DP 2 (its checkpoint ``run/iter_0000002`` starts the FSDP2 test's run)."""
    return _run(workdir, *VALID, "--micro-batch-size", "1", "--eval-interval", "1", "--save", "run",
                "--metrics-file", "with_validation.jsonl")


def _check_against_reference(valid, workdir, checkpoint, camera_samples=3):
    reference, counts, camera = _reference_losses(workdir, checkpoint, camera_samples)
    assert counts["cam2image"] == 4  # 2 validation cycles, each one cam2image micro-batch of 2 samples (global)
    for task, loss in reference.items():
        assert valid[f"valid_loss/{task}"] == pytest.approx(loss, rel=1e-5, abs=0), task
    for name in ("median_roll_error", "median_pitch_error", "median_vfov_error", "num_fallback"):
        assert valid[f"valid_camera/image2text/{name}"] == pytest.approx(camera[name], abs=1e-9), name


def test_validation_losses_equal_a_separate_no_grad_pass_and_leave_training_unchanged(workdir, validated_run):
    proc = validated_run
    assert "validation iter 2 | loss image2text" in proc.stderr
    records = _records(workdir / "with_validation.jsonl")
    valid = {r["iteration"]: r for r in records if "valid_loss/image2text" in r}
    train = {r["iteration"]: r for r in records if "loss/image2text" in r}
    assert sorted(valid) == [1, 2] and sorted(train) == [1, 2]
    camera_tags = {f"valid_camera/image2text/{name}" for name in
                   ("median_roll_error", "median_pitch_error", "median_vfov_error", "num_images", "num_fallback")}
    assert set(valid[2]) == {"iteration", "valid_loss/image2text", "valid_loss/cam2image"} | camera_tags
    assert valid[2]["valid_camera/image2text/num_images"] == 3

    _check_against_reference(valid[2], workdir, workdir / "run" / "iter_0000002")
    # the weights changed between the two validations, so the losses did too
    assert valid[1]["valid_loss/image2text"] != valid[2]["valid_loss/image2text"]

    _run(workdir, "--micro-batch-size", "1", "--metrics-file", "without_validation.jsonl")
    plain = {r["iteration"]: r for r in _records(workdir / "without_validation.jsonl")}
    for iteration in (1, 2):
        for task in ("image2text", "cam2image"):
            assert train[iteration][f"loss/{task}"] == plain[iteration][f"loss/{task}"]  # bit-identical


def test_fsdp2_starts_from_a_pretrained_checkpoint_and_decodes_validation_cameras(workdir, validated_run):
    """``--use-torch-fsdp2`` from ``--pretrained-checkpoint`` (the DDP run's weights loaded into DTensor shards)
    with validation at DP 2 and one camera image, so one rank decodes with whole weights and no collective per
    token while the other decodes nothing (the step after such a validation used to hang: FSDP2's record of the
    validation's forwards differed between the ranks). Its training losses, before and after a validation, equal
    the same start with plain DDP (1e-5 relative), and its last validation equals the one-process pass over its
    own saved checkpoint."""
    start = ["--pretrained-checkpoint", "run/iter_0000002", "--micro-batch-size", "1"]
    proc = _run(workdir, *VALID, *start, "--eval-interval", "1", "--eval-camera-samples", "1", "--use-torch-fsdp2",
                "--save", "fsdp", "--metrics-file", "fsdp.jsonl", timeout=300)
    assert "validation iter 2 | loss image2text" in proc.stderr
    _run(workdir, *start, "--metrics-file", "ddp_start.jsonl")
    records = _records(workdir / "fsdp.jsonl")
    fsdp = {r["iteration"]: r for r in records if "loss/image2text" in r}
    valid = {r["iteration"]: r for r in records if "valid_loss/image2text" in r}
    ddp = {r["iteration"]: r for r in _records(workdir / "ddp_start.jsonl")}
    for iteration in (1, 2):  # iteration 2 trains after a validation: the weights were resharded
        for task in ("image2text", "cam2image"):
            assert fsdp[iteration][f"loss/{task}"] == pytest.approx(ddp[iteration][f"loss/{task}"], rel=1e-5, abs=0)
    assert sorted(valid) == [1, 2] and valid[2]["valid_camera/image2text/num_images"] == 1
    _check_against_reference(valid[2], workdir, workdir / "fsdp" / "iter_0000002", camera_samples=1)


def test_at_pipeline_size_2_the_camera_metric_decodes_stage_to_stage(workdir, validated_run):
    """``--pipeline-model-parallel-size 2`` with the camera metric, which used to need one stage holding the whole
    LLM (the flag check refused it): each step the hidden states go from stage to stage and the last stage's tokens
    come back. Its losses and camera errors equal the one-process pass over its own saved checkpoint."""
    proc = _run(workdir, *VALID, "--pipeline-model-parallel-size", "2", "--micro-batch-size", "2",
                "--eval-interval", "2", "--save", "pp2", "--metrics-file", "pp2.jsonl")
    assert "validation iter 2 | loss image2text" in proc.stderr and "| camera image2text median roll" in proc.stderr
    valid = {r["iteration"]: r for r in _records(workdir / "pp2.jsonl") if "valid_loss/image2text" in r}
    assert sorted(valid) == [2] and valid[2]["valid_camera/image2text/num_images"] == 3
    _check_against_reference(valid[2], workdir, workdir / "pp2" / "iter_0000002")


def test_the_validation_line_shows_every_stream_task_it_logged(workdir):
    """Streams of task variants (thinking answers) are logged under the stream's task, in the metrics file and in
    the console line alike: the line used to list the loss tasks (``image2text``) and print "-" for them."""
    import re

    valid = ["--valid-task-stream", "image2text_thinking:tiny/heldout/main", "--valid-task-stream",
             "cam2image_thinking:tiny/heldout/main", "--eval-iters", "1", "--eval-camera-samples", "0"]
    proc = _run(workdir, *valid, "--micro-batch-size", "1", "--train-iters", "1", "--eval-interval", "1",
                "--metrics-file", "variants.jsonl", nproc=1)
    (record,) = [r for r in _records(workdir / "variants.jsonl") if "valid_loss/image2text_thinking" in r]
    line = re.search(r"validation iter 1 \| loss (.*)", proc.stderr).group(1)
    assert line == (f"image2text_thinking {record['valid_loss/image2text_thinking']:.4f} "
                    f"cam2image_thinking {record['valid_loss/cam2image_thinking']:.4f}"), line
