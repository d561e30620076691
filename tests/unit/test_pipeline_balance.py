"""Uneven pipeline stages and overlapped communication, from the flags (no process group, no model): the layer
placement agrees with megatron-core's own rules and layer counts, bad placements and overlap combinations are
refused in the one validation pass naming the flag and a fix, the dry run prints per-stage FLOPs and a placement
that balances them, and the 7B stage-2 flag file fits 80 GB per GPU at 64 and 128 GPUs."""
import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_puffin.config import ConfigError, parse_args
from megatron_puffin.config.validate_pipeline import placement_problems, stage_layer_counts
from megatron_puffin.training import layout, pipeline_balance, towers
from megatron_puffin.training import parameter_counts as counts
from pretrain_puffin import main

STAGES = Path(__file__).resolve().parents[2] / "examples" / "stages"
STAGE2, STAGE2_7B = STAGES / "stage2_sft.args", STAGES / "stage2_sft_7b.args"
PLACEMENTS = [  # (layers, PP, first, last)
    (28, 2, 10, None), (28, 2, None, 3), (28, 2, 25, 3), (28, 4, 1, 1), (28, 4, 4, None), (6, 4, 1, 1),
    (28, 3, 2, None), (8, 2, None, None), (28, 4, 5, 6), (28, 2, 10, 10), (28, 3, 28, None), (6, 4, 3, 2),
]


