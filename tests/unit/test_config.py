"""Flags generated from the configuration dataclasses, flag files, and the all-errors validation."""
import os
from pathlib import Path

import pytest

from megatron_puffin.config import ConfigError, build_parser, parse_args
from megatron_puffin.config.dataclass_args import field_docstrings
from megatron_puffin.config.schema import TrainingConfig

ROOT = Path(__file__).resolve().parents[2]
# The data flags every run needs (paths are not checked with --dry-run).
DATA = ["--dry-run", "--task-stream", "image2text:/data/und:4", "--tokenizer", "/tokenizer"]


def test_flags_types_defaults_and_help_come_from_the_dataclasses():
    parser = build_parser()
    help_text = parser.format_help()
    for flag in [
        "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--num-layers", "--hidden-size",
        "--ffn-hidden-size", "--num-attention-heads", "--num-query-groups", "--micro-batch-size",
        "--bf16", "--fp8-format", "--fp8-recipe", "--transformer-impl",
    ]:
        assert flag in help_text, flag
    assert field_docstrings(TrainingConfig)["micro_batch_size"] in " ".join(help_text.split())
    args = parse_args(DATA + ["--num-layers", "4", "--lr", "3e-5", "--bf16"])
    assert args.llm.num_layers == 4 and isinstance(args.llm.num_layers, int)
    assert args.training.lr == pytest.approx(3e-5) and args.precision.bf16 is True
    assert args.training.micro_batch_size == TrainingConfig().micro_batch_size


def test_flag_files_with_comments_several_flags_per_line_and_overrides(tmp_path):
    flagfile = tmp_path / "stage.args"
    flagfile.write_text(
        "# a tiny model\n"
        "--num-layers 4 --hidden-size 128   # two flags and a comment\n"
        "--num-attention-heads 4 --num-query-groups 2\n"
        "--ffn-hidden-size 256\n"
        "--lr 1e-3\n"
    )
    args = parse_args(DATA + [f"@{flagfile}", "--lr", "2e-4"])
    assert (args.llm.num_layers, args.llm.hidden_size, args.llm.num_query_groups) == (4, 128, 2)
    assert args.training.lr == pytest.approx(2e-4)  # later wins
    args = parse_args(DATA + ["--lr", "2e-4", f"@{flagfile}"])
    assert args.training.lr == pytest.approx(1e-3)


def test_a_flag_file_includes_another_relative_to_its_own_folder(tmp_path, monkeypatch):
    stages = tmp_path / "stages"
    stages.mkdir()
    (stages / "model.args").write_text("--num-layers 4 --hidden-size 128\n")
    (stages / "stage.args").write_text("@model.args\n--hidden-size 192  # after the include: wins\n")
    monkeypatch.chdir(tmp_path)  # not the stage file's folder: the include is still found
    args = parse_args(DATA + ["@stages/stage.args"])
    assert (args.llm.num_layers, args.llm.hidden_size) == (4, 192)
    stage_files = sorted((Path(__file__).resolve().parents[2] / "examples" / "stages").glob("stage*.args"))
    assert len(stage_files) == 5 and all("\n@model.args\n" in f.read_text() for f in stage_files)  # incl. 7B


