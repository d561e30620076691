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


def test_interval_needs_streams_and_camera_metric_needs_one_pipeline_stage():
    assert "needs at least one --valid-task-stream" in _problems("--eval-interval", "5")
    message = _problems("--valid-task-stream", "image2text:x", "--eval-interval", "5",
                        "--pipeline-model-parallel-size", "2", "--world-size", "2")
    assert "--eval-camera-samples (8)" in message and "set --eval-camera-samples 0" in message


def test_valid_streams_take_the_default_micro_batch_size():
    args = parse_args([*BASE, "--valid-task-stream", "image2text:heldout", "--eval-interval", "5",
                       "--micro-batch-size", "3", "--eval-camera-samples", "0"])
    assert args.validation.valid_task_stream == ["image2text:heldout:3"]
    assert (args.validation.eval_interval, args.validation.eval_iters) == (5, 1)
