"""The composed Puffin model against the reference assembly of ``megatron_puffin.testing.reference_puffin``
(transformers Qwen2, diffusers SD3 blocks with the dense mask and per-sample patch embedding, plain-PyTorch
connectors, diffusers AutoencoderKL one sample at a time), same weights through our converters, same noise.

Every task's loss and every parameter gradient are compared in fp32. This also tests the reference assembly that
``benchmarks/bench_puffin.py`` times against. The vision tower is ours on both sides (timm is unavailable here).
"""
import pytest
import torch

import megatron_puffin.distributed as mpd
from helpers.puffin import TASK_STREAMS, make_tiny_dataset, task_batches, tiny_puffin_config
from megatron_puffin.convert.connector import mcore_to_reference
from megatron_puffin.convert.qwen2 import mcore_to_hf
from megatron_puffin.convert.sd3 import mcore_to_diffusers
from megatron_puffin.testing.reference_dit import reference_dynamic_forward
from megatron_puffin.testing.reference_puffin import build_puffin_pair
from megatron_puffin.training.objectives import puffin_loss

LOSS_REL_TOLERANCE = 1e-6
GRAD_REL_TOLERANCE = 1e-4
OUTPUT_REL_TOLERANCE = 1e-5
# A key bias shifts every score of a query equally: its true gradient is 0 and both sides hold rounding noise.
ZERO_GRADIENT_SUFFIXES = ("self_attn.k_proj.bias",)
TRAINED_TOWERS = {  # reference prefixes that must receive a non-zero gradient (so the match is not vacuous)
    "image2text": ("llm.", "vision."),
    "image2text_cross_view": ("llm.", "vision."),
    "text2text": ("llm.",),
    "text2image": ("llm.", "query_path.", "transformer."),
    "cam2image": ("llm.", "query_path.", "transformer."),
    "image2image": ("llm.", "vision.", "query_path.", "transformer."),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    paths = make_tiny_dataset(tmp_path_factory.mktemp("puffin_reference"))
    mpd.initialize(seed=0)
    config = tiny_puffin_config(paths)
    ours, reference = build_puffin_pair(config)
    yield config, ours, reference, task_batches(paths)
    mpd.destroy()


def _our_gradients_by_reference_name(ours, config):
    """Our gradients (zeros where none) converted to the reference assembly's parameter names."""
    grads = {name: param.grad for name, param in ours.named_parameters() if param.grad is not None}
    state = {name: grads.get(name, torch.zeros_like(tensor)) for name, tensor in ours.state_dict().items()
             if not name.endswith("_extra_state")}

    def tower(prefix):
        return {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}

    mapped = {"llm." + k: v for k, v in mcore_to_hf(tower("llm."), config.llm).items()}
    mapped.update({"transformer." + k: v for k, v in mcore_to_diffusers(tower("dit."), config.dit).items()})
    query_path = mcore_to_reference(tower("conditioner."), config.connector, config.llm.hidden_size)
    mapped.update({"query_path." + k: v for k, v in query_path.items()})
    mapped.update({"vision." + k: v for k, v in tower("vision.").items()})
    return mapped


def _rel(ours, theirs):
    error = (ours - theirs).abs().max()
    return 0.0 if error == 0 else (error / theirs.abs().max()).item()


@pytest.mark.parametrize("task", list(TASK_STREAMS))
def test_loss_and_gradients_equal_the_reference_assembly(setup, task):
    config, ours, reference, batches = setup
    batch = batches[task][0]
    ours.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    our_loss, ref_loss = puffin_loss(ours, batch).loss, reference(batch)["loss"]
    our_loss.backward()
    ref_loss.backward()
    assert abs(our_loss.item() - ref_loss.item()) <= LOSS_REL_TOLERANCE * abs(ref_loss.item())
    mapped = _our_gradients_by_reference_name(ours, config)
    reached = set()
    for name, param in reference.named_parameters():
        theirs = param.grad if param.grad is not None else torch.zeros_like(param)
        if name.startswith("query_path.") and name.endswith(ZERO_GRADIENT_SUFFIXES):
            assert mapped[name].abs().max() < 1e-6 and theirs.abs().max() < 1e-6, name
            continue
        assert _rel(mapped[name], theirs) <= GRAD_REL_TOLERANCE, name
        if theirs.abs().max() > 0:
            reached.add(name.split(".")[0] + ".")
    assert set(TRAINED_TOWERS[task]) <= reached, reached


def test_reference_dit_forward_pads_mixed_sizes_like_ours(setup):
    """The reference's right padding + dense mask (samples of different lengths) equals our tower's forward."""
    config, ours, reference, _ = setup
    gen = torch.Generator().manual_seed(5)
    channels = config.dit.in_channels

    def latent(h, w):
        return torch.randn(channels, h, w, generator=gen)

    targets = [latent(8, 8), latent(12, 4), latent(4, 4)]
    conds = [[latent(8, 8)], [latent(12, 4), latent(8, 8)], []]  # stream lengths 32, 40, 4 tokens: padded
    text = torch.randn(3, config.connector.num_queries, config.dit.joint_attention_dim, generator=gen)
    pooled = torch.randn(3, config.dit.pooled_projection_dim, generator=gen)
    timestep = torch.rand(3, generator=gen) * 1000
    with torch.no_grad():
        expected = reference_dynamic_forward(reference.transformer, targets, text, pooled, timestep, conds)
        got = ours.dit(targets, text, pooled, timestep, conds)
    assert [v.shape for v in expected] == [t.shape for t in targets]
    for ours_v, ref_v in zip(got, expected):
        assert _rel(ours_v, ref_v) <= OUTPUT_REL_TOLERANCE
