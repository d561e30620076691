"""DiTConfig: diffusers config round trip, validation messages, generated flags, megatron-core config."""
import argparse
import dataclasses

import pytest
import torch

from megatron_puffin.config.dataclass_args import add_dataclass_group, field_docstrings
from megatron_puffin.models.dit import DiTConfig

SD3_MEDIUM_DIFFUSERS = {
    "_class_name": "SD3Transformer2DModel",
    "_diffusers_version": "0.29.0.dev0",
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}


def test_defaults_are_sd3_medium_and_from_diffusers_reads_its_config():
    config = DiTConfig.from_diffusers(SD3_MEDIUM_DIFFUSERS)
    assert config == DiTConfig()
    assert config.hidden_size == 1536 and config.ffn_hidden_size == 6144 and config.base_grid_size == 64


def test_to_diffusers_round_trips_and_builds_the_same_diffusers_shape():
    config = DiTConfig(num_layers=3, num_attention_heads=4, attention_head_dim=8, caption_projection_dim=32)
    again = DiTConfig.from_diffusers(config.to_diffusers())
    assert again == config
    assert config.to_diffusers()["dual_attention_layers"] == []


def test_sd35_features_and_unknown_keys_are_rejected_by_name():
    with pytest.raises(ValueError, match=r"dual_attention_layers=\[0, 1\].*qk_norm=rms_norm.*unknown keys \['foo'\]"):
        DiTConfig.from_diffusers({**SD3_MEDIUM_DIFFUSERS, "dual_attention_layers": [0, 1], "qk_norm": "rms_norm",
                                  "foo": 1})


def test_out_channels_none_means_in_channels():
    config = DiTConfig.from_diffusers({**SD3_MEDIUM_DIFFUSERS, "in_channels": 4, "out_channels": None})
    assert config.out_channels == 4


def test_validation_names_flags_values_and_fixes_all_together():
    config = DiTConfig(num_attention_heads=24, caption_projection_dim=1000, sample_size=130, pos_embed_max_size=64)
    problems = config.validate(tensor_model_parallel_size=5)
    assert any(
        "--dit-num-attention-heads (24) must be divisible by --tensor-model-parallel-size (5)" in p
        and "1, 2, 3, 4, 6, 8, 12, 24" in p
        for p in problems
    )
    assert any("--dit-caption-projection-dim (1000) must equal" in p for p in problems)
    assert any("--dit-pos-embed-max-size (64) must be at least" in p for p in problems)
    assert len(problems) == 3
    with pytest.raises(ValueError, match="invalid DiT configuration"):
        config.check(5)
    assert DiTConfig().validate(tensor_model_parallel_size=8) == []


def test_every_field_has_a_docstring_and_flags_carry_the_dit_prefix():
    docs = field_docstrings(DiTConfig)
    names = [f.name for f in dataclasses.fields(DiTConfig)]
    assert "FLAG_PREFIX" not in names
    assert all(docs.get(name) for name in names), [n for n in names if not docs.get(n)]
    parser = argparse.ArgumentParser()
    add_dataclass_group(parser, DiTConfig, "DiT")
    args = parser.parse_args(["--dit-num-layers", "3", "--dit-recompute"])
    assert getattr(args, "DiTConfig.num_layers") == 3 and getattr(args, "DiTConfig.recompute") is True


def test_transformer_config_carries_shape_tp_dtype_and_recompute():
    config = DiTConfig(num_layers=2, num_attention_heads=4, attention_head_dim=8, caption_projection_dim=32)
    tc = config.to_transformer_config(tensor_model_parallel_size=2, params_dtype=torch.bfloat16, recompute=True)
    assert (tc.hidden_size, tc.num_attention_heads, tc.kv_channels, tc.ffn_hidden_size) == (32, 4, 8, 128)
    assert tc.tensor_model_parallel_size == 2 and tc.params_dtype == torch.bfloat16 and tc.bf16
    assert tc.recompute_granularity == "full" and tc.layernorm_epsilon == 1e-6
    x = torch.linspace(-3, 3, 7)
    assert torch.equal(tc.activation_func(x), torch.nn.functional.gelu(x, approximate="tanh"))
    with pytest.raises(ValueError, match="--dit-num-attention-heads"):
        config.to_transformer_config(tensor_model_parallel_size=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_fp8_without_transformer_engine_is_an_error_not_a_silent_no_op():
    with pytest.raises(RuntimeError, match="needs Transformer Engine with CUDA"):
        DiTConfig().to_transformer_config(fp8="hybrid")