def test_every_mistake_is_reported_at_once(tmp_path):
    flagfile = tmp_path / "bad.args"
    flagfile.write_text(
        "--tensor-model-parallel-size 5 --pipeline-model-parallel-size 64\n"
        "--num-layers 28 --num-attention-heads 12 --num-query-groups 2 --ffn-hidden-size 8962\n"
        "--micro-batch-size two\n"
        "--fp8-format e4m3 --sequence-parallel\n"
        "--transformer-impl cuda --dit-num-attention-heads 24\n"
        "--learning-rate 1e-4\n"
        # no float flag takes NaN or infinity (they used to reach the model: --vision-grad-scale nan trained)
        "--vision-grad-scale nan --flow-guidance-scale inf --vision-layernorm-epsilon 0\n"
        "--connector-layernorm-epsilon -1 --flow-weighting-scheme mode --flow-mode-scale 9\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_args([f"@{flagfile}"])
    text = str(info.value)
    expected = [
        "unknown flag '--learning-rate'",
        "--micro-batch-size ('two') is not a valid int",
        "--transformer-impl (cuda) must be one of local, transformer_engine",
        "--num-attention-heads (12) must be divisible by --tensor-model-parallel-size (5)",
        "Sizes that fit all towers together: 1, 2;",  # one list for every tower TP splits
        "--ffn-hidden-size (8962) must be divisible by --tensor-model-parallel-size (5)",
        "--num-query-groups (2) must be a multiple or a divisor of --tensor-model-parallel-size (5)",
        "--pipeline-model-parallel-size (64) must not exceed --num-layers (28)",
        "world size (1) must be divisible by",
        "--fp8-format (e4m3) needs Transformer Engine with CUDA",
        "--dit-num-attention-heads (24) must be divisible by --tensor-model-parallel-size (5)",
        "--task-stream is required",
        "--vision-grad-scale ('nan') is not a valid finite number; give one that is not NaN or infinity",
        "--flow-guidance-scale ('inf') is not a valid finite number",
        "--vision-layernorm-epsilon (0.0) must be positive",
        "--connector-layernorm-epsilon (-1.0) must be positive",
        "--flow-mode-scale (9.0) must lie in [-1, 7.23] with --flow-weighting-scheme mode",
    ]
    for fragment in expected:
        assert fragment in text, f"missing: {fragment}\n{text}"
    assert len(info.value.problems) >= len(expected)


def test_query_groups_may_be_a_divisor_of_tp_as_megatron_allows():
    args = parse_args(
        DATA + ["--tensor-model-parallel-size", "4", "--world-size", "4", "--num-attention-heads", "12",
         "--num-query-groups", "2", "--ffn-hidden-size", "64"]
    )
    assert args.parallel.tensor_model_parallel_size == 4
    with pytest.raises(ConfigError, match="--num-layers \\(6\\) must be divisible by --pipeline-model-parallel-size"):
        parse_args(["--num-layers", "6", "--pipeline-model-parallel-size", "4", "--world-size", "4"])


def test_repeatable_task_streams_collect_in_order():
    args = parse_args(DATA + ["--task-stream", "cam2image:/data/gen:4:2", "--vae-path", "/sd3/vae"])
    assert args.data.task_stream == ["image2text:/data/und:4", "cam2image:/data/gen:4:2"]


def test_task_stream_without_micro_batch_size_takes_the_flag():
    args = parse_args(DATA + ["--task-stream", "text2text:/data/und", "--micro-batch-size", "3"])
    assert args.data.task_stream == ["image2text:/data/und:4", "text2text:/data/und:3"]


def test_generation_stream_without_vae_is_an_error():
    with pytest.raises(ConfigError, match=r"cam2image \(generation\) needs the VAE: add --vae-path"):
        parse_args(DATA + ["--task-stream", "cam2image:/data/gen:4"])


def test_world_size_must_divide_by_tp_times_pp():
    with pytest.raises(ConfigError, match=r"world size \(6\) must be divisible .* \(2 x 2 = 4\)"):
        parse_args(["--world-size", "6", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                    "--num-layers", "4"])


def test_transformer_engine_request_without_te_is_an_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine may have a usable Transformer Engine")
    with pytest.raises(ConfigError, match="--transformer-impl transformer_engine needs Transformer Engine"):
        parse_args(["--transformer-impl", "transformer_engine"])


def test_cli_help_and_failing_flag_file_start_nothing(tmp_path):
    from helpers.puffin import run_script  # the real command, forked from the suite's pre-imported server

    help_run = run_script(ROOT / "pretrain_puffin.py", "--help", cwd=os.getcwd(), env=dict(os.environ), timeout=120)
    assert help_run.returncode == 0
    for group in ("LLM tower (Qwen2.5):", "parallelism:", "precision:", "training:", "checkpointing:"):
        assert group in help_run.stdout
    flagfile = tmp_path / "bad.args"
    flagfile.write_text("--tensor-model-parallel-size 5 --bogus-flag 1\n--save-interval 10\n")
    bad_run = run_script(ROOT / "pretrain_puffin.py", f"@{flagfile}", cwd=os.getcwd(), env=dict(os.environ),
                         check=False, timeout=120)
    assert bad_run.returncode == 2
    assert "unknown flag '--bogus-flag'" in bad_run.stderr
    assert "--num-attention-heads (12) must be divisible by --tensor-model-parallel-size (5)" in bad_run.stderr
    assert "--save-interval (10) has no effect without --save" in bad_run.stderr
    assert "initialis" not in bad_run.stderr.lower()  # nothing was started
