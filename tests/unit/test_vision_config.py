"""VisionConfig: C-RADIOv3-H defaults, generated flags (incl. --vision-grad-scale), validation messages and the
megatron-core configs of the ViT and the projector."""
import argparse
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_puffin.config.dataclass_args import add_dataclass_group, build_dataclass, field_docstrings
from megatron_puffin.models.vision import VisionConfig


def test_defaults_are_c_radio_v3_h_with_puffin_fold():
    config = VisionConfig()
    assert (config.patch_size, config.hidden_size, config.num_layers, config.num_attention_heads,
            config.ffn_hidden_size) == (16, 1280, 32, 16, 5120)
    assert config.max_grid_size == 128 and config.head_dim == 80
    assert config.image_size_multiple == 32 and config.folded_hidden_size == 5120
    assert config.num_tokens(512, 512) == 256 and config.num_tokens(384, 640) == 240
    assert config.vision_grad_scale == 0.1 and not config.frozen_train_mode


def test_every_field_has_a_docstring_and_flags_carry_the_prefix():
    docs = field_docstrings(VisionConfig)
    parser = argparse.ArgumentParser()
    add_dataclass_group(parser, VisionConfig, "vision")
    flags = {action.option_strings[0] for action in parser._actions if action.option_strings}
    for field in dataclasses.fields(VisionConfig):
        assert docs.get(field.name), field.name
    assert "--vision-num-layers" in flags and "--vision-frozen-train-mode" in flags
    assert "--vision-grad-scale" in flags and "--vision-vision-grad-scale" not in flags
    namespace = parser.parse_args(
        ["--vision-grad-scale", "0.5", "--vision-num-layers", "4", "--vision-frozen-train-mode"]
    )
    config = build_dataclass(VisionConfig, namespace, [])
    assert (config.vision_grad_scale, config.num_layers, config.frozen_train_mode) == (0.5, 4, True)


def test_validation_names_flags_values_and_fixes_all_together():
    config = VisionConfig(num_attention_heads=16, ffn_hidden_size=5120, max_image_size=2050, cpe_pos_dropout=1.0,
                          vision_grad_scale=-1.0, class_token_len=-1)
    problems = config.validate(tensor_model_parallel_size=3)
    text = "\n".join(problems)
    assert "--vision-num-attention-heads (16) must be divisible by --tensor-model-parallel-size (3)" in text
    assert "use a --tensor-model-parallel-size of 1, 2, 4, 8, 16" in text
    assert "--vision-ffn-hidden-size (5120) must be divisible" in text
    assert "--vision-max-image-size (2050) must be a multiple of --vision-patch-size (16)" in text
    assert "--vision-cpe-pos-dropout (1.0) must be in [0, 1)" in text
    assert "--vision-grad-scale (-1.0) must be at least 0" in text
    assert "--vision-class-token-len (-1) must be at least 0" in text
    with pytest.raises(ValueError, match="invalid vision configuration"):
        config.check(3)
    assert VisionConfig().validate(8) == []


def test_transformer_configs_of_vit_and_projector():
    config = VisionConfig(hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64, recompute=True)
    vit = config.to_transformer_config(params_dtype=torch.float32)
    assert vit.activation_func is F.gelu and vit.layernorm_epsilon == 1e-6 and vit.normalization == "LayerNorm"
    assert vit.add_bias_linear and vit.add_qkv_bias and not vit.bias_activation_fusion
    assert vit.pipeline_model_parallel_size == 1 and vit.kv_channels == 8
    assert vit.recompute_granularity == "full" and vit.recompute_num_layers == 1
    projector = config.projector_transformer_config(24, vit)
    assert projector.activation_func is F.silu and projector.hidden_size == projector.ffn_hidden_size == 24
    assert projector.recompute_granularity is None and projector.params_dtype == torch.float32


def test_fp8_without_transformer_engine_is_an_error_not_a_no_op():
    if torch.cuda.is_available():
        pytest.skip("this machine may have Transformer Engine")
    with pytest.raises(RuntimeError, match="--fp8-format .*vision tower needs Transformer Engine"):
        VisionConfig().to_transformer_config(fp8="e4m3")
