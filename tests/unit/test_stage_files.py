"""The stage flag files of examples/stages: each validates at full scale (64 GPUs) through `pretrain_puffin.py
--dry-run`, prints the per-tower trainable/frozen states of docs/puffin.md §5.4, and encodes the reference recipe translated
to optimizer steps (docs/training.md); a bad override fails naming the flag."""
import contextlib
import io
import re
from pathlib import Path

import pytest

from megatron_puffin.config import parse_args
from pretrain_puffin import main

STAGES = Path(__file__).resolve().parents[2] / "examples" / "stages"
T, F = "trainable", "frozen"
TOWERS = ("LLM", "vision encoder", "vision projector", "query path", "MMDiT", "VAE")
# docs/puffin.md §5.4: per-tower states, optimizer steps, micro-batches per step, LR actually used, warm-up steps, task
# streams (task, per-GPU micro-batch, repeats), hand-off, activation checkpointing of the MMDiT and connectors.
EXPECTED = {
    "stage1_alignment": dict(
        states=(F, F, T, T, F, F), steps=5000, per_step=2, lr=2e-4, warmup=500, save_interval=1000,
        streams=[("image2text", 16, 1), ("cam2image", 16, 1)], init=None, recompute=False,
    ),
    "stage2_sft": dict(
        states=(T, T, T, T, T, F), steps=15000, per_step=2, lr=4e-5, warmup=450, save_interval=1000,
        streams=[("image2text", 16, 1), ("cam2image", 16, 1)], init="stage1_alignment/iter_0005000", recompute=True,
    ),
    "stage3_thinking": dict(
        states=(T, T, T, T, T, F), steps=20000, per_step=3, lr=3e-5, warmup=600, save_interval=1000,
        streams=[("image2text_thinking", 8, 1), ("cam2image_thinking", 8, 1), ("text2text", 8, 1)],
        init="stage2_sft/iter_0015000", recompute=True,
    ),
    "stage4_instruction": dict(
        states=(T, F, T, T, T, F), steps=20000, per_step=1, lr=5e-6, warmup=600, save_interval=5000,
        streams=[("image2text_cross_view", 16, 8), ("image2image", 16, 8), ("image2text_photography", 16, 1)],
        init="stage2_sft/iter_0015000", recompute=True,
    ),
}
TOWER_LINE = re.compile(r"^  (?P<name>[a-zA-Z ]+?) +(?:\d+\.\d+ M|unknown)  (?P<state>trainable|frozen)\b")


def _dry_run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--dry-run", *argv])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("stage", list(EXPECTED))
def test_stage_file_validates_at_64_gpus_and_prints_the_spec_tower_states(stage):
    code, out, err = _dry_run(f"@{STAGES / f'{stage}.args'}", "--world-size", "64")
    assert code == 0, err
    states = {m["name"]: m["state"] for m in map(TOWER_LINE.match, out.splitlines()) if m}
    assert states == dict(zip(TOWERS, EXPECTED[stage]["states"])), out
    assert "world size 64 = TP 1 x PP 1 x DP 64; bf16" in out
    assert "LLM                  1543.71 M" in out and "MMDiT                2028.33 M" in out
    assert re.search(r"stage 0: .* total \d+\.\d\d GiB", out)


@pytest.mark.parametrize("stage", list(EXPECTED))
def test_stage_file_encodes_the_reference_recipe_in_optimizer_steps(stage):
    expected = EXPECTED[stage]
    args = parse_args(["--dry-run", f"@{STAGES / f'{stage}.args'}", "--world-size", "64"])
    training, ckpt = args.training, args.checkpoint
    assert (training.train_iters, training.micro_batches_per_step) == (expected["steps"], expected["per_step"])
    assert training.lr == pytest.approx(expected["lr"]) and training.lr_warmup_iters == expected["warmup"]
    assert training.lr_warmup_init == pytest.approx(1e-5 * expected["lr"])  # LinearLR start factor 1e-5
    assert (training.lr_decay_style, training.min_lr, training.lr_decay_iters) == ("cosine", 0.0, None)
    optimizer = (training.adam_beta1, training.adam_beta2, training.adam_eps, training.weight_decay, training.clip_grad)
    assert optimizer == (0.9, 0.95, 1e-8, 0.05, 1.0)
    assert [(s.task, s.micro_batch_size, s.repeats) for s in args.data.streams()] == expected["streams"]
    assert args.precision.bf16 and args.parallel.use_distributed_optimizer
    assert ckpt.save.endswith(f"/{stage}") and ckpt.save_interval == expected["save_interval"] and ckpt.keep_last_n == 1
    if expected["init"] is None:
        assert ckpt.pretrained_checkpoint is None
    else:
        assert ckpt.pretrained_checkpoint.endswith(expected["init"])  # stage 4 starts from stage 2
    assert ckpt.llm_checkpoint and ckpt.vision_checkpoint and ckpt.dit_checkpoint and args.model.vae_path
    assert (args.dit.recompute, args.connector.recompute, args.vision.recompute) == (
        expected["recompute"], expected["recompute"], False)
    assert args.vision.vision_grad_scale == 0.1
    sizes = (args.llm.num_layers, args.llm.hidden_size, args.vision.num_layers, args.vision.hidden_size,
             args.connector.num_queries, args.connector.hidden_size, args.connector.num_layers, args.dit.num_layers,
             args.dit.hidden_size)
    assert sizes == (28, 1536, 32, 1280, 64, 1024, 6, 24, 1536)


@pytest.mark.parametrize("override, flag", [
    (["--tensor-model-parallel-size", "7"], "--tensor-model-parallel-size (7)"),
    (["--lr-warmup-iters", "999999"], "--lr-warmup-iters (999999)"),
])
def test_a_bad_override_of_a_stage_file_fails_naming_the_flag(override, flag):
    code, out, err = _dry_run(f"@{STAGES / 'stage2_sft.args'}", "--world-size", "64", *override)
    assert code == 2 and out == ""
    assert flag in err, err
