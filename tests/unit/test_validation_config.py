"""The validation flags (--valid-task-stream, --eval-interval, ...) are checked in the one validation pass, all
problems reported together, each naming the flag and the fix."""
from pathlib import Path

import pytest

from megatron_puffin.config import ConfigError, parse_args

ROOT = Path(__file__).resolve().parents[2]
BASE = [f"@{ROOT / 'examples' / 'tiny' / 'model.args'}", "--task-stream", "image2text:x:1", "--dry-run"]


def _problems(*flags):
    with pytest.raises(ConfigError) as error:
        parse_args([*BASE, *flags])
    return str(error.value)


def test_every_validation_problem_is_reported_at_once():
    message = _problems("--valid-task-stream", "nonsense:x:1", "--valid-task-stream", "cam2image:heldout",
                        "--eval-iters", "0", "--eval-camera-samples", "-1", "--vae-config", "", "--eval-max-new-tokens",
                        "0")
    for expected in ("--valid-task-stream 'nonsense:x:1': unknown or missing task 'nonsense'",
                     "--eval-iters (0) must be at least 1", "--eval-camera-samples (-1) must be >= 0",
                     "--eval-max-new-tokens (0)", "--valid-task-stream has no effect without --eval-interval",
                     "--valid-task-stream cam2image (generation) needs the VAE"):
        assert expected in message


def test_interval_needs_streams_and_the_camera_metric_runs_at_any_pipeline_size():
    assert "needs at least one --valid-task-stream" in _problems("--eval-interval", "5")
    # decoding goes stage to stage (inference/decoding.py); it used to need --eval-camera-samples 0 at PP > 1
    args = parse_args([*BASE, "--valid-task-stream", "image2text:x", "--eval-interval", "5",
                       "--pipeline-model-parallel-size", "2", "--world-size", "2"])
    assert args.validation.eval_camera_samples == 8 and args.parallel.pipeline_model_parallel_size == 2


def test_valid_streams_take_the_default_micro_batch_size():
    args = parse_args([*BASE, "--valid-task-stream", "image2text:heldout", "--eval-interval", "5",
                       "--micro-batch-size", "3", "--eval-camera-samples", "0"])
    assert args.validation.valid_task_stream == ["image2text:heldout:3"]
    assert (args.validation.eval_interval, args.validation.eval_iters) == (5, 1)


def test_a_validation_that_reads_past_a_streams_end_is_named_with_the_count_that_does_not():
    """--eval-iters x the stream's samples per cycle over the data-parallel ranks above its size: the samples of the
    next epoch's order repeat (weighted unevenly), so the run logs a warning with the largest --eval-iters that
    reads each sample at most once."""
    from megatron_puffin.data.sampler import StreamSpec
    from megatron_puffin.training.validation import repeated_samples

    specs = [StreamSpec("image2text#0", 16, micro_batch_size=2, repeats=1),
             StreamSpec("cam2image#1", 100, micro_batch_size=2, repeats=3)]
    assert repeated_samples(specs, eval_iters=4, data_parallel_size=2) == []  # 16 and 48 samples read
    (line,) = repeated_samples(specs, eval_iters=5, data_parallel_size=2)  # 20 of 16; 60 of 100
    assert line.startswith("stream image2text#0 holds 16 samples and each validation reads 20 (--eval-iters 5 x 4")
    assert line.endswith("--eval-iters 4 reads each at most once")
    lines = repeated_samples(specs, eval_iters=20, data_parallel_size=1)  # 40 of 16; 120 of 100
    assert [line.split()[1] for line in lines] == ["image2text#0", "cam2image#1"]
    assert lines[1].endswith("--eval-iters 16 reads each at most once")
