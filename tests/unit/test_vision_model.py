"""Vision tower behaviour on CPU: shapes for any multiple of the fold unit, class tokens stripped, eval mode
while frozen (and the reference's quirk behind its flag), seeded CPE randomness, the gradient scale, projector
initialisation, recomputation and the Transformer Engine spec's error."""
import math

import pytest
import torch

import megatron_puffin.distributed as dist_utils
from megatron_puffin.models.vision import VisionConfig, build_vision, get_vision_layer_spec

LLM_HIDDEN = 24


@pytest.fixture(scope="module", autouse=True)
def single_process():
    dist_utils.initialize(seed=0)
    yield
    dist_utils.destroy()


def _config(**overrides):
    values = dict(patch_size=4, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                  max_image_size=32, class_token_len=3, cpe_pos_dropout=0.5)
    values.update(overrides)
    return VisionConfig(**values)


def _images(batch=2, height=16, width=24, seed=0):
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _freeze(model):
    for param in model.encoder.parameters():
        param.requires_grad_(False)


def test_output_has_one_token_per_fold_block_for_any_multiple_of_the_unit():
    torch.manual_seed(0)
    model = build_vision(_config(), LLM_HIDDEN, pg_collection=dist_utils.process_groups()).eval()
    for height, width in ((16, 24), (32, 32), (40, 8)):
        out = model(_images(height=height, width=width))
        assert out.shape == (2, (height // 8) * (width // 8), LLM_HIDDEN)
    features = model.encoder(torch.zeros(1, 3, 16, 24))
    assert features.shape == (1, 4 * 6, 32)  # the 3 class/register tokens are stripped


def test_images_must_be_multiples_of_patch_times_fold():
    model = build_vision(_config(), LLM_HIDDEN, pg_collection=dist_utils.process_groups())
    with pytest.raises(ValueError, match=r"image size \(16, 20\) must be a multiple of 8"):
        model(_images(height=16, width=20))
    with pytest.raises(ValueError, match=r"expects images \[b, 3, H, W\]"):
        model(torch.zeros(2, 1, 16, 16))


def test_frozen_encoder_runs_in_eval_mode_inside_a_training_model():
    model = build_vision(_config(), LLM_HIDDEN, pg_collection=dist_utils.process_groups())
    _freeze(model)
    model.train()
    assert model.training and not model.encoder.training and model.projector.training
    images = _images()
    assert torch.equal(model(images), model(images))  # no CPE randomness
    expected = build_vision(_config(), LLM_HIDDEN, pg_collection=dist_utils.process_groups())
    expected.load_state_dict(model.state_dict())
    assert torch.equal(model(images), expected.eval()(images))


def test_freezing_after_train_is_noticed_at_forward():
    model = build_vision(_config(), LLM_HIDDEN, pg_collection=dist_utils.process_groups()).train()
    assert model.encoder.training
    _freeze(model)
    model(_images())
    assert not model.encoder.training


def test_frozen_train_mode_flag_reproduces_the_reference_quirk():
    model = build_vision(_config(frozen_train_mode=True), LLM_HIDDEN, pg_collection=dist_utils.process_groups())
    _freeze(model)
    model.train()
    assert model.encoder.training
    images = _images()
    assert not torch.equal(model(images), model(images))  # random CPE window / position dropout per call


def test_train_mode_cpe_randomness_comes_from_the_generator_and_leaves_global_rng_alone():
    # random windows only
    model = build_vision(_config(cpe_pos_dropout=0.0), LLM_HIDDEN, pg_collection=dist_utils.process_groups()).train()
    images = _images()
    state = torch.get_rng_state()
    first = model(images, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    again = model(images, generator=torch.Generator().manual_seed(5))
    other = model(images, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first, model.eval()(images))


def _grads(model, images, **kwargs):
    model.zero_grad(set_to_none=True)
    (model(images, **kwargs) ** 2).sum().backward()
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def test_gradient_scale_multiplies_encoder_gradients_only():
    model = build_vision(_config(vision_grad_scale=0.25), LLM_HIDDEN, pg_collection=dist_utils.process_groups()).eval()
    unscaled = build_vision(_config(vision_grad_scale=1.0), LLM_HIDDEN,
                            pg_collection=dist_utils.process_groups()).eval()
    unscaled.load_state_dict(model.state_dict())
    images = _images()
    scaled, plain = _grads(model, images), _grads(unscaled, images)
    unscaled_token = _grads(model, images, apply_grad_scale=False)["encoder.class_token"]
    assert torch.equal(unscaled_token, plain["encoder.class_token"])
    for name, grad in scaled.items():
        if name.startswith("projector."):
            assert torch.equal(grad, plain[name]), name
        else:
            torch.testing.assert_close(grad, 0.25 * plain[name], rtol=1e-5, atol=1e-9), name


def test_projector_gets_pytorch_default_initialisation():
    torch.manual_seed(1)
    model = build_vision(_config(hidden_size=64, num_attention_heads=4), 48, pg_collection=dist_utils.process_groups())
    fc1, fc2 = model.projector.linear_fc1, model.projector.linear_fc2
    for tensor, fan_in in ((fc1.weight, 256), (fc1.bias, 256), (fc2.weight, 48), (fc2.bias, 48)):
        bound = 1 / math.sqrt(fan_in)
        assert tensor.abs().max() <= bound and tensor.abs().max() > 0.9 * bound
    assert abs(fc1.weight.std().item() - 1 / math.sqrt(3 * 256)) < 0.003


def test_recompute_gives_the_same_gradients():
    model = build_vision(_config(), LLM_HIDDEN, pg_collection=dist_utils.process_groups()).train()
    recomputed = build_vision(_config(recompute=True), LLM_HIDDEN, pg_collection=dist_utils.process_groups()).train()
    recomputed.load_state_dict(model.state_dict())
    calls = []
    recomputed.encoder.decoder.layers[0].register_forward_hook(lambda *args: calls.append(1))
    images = _images()
    expected = _grads(model, images, generator=torch.Generator().manual_seed(3))
    grads = _grads(recomputed, images, generator=torch.Generator().manual_seed(3))
    assert len(calls) == 2  # forward, then recomputed in backward
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-6, atol=1e-9), name


def test_final_norm_and_feature_normalizer_are_built_on_request():
    model = build_vision(_config(final_norm=True, feature_normalizer=True), LLM_HIDDEN,
                         pg_collection=dist_utils.process_groups())
    names = set(model.state_dict())
    assert {"encoder.ln_post.weight", "feature_normalizer.mean", "feature_normalizer.tx"} <= names
    plain = build_vision(_config(), LLM_HIDDEN, pg_collection=dist_utils.process_groups())
    assert "encoder.ln_post.weight" not in plain.state_dict()


def test_bf16_tower_keeps_fp32_conditioner_buffers():
    model = build_vision(_config(), LLM_HIDDEN, params_dtype=torch.bfloat16,
                         pg_collection=dist_utils.process_groups()).eval()
    assert model.encoder.embedder.weight.dtype == torch.bfloat16
    assert model.input_conditioner.norm_mean.dtype == torch.float32
    assert model(_images()).dtype == torch.bfloat16


def test_transformer_engine_spec_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match=r"transformer_engine \(vision tower\) needs Transformer Engine"):
        get_vision_layer_spec("transformer_engine")
    with pytest.raises(ValueError, match=r"--transformer-impl \(tex\) must be one of local, transformer_engine"):
        get_vision_layer_spec("tex")