def _megatron_counts(num_layers, pp, first, last):
    """megatron-core's TransformerConfig validation and get_num_layers_to_build for every stage (or its error)."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    try:
        config = TransformerConfig(num_layers=num_layers, hidden_size=8, num_attention_heads=2,
                                   pipeline_model_parallel_size=pp, num_layers_in_first_pipeline_stage=first,
                                   num_layers_in_last_pipeline_stage=last, activation_func=F.silu,
                                   pipeline_dtype=None if pp == 1 else torch.float32)
        return [get_num_layers_to_build(config, pp_rank=rank) for rank in range(pp)]
    except (ValueError, AssertionError):
        return None


@pytest.mark.parametrize("placement", PLACEMENTS, ids=str)
def test_layer_placement_agrees_with_megatron_core(placement):
    expected = _megatron_counts(*placement)
    problems = placement_problems(*placement)
    if expected is None:
        assert problems, placement
        assert "--decoder-" in problems[0] and "try" in problems[0]
    else:
        assert not problems, problems
        assert stage_layer_counts(*placement) == expected


def _problems(*flags, stage=STAGE2):
    with pytest.raises(ConfigError) as error:
        parse_args(["--dry-run", f"@{stage}", "--world-size", "64", *flags])
    return error.value.problems


def test_bad_placement_and_overlap_flags_are_reported_together():
    problems = _problems("--pipeline-model-parallel-size", "3", "--decoder-first-pipeline-num-layers", "5",
                         "--ddp-bucket-size", "1000000", "--overlap-param-gather", "--no-use-distributed-optimizer")
    text = "\n".join(problems)
    assert "leave 23 decoder layers (--num-layers 28) for the other 2 stage(s)" in text
    assert "must be divisible by --pipeline-model-parallel-size" not in text  # the uneven placement replaces it
    assert "--overlap-param-gather needs --use-distributed-optimizer" in text
    assert "--overlap-param-gather needs --overlap-grad-reduce" in text
    assert "--ddp-bucket-size (1000000) has no effect without --overlap-grad-reduce" in text
    assert _problems("--decoder-last-pipeline-num-layers", "4") == [
        "--decoder-last-pipeline-num-layers need(s) --pipeline-model-parallel-size 2 or more (got 1); drop it"]
    (interleaved,) = _problems("--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2")
    assert "interleaved pipeline stages are not supported" in interleaved and "--decoder-first" in interleaved
    (uneven,) = _problems("--pipeline-model-parallel-size", "3", "--world-size", "96")
    assert "--decoder-first-pipeline-num-layers" in uneven  # 28 layers over 3 stages: the fix names uneven placement
    args = parse_args(["--dry-run", f"@{STAGE2}", "--world-size", "96", "--pipeline-model-parallel-size", "3",
                       "--decoder-first-pipeline-num-layers", "8"])
    assert layout.llm_stage_layers(args) == [8, 10, 10]


def test_uneven_memory_estimate_places_every_layer_once():
    flags = ["--dry-run", f"@{STAGE2}", "--world-size", "64", "--pipeline-model-parallel-size", "4"]
    even, uneven = parse_args(flags), parse_args(flags + ["--decoder-first-pipeline-num-layers", "1",
                                                          "--decoder-last-pipeline-num-layers", "1"])
    towers = layout.towers(even)
    llm = towers[0]
    per_layer = next(p.params.total for p in llm.parts if p.placement == counts.LAYERS) // 28
    before, after = layout.memory_estimate(even, towers), layout.memory_estimate(uneven, towers)
    assert sum(s.parameters for s in before) == sum(s.parameters for s in after)
    assert [a.parameters - b.parameters for a, b in zip(after, before)] == [
        -6 * per_layer, 6 * per_layer, 6 * per_layer, -6 * per_layer]


def test_stage_split_of_flops_equals_the_whole_micro_batch(tmp_path):
    """The per-stage split sums to towers.micro_batch_flops of a micro-batch of the same shapes, for every task."""
    vae = tmp_path / "vae.json"
    vae.write_text(json.dumps(pipeline_balance.SD3_VAE_CONFIG))
    args = parse_args(["--dry-run", f"@{STAGE2}", "--world-size", "64", "--vae-config", str(vae), "--vae-path", ""])
    size = args.data.image_size
    for task in ("image2text", "image2text_cross_view", "text2text", "text2image", "cam2image", "image2image"):
        work = pipeline_balance.task_work(args, task, micro_batch_size=2, repeats=1)
        image = torch.zeros(1, 1, 1, 1).expand(2, 3, size, size)
        batch = {"task": task, "attention_mask": torch.ones(2, work.llm_tokens, dtype=bool)}
        labels = torch.full((2, work.llm_tokens), -100)
        supervised = min(args.data.max_understanding_text_tokens, work.llm_tokens - 1)  # task_work's bound
        labels[:, work.llm_tokens - supervised:] = 0
        batch["labels"] = labels
        if task in ("image2text", "image2text_cross_view", "image2image"):
            batch["vision_images"] = image
        if task in ("text2image", "cam2image", "image2image"):
            batch["target_images"] = image
        if task in ("cam2image", "image2image"):
            batch["camera_maps"] = image
        if task == "image2image":
            batch["init_images"] = image
        whole = towers.micro_batch_flops(args, batch, towers.trainable_towers(args.model))["total"]
        split = work.first + 28 * work.per_layer + work.last
        assert split == pytest.approx(whole, rel=1e-12), task


def _dry_run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--dry-run", *argv])
    assert code == 0, err.getvalue()
    return out.getvalue()


@pytest.mark.parametrize("pp", [2, 4])
def test_dry_run_suggests_a_placement_that_balances_stage_two(pp):
    flags = [f"@{STAGE2}", "--world-size", "64", "--pipeline-model-parallel-size", str(pp)]
    args = parse_args(["--dry-run", *flags])
    work = pipeline_balance.workload(args)
    even = pipeline_balance.stage_flops(work, stage_layer_counts(28, pp))
    first, last, layers = pipeline_balance.suggest_placement(args, work)
    balanced = pipeline_balance.stage_flops(work, layers)
    assert max(balanced) < max(even) and sum(balanced) == pytest.approx(sum(even))
    for other_first in range(1, 28):  # no valid placement has a less busy busiest stage
        for other_last in range(1, 28 - other_first + 1):
            if not placement_problems(28, pp, other_first, other_last):
                counts = stage_layer_counts(28, pp, other_first, other_last)
                assert max(pipeline_balance.stage_flops(work, counts)) >= max(balanced) * (1 - 1e-12)
    out = _dry_run(*flags)
    assert f"suggested: --decoder-first-pipeline-num-layers {first} --decoder-last-pipeline-num-layers {last}" in out
    applied = _dry_run(*flags, "--decoder-first-pipeline-num-layers", str(first),
                       "--decoder-last-pipeline-num-layers", str(last))
    assert f"stage 0: LLM embedding, vision encoder + projector, meta queries, LLM layers 0-{first - 1}" in applied
    assert "activations per GPU" in out and "ZeRO-1 (--use-distributed-optimizer)" in out


@pytest.mark.parametrize("world_size", [64, 128])
def test_7b_stage_two_fits_80_gb_per_gpu(world_size):
    out = _dry_run(f"@{STAGE2_7B}", "--world-size", str(world_size))
    assert f"world size {world_size} = TP 2 x PP 2 x DP {world_size // 4}; bf16" in out
    assert "LLM                  7615.62 M" in out  # Qwen2.5-7B: 7.62 B parameters (untied embeddings)
    args = parse_args(["--dry-run", f"@{STAGE2_7B}", "--world-size", str(world_size)])
    assert layout.peak_gpu_bytes(args) < 80e9
    first, last, _ = pipeline_balance.suggest_placement(args, pipeline_balance.workload(args))
    assert (args.parallel.decoder_first_pipeline_num_layers, args.parallel.decoder_last_pipeline_num_layers) == (
        first, last)
    assert args.parallel.overlap_grad_reduce and args.parallel.overlap_param_gather  # with cam2image last
