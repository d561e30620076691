"""The DiT's Transformer Engine spec against its local spec on a GPU (bf16, and an FP8 smoke run).

Run with ``python -m pytest tests/gpu/test_dit_te.py`` (TP=1) or under ``torchrun --nproc-per-node N`` (TP=N).
Skipped without CUDA or without a usable Transformer Engine.

Tolerance: both variants compute in bf16 with different kernels (cuBLAS vs TE GEMMs, SDPA vs flash/cuDNN
attention), so each differs from an fp32 reference by bf16 rounding. The TE output must agree with the local
bf16 output within ``BF16_REL_ERROR`` (max error relative to the largest output), and its error against fp32 must
not exceed twice the local bf16 error plus ``BF16_REL_ERROR / 4``.
"""
import os

import pytest
import torch

from megatron_puffin.optional_deps import transformer_engine_error

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(
        torch.cuda.is_available() and transformer_engine_error() is not None,
        reason=f"Transformer Engine unusable: {transformer_engine_error() if torch.cuda.is_available() else ''}",
    ),
]

BF16_REL_ERROR = 2e-2
FP8_REL_ERROR = 0.15


@pytest.fixture(scope="module", autouse=True)
def distributed():
    import megatron_puffin.distributed as dist_utils

    context = dist_utils.initialize(tensor_model_parallel_size=int(os.environ.get("WORLD_SIZE", "1")), seed=0)
    yield context
    dist_utils.destroy()


def _config(**overrides):
    from megatron_puffin.models.dit import DiTConfig

    values = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=64,
                  num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=256,
                  pooled_projection_dim=64, pos_embed_max_size=48)
    values.update(overrides)
    return DiTConfig(**values)


def _batch(padded: bool):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    if padded:
        latents = [randn(16, 16, 16), randn(16, 8, 16), randn(16, 16, 16)]
        conds = [[randn(16, 16, 16)], [randn(16, 8, 16)], []]
    else:
        latents = randn(2, 16, 16, 16)
        conds = [[randn(16, 16, 16)], [randn(16, 16, 16)]]
    batch = len(latents)
    timestep = torch.rand(batch, generator=gen, device="cuda") * 1000
    return latents, conds, randn(batch, 16, 128), randn(batch, 64), timestep


def _build(transformer_impl, dtype, state=None, fp8=None):
    from megatron_puffin.distributed import process_groups
    from megatron.core import parallel_state

    from megatron_puffin.convert.sd3 import load_dit_state_dict
    from megatron_puffin.models.dit import build_dit

    config = _config()
    tc = config.to_transformer_config(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(), params_dtype=dtype, fp8=fp8
    )
    model = build_dit(config, transformer_config=tc, transformer_impl=transformer_impl,
                      pg_collection=process_groups())
    if state is not None:
        load_dit_state_dict(model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    return model


def _run(model, batch, dtype, backward=False):
    latents, conds, text, pooled, timestep = batch
    cast = [x.to(dtype) for x in latents] if isinstance(latents, list) else latents.to(dtype)
    conds = [[c.to(dtype) for c in sample] for sample in conds]
    with torch.set_grad_enabled(backward):
        out = model(cast, text.to(dtype), pooled.to(dtype), timestep, cond_hidden_states=conds)
        flat = torch.cat([o.reshape(-1) for o in out]).float()
        if backward:
            (flat.square().mean()).backward()
    return flat.detach()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _reference_state():
    torch.manual_seed(0)
    reference = _build("local", torch.float32)
    return reference, {k: v for k, v in reference.state_dict().items() if not k.endswith("_extra_state")}


@pytest.mark.parametrize("padded", [False, True])
def test_te_spec_matches_local_spec_in_bf16(padded):
    reference, state = _reference_state()
    local, te = _build("local", torch.bfloat16, state), _build("transformer_engine", torch.bfloat16, state)
    batch = _batch(padded)
    fp32 = _run(reference.eval(), batch, torch.float32)
    local_out, te_out = _run(local.eval(), batch, torch.bfloat16), _run(te.eval(), batch, torch.bfloat16)
    assert _rel(te_out, local_out) <= BF16_REL_ERROR
    assert _rel(te_out, fp32) <= 2 * _rel(local_out, fp32) + BF16_REL_ERROR / 4


def test_te_spec_gradients_match_local_spec_in_bf16():
    _, state = _reference_state()
    local, te = _build("local", torch.bfloat16, state), _build("transformer_engine", torch.bfloat16, state)
    batch = _batch(padded=True)
    _run(local.train(), batch, torch.bfloat16, backward=True)
    _run(te.train(), batch, torch.bfloat16, backward=True)
    te_grads = dict(te.named_parameters())
    for name, param in local.named_parameters():
        if "add_q_proj" in name and name.startswith(f"transformer_blocks.{_config().num_layers - 1}."):
            continue  # unused text queries of the last block: zero in both
        assert _rel(te_grads[name].grad.float(), param.grad.float()) <= 5 * BF16_REL_ERROR, name


def test_fp8_runs_forward_and_backward_close_to_bf16():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    _, state = _reference_state()
    bf16 = _build("transformer_engine", torch.bfloat16, state)
    fp8 = _build("transformer_engine", torch.bfloat16, state, fp8="hybrid")
    batch = _batch(padded=False)
    expected = _run(bf16.eval(), batch, torch.bfloat16)
    for _ in range(3):  # delayed scaling needs a few steps of amax history
        fp8.zero_grad(set_to_none=True)
        got = _run(fp8.train(), batch, torch.bfloat16, backward=True)
    assert torch.isfinite(got).all()
    assert _rel(got, expected) <= FP8_REL_ERROR
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fp8.parameters() if p.requires_grad)
