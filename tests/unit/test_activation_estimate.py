"""The dry run's activation estimate (training.activations): one line per task stream in the memory summary, and
the estimate follows the flags the way saved activations do (linear in the micro-batch, smaller with recomputation
and with frozen towers before a task's trainable part). ``benchmarks/bench_training.py`` compares it with the
measured activations of a real model."""
import dataclasses

import pytest

from megatron_puffin.config import parse_args
from megatron_puffin.training import layout
from megatron_puffin.training.activations import (
    activation_bytes_estimate,
    pipeline_activation_bytes,
    stage_activation_bytes,
    worst_case_shape,
)
from megatron_puffin.training.towers import trainable_towers

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


def test_per_stage_estimate_places_each_tower_and_divides_by_tensor_parallelism():
    """stage_activation_bytes splits the one estimate by pipeline stage (vision first, the LLM's layers as placed,
    logits, connectors and MMDiT last) and per TP rank: PP=1 and the sum over stages without recompute equal the
    whole micro-batch; TP divides the split values, sequence parallelism all of them."""
    args = parse_args(FLAGS)
    trainable = trainable_towers(args.model)
    for task in ("image2text", "cam2image", "image2image"):
        shape = worst_case_shape(args, task, 2)
        whole = activation_bytes_estimate(args, shape, trainable, 4)
        (single,) = stage_activation_bytes(args, shape, trainable, 4, [28])
        assert single == pytest.approx(whole["total"], rel=1e-12), task
        first, last = stage_activation_bytes(args, shape, trainable, 4, [20, 8])
        assert first + last == pytest.approx(whole["total"], rel=1e-12), task
        assert first > whole["vision"] and last > whole["dit"] + whole["queries"]
        assert stage_activation_bytes(args, shape, trainable, 4, [28], 2, True)[0] == pytest.approx(single / 2)
        tp2 = stage_activation_bytes(args, shape, trainable, 4, [28], 2, False)[0]
        assert single / 2 < tp2 < single  # norms and residual-side tensors stay whole on each rank
    shape = worst_case_shape(args, "image2text", 2)
    moved = [stage_activation_bytes(args, shape, trainable, 4, [first, 28 - first]) for first in (4, 5)]
    layers = activation_bytes_estimate(args, dataclasses.replace(shape, logit_rows=0), trainable, 4)["llm"]
    assert moved[1][0] - moved[0][0] == pytest.approx(layers / 28, rel=1e-12)  # one layer moves between stages
    assert moved[0][1] - moved[1][1] == pytest.approx(layers / 28, rel=1e-12)


def test_the_dry_run_memory_table_uses_the_per_stage_estimate():
    """The dry run's per-GPU activations at PP=2 are the largest stream's per-stage bytes times the 1F1B
    micro-batches in flight (2 on the first stage, 1 on the last)."""
    args = parse_args(FLAGS + ["--pipeline-model-parallel-size", "2", "--world-size", "2"])
    trainable = trainable_towers(args.model)
    per_stream = [stage_activation_bytes(args, worst_case_shape(args, s.task, s.micro_batch_size), trainable, 4,
                                         [14, 14]) for s in args.data.streams()]
    expected = [2 * max(bytes_[0] for bytes_ in per_stream), max(bytes_[1] for bytes_ in per_stream)]
    assert pipeline_activation_bytes(args, [14, 14]) == pytest.approx(expected, rel=1e-12)
    text = layout.describe(args)
    assert f"stage 0 {expected[0] / 2**30:.2f} GiB, stage 1 {expected[1] / 2**30:.2f} GiB" in text
