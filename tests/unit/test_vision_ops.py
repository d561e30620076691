"""Vision path pieces: the 2x2 fold's exact token/channel order, the gradient scale, input conditioning and
RADIO's feature normaliser."""
import pytest
import torch

from megatron_puffin.models.vision import (
    CLIP_MEAN,
    CLIP_STD,
    FeatureNormalizer,
    InputConditioner,
    ScaleGradient,
    fold_patches,
    scale_gradient,
)


def test_fold_of_a_4x4_grid_groups_patches_as_the_reference():
    features = torch.arange(16.0).reshape(1, 16, 1)
    folded = fold_patches(features, (4, 4), 2)
    assert folded.shape == (1, 4, 4)
    assert folded[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_fold_channel_order_is_row_offset_major_for_a_non_square_grid():
    batch, rows, cols, channels, fold = 2, 4, 6, 3, 2
    features = torch.randn(batch, rows * cols, channels)
    folded = fold_patches(features, (rows, cols), fold)
    w = cols // fold
    assert folded.shape == (batch, (rows // fold) * w, fold * fold * channels)
    for i in range(rows // fold):
        for j in range(w):
            for p in range(fold):
                for q in range(fold):
                    source = features[:, (fold * i + p) * cols + (fold * j + q)]
                    target = folded[:, i * w + j, (p * fold + q) * channels:(p * fold + q + 1) * channels]
                    assert torch.equal(target, source)


def test_fold_rejects_a_grid_that_does_not_fit():
    with pytest.raises(ValueError, match="cannot fold 12 patches as a 3x4 grid by 2"):
        fold_patches(torch.zeros(1, 12, 2), (3, 4), 2)


def test_scale_gradient_is_identity_forward_and_scales_backward():
    x = torch.randn(3, 5, requires_grad=True)
    y = scale_gradient(x, 0.1)
    assert torch.equal(y, x)
    upstream = torch.randn(3, 5)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream * 0.1)
    assert scale_gradient(x, 1.0) is x
    z = ScaleGradient.apply(x, 0.0)
    grad, = torch.autograd.grad(z.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))


def test_input_conditioner_maps_minus_one_one_to_clip_normalised_unit_range():
    conditioner = InputConditioner()
    images = torch.rand(2, 3, 4, 4) * 2 - 1
    out = conditioner(images.to(torch.bfloat16), torch.float32)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected = ((images.to(torch.bfloat16).float() + 1) / 2 - mean) / std
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert conditioner(images, torch.bfloat16).dtype == torch.bfloat16
    assert dict(conditioner.state_dict())["norm_mean"].shape == (3, 1, 1)


def test_feature_normalizer_is_identity_by_default_and_applies_mean_and_transform():
    normalizer = FeatureNormalizer(4)
    x = torch.randn(2, 3, 4)
    assert torch.equal(normalizer(x), x)
    normalizer.mean.copy_(torch.randn(4))
    normalizer.tx.copy_(torch.randn(4, 4))
    torch.testing.assert_close(normalizer(x), (x - normalizer.mean) @ normalizer.tx.T)
