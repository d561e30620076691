"""The dry run's activation estimate (training.activations): one line per task stream in the memory summary, and
the estimate follows the flags the way saved activations do (linear in the micro-batch, smaller with recomputation
and with frozen towers before a task's trainable part). ``benchmarks/bench_training.py`` compares it with the
measured activations of a real model."""
import pytest

from megatron_puffin.config import parse_args
from megatron_puffin.training import layout
from megatron_puffin.training.activations import activation_bytes_estimate, worst_case_shape
from megatron_puffin.training.flops import trainable_towers

STREAMS = ["--task-stream", "image2text:/data/und:2", "--task-stream", "text2text:/data/und:2",
           "--task-stream", "cam2image:/data/gen:2", "--task-stream", "image2image:/data/gen:2"]
FLAGS = ["--dry-run", "--tokenizer", "/tokenizer", "--vae-path", "/models/vae", *STREAMS]


def estimate(args, task, batch_size=2):
    return activation_bytes_estimate(args, worst_case_shape(args, task, batch_size),
                                     trainable_towers(args.model), 4)


def test_the_dry_run_memory_summary_lists_each_stream_activation_estimate():
    text = layout.describe(parse_args(FLAGS))
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("activations per micro-batch"))
    listed = [line.split()[0] for line in lines[start + 1:start + 5]]
    assert listed == ["image2text", "text2text", "cam2image", "image2image"]
    assert all("GiB" in line for line in lines[start + 1:start + 5])


def test_estimate_is_linear_in_the_micro_batch_and_counts_the_towers_each_task_runs():
    args = parse_args(FLAGS)
    for task in ("image2text", "text2text", "cam2image", "image2image"):
        one, four = estimate(args, task, 1), estimate(args, task, 4)
        assert four["total"] == pytest.approx(4 * one["total"], rel=1e-12), task
    assert estimate(args, "text2text")["vision"] == 0 and estimate(args, "text2text")["dit"] == 0
    assert estimate(args, "image2text")["vision"] > 0 and estimate(args, "image2text")["dit"] == 0
    image2image, cam2image = estimate(args, "image2image"), estimate(args, "cam2image")
    assert image2image["dit"] > cam2image["dit"] > 0  # one more condition latent in the image stream
    assert image2image["vision"] > 0 and cam2image["vision"] == 0


def test_recompute_and_freezing_shrink_the_estimate():
    base = parse_args(FLAGS)
    recompute = parse_args(FLAGS + ["--recompute", "--dit-recompute"])
    assert estimate(recompute, "cam2image")["dit"] < estimate(base, "cam2image")["dit"] / 4
    assert estimate(recompute, "text2text")["llm"] < estimate(base, "text2text")["llm"]
    frozen = parse_args(FLAGS + ["--freeze-vision"])
    assert 0 < estimate(frozen, "image2text")["vision"] < estimate(base, "image2text")["vision"] / 4
