"""The dry run answers "does it fit?": one message lists the tensor-parallel sizes that fit every tower together,
and a Transformer Engine / FP8 configuration can be dry-run on a machine without CUDA or Transformer Engine."""
from pathlib import Path

import pytest

from megatron_puffin.config import ConfigError, parse_args
from megatron_puffin.optional_deps import transformer_engine_error
from megatron_puffin.training.layout import describe

STAGE2 = Path(__file__).resolve().parents[2] / "examples" / "stages" / "stage2_sft.args"


def _problems(*flags):
    with pytest.raises(ConfigError) as caught:
        parse_args(["--dry-run", f"@{STAGE2}", *flags])
    return caught.value.problems


def test_one_message_lists_the_tensor_parallel_sizes_that_fit_all_towers():
    problems = _problems("--world-size", "64", "--tensor-model-parallel-size", "5")
    tp = [p for p in problems if "Sizes that fit" in p]
    assert len(tp) == 1 and len([p for p in problems if "use a --tensor-model-parallel-size of" in p]) == 0
    # LLM 12 heads / 2 KV groups, MMDiT 24 heads, RADIO 16 heads, connectors 16 heads and ffn 4096: 1, 2, 4.
    assert "Sizes that fit all towers together: 1, 2, 4;" in tp[0]
    for flag in ("--num-attention-heads (12)", "--num-query-groups (2)", "--dit-num-attention-heads (24)",
                 "--vision-num-attention-heads (16)", "--connector-num-attention-heads (16)"):
        assert flag in tp[0]
    assert any(p.startswith("world size (64)") for p in problems)  # the world-size rule stays its own message

    # The sizes the world size allows are named too; each listed size validates.
    problems = _problems("--world-size", "6", "--tensor-model-parallel-size", "8")
    assert "Sizes that fit all towers together: 1, 2, 4; of these, with world size 6 and " \
           "--pipeline-model-parallel-size 1: 1, 2" in problems[0]
    for size in ("1", "2", "4"):
        parse_args(["--dry-run", f"@{STAGE2}", "--world-size", "64", "--tensor-model-parallel-size", size])


@pytest.mark.skipif(transformer_engine_error() is None, reason="Transformer Engine is usable here")
def test_transformer_engine_and_fp8_dry_run_without_cuda_or_te():
    args = parse_args(["--dry-run", f"@{STAGE2}", "--world-size", "64", "--tensor-model-parallel-size", "2",
                       "--transformer-impl", "transformer_engine", "--fp8-format", "hybrid"])
    text = describe(args)
    assert "transformer_engine layers, FP8 hybrid" in text
    assert f"Transformer Engine: not usable on this machine ({transformer_engine_error()})" in text
    with pytest.raises(ConfigError, match="--transformer-impl transformer_engine needs Transformer Engine"):
        parse_args([f"@{STAGE2}", "--transformer-impl", "transformer_engine"])  # a real run still refuses
