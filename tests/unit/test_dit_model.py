"""DiT model behaviour on CPU: batching by shape, masks only when padded, activation recomputation, specs."""
import pytest
import torch

import megatron_puffin.distributed as dist_utils
from megatron_puffin.models.dit import DiTConfig, build_dit, get_dit_layer_spec
from megatron_puffin.models.common.attention import SDPADotProductAttention
from megatron_puffin.models.dit.embeddings import PatchEmbed


@pytest.fixture(scope="module", autouse=True)
def single_process():
    dist_utils.initialize(seed=0)
    yield
    dist_utils.destroy()


def _config(**overrides):
    values = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
                  num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12,
                  pos_embed_max_size=24)
    values.update(overrides)
    return DiTConfig(**values)


def _conditioning(batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 5, 24, generator=gen), torch.randn(batch, 12, generator=gen), torch.rand(batch) * 1000


def _mixed_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    targets = [torch.randn(4, h, w, generator=gen) for h, w in [(8, 8), (4, 8), (8, 8)]]
    conds = [[torch.randn(4, 8, 8, generator=gen)], [torch.randn(4, 4, 8, generator=gen)] * 2, None]
    return targets, conds


class _Recorder:
    """Forward pre-hooks counting patch-embedding calls and recording the masks the core attention sees."""

    def __init__(self, model):
        self.embed_shapes, self.masks = [], []
        self.handles = [model.pos_embed.register_forward_pre_hook(self._embed)]
        for module in model.modules():
            if isinstance(module, SDPADotProductAttention):
                self.handles.append(module.register_forward_pre_hook(self._attention, with_kwargs=True))

    def _embed(self, module, args):
        self.embed_shapes.append(tuple(args[0].shape))

    def _attention(self, module, args, kwargs):
        self.masks.append(args[3])

    def remove(self):
        for handle in self.handles:
            handle.remove()


def test_equal_shaped_list_returns_the_stacked_tensor_result():
    model = build_dit(_config(), device="cpu", pg_collection=dist_utils.process_groups()).eval()
    latents = torch.randn(2, 4, 8, 6)
    text, pooled, timestep = _conditioning(2)
    with torch.no_grad():
        from_tensor = model(latents, text, pooled, timestep)
        from_list = model(list(latents), text, pooled, timestep)
    assert from_tensor.shape == (2, 4, 8, 6)
    assert torch.equal(from_list, from_tensor)


def test_unpadded_batch_embeds_once_and_attends_without_any_mask():
    model = build_dit(_config(), device="cpu", pg_collection=dist_utils.process_groups()).eval()
    recorder = _Recorder(model)
    text, pooled, timestep = _conditioning(2)
    conds = [[torch.randn(4, 8, 8), torch.randn(4, 8, 8)] for _ in range(2)]
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8), text, pooled, timestep, cond_hidden_states=conds)
    recorder.remove()
    assert recorder.embed_shapes == [(6, 4, 8, 8)]  # targets and conditions of both samples in one call
    assert len(recorder.masks) == 3 and all(mask is None for mask in recorder.masks)


def test_padded_batch_embeds_once_per_shape_and_masks_keys_only():
    model = build_dit(_config(), device="cpu", pg_collection=dist_utils.process_groups()).eval()
    recorder = _Recorder(model)
    targets, conds = _mixed_batch()
    text, pooled, timestep = _conditioning(3)
    with torch.no_grad():
        out = model(targets, text, pooled, timestep, cond_hidden_states=conds)
    recorder.remove()
    assert sorted(recorder.embed_shapes) == [(3, 4, 4, 8), (3, 4, 8, 8)]
    mask = recorder.masks[0]
    assert mask.shape == (3, 1, 1, 32 + 5) and mask.dtype == torch.bool  # a key vector, never L x L
    assert [int((~mask[b]).sum()) for b in range(3)] == [32 + 5, 24 + 5, 16 + 5]
    assert isinstance(out, list) and [o.shape for o in out] == [t.shape for t in targets]


def test_activation_recomputation_gives_bit_identical_gradients():
    targets, conds = _mixed_batch(1)
    text, pooled, timestep = _conditioning(3, seed=1)
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = build_dit(_config(recompute=recompute), device="cpu", pg_collection=dist_utils.process_groups()).train()
        assert model.recompute is recompute
        outputs = model(targets, text, pooled, timestep, cond_hidden_states=conds)
        sum((o.square() * (i + 1)).sum() for i, o in enumerate(outputs)).backward()
        grads.append({name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0] if grads[0][k] is not None)
    # Only the last block's text queries are never computed (SD3 discards their outputs); every other gradient
    # is non-zero.
    unused = sorted(k for k, g in grads[1].items() if g is None)
    assert unused == ["transformer_blocks.2.attn.add_q_proj.bias", "transformer_blocks.2.attn.add_q_proj.weight"]
    assert all(grads[0][k] is None for k in unused)
    assert all(g.abs().sum() > 0 for k, g in grads[1].items() if k not in unused)


def _last_block_attention_lengths(model):
    """(query, key) lengths the last block's core attention sees, recorded by a forward pre-hook."""
    lengths = []
    attention = model.transformer_blocks[-1].attn.core_attention
    handle = attention.register_forward_pre_hook(lambda module, args: lengths.append((args[0].shape[0],
                                                                                       args[1].shape[0])))
    return lengths, handle


def test_last_block_makes_queries_for_the_targets_only_and_equals_the_full_block():
    """The last block's output is read at each sample's target tokens only: with local attention its queries are
    the stream's targets prefix (16 of 32 image tokens here; sample 1's prefix holds 8 condition tokens too and
    sample 2's its whole stream), keys are every token; outputs and gradients equal the block computing every
    query (the path of the Transformer Engine spec), switched on the same module."""
    targets, conds = _mixed_batch(2)
    text, pooled, timestep = _conditioning(3, seed=2)
    runs = []
    for image_queries_only in (True, False):
        torch.manual_seed(0)
        model = build_dit(_config(), device="cpu", pg_collection=dist_utils.process_groups()).train()
        assert model.transformer_blocks[-1].attn.image_queries_only
        model.transformer_blocks[-1].attn.image_queries_only = image_queries_only
        lengths, handle = _last_block_attention_lengths(model)
        outputs = model(targets, text, pooled, timestep, cond_hidden_states=conds)
        sum((o.square() * (i + 1)).sum() for i, o in enumerate(outputs)).backward()
        handle.remove()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        runs.append((lengths, [o.detach() for o in outputs], grads))
    (trimmed_lengths, trimmed_out, trimmed_grads), (full_lengths, full_out, full_grads) = runs
    assert trimmed_lengths == [(16, 5 + 32)] and full_lengths == [(5 + 32, 5 + 32)]
    for ours, full in zip(trimmed_out, full_out):
        torch.testing.assert_close(ours, full, rtol=1e-6, atol=1e-6)
    # The full block's text queries get exactly zero gradient (discarded outputs); the trimmed one none at all.
    skipped = {k for k in full_grads if k not in trimmed_grads}
    assert skipped == {"transformer_blocks.2.attn.add_q_proj.bias", "transformer_blocks.2.attn.add_q_proj.weight"}
    assert all(not full_grads[k].any() for k in skipped)
    for name, grad in trimmed_grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_recomputation_actually_recomputes_blocks_in_training_only():
    model = build_dit(_config(recompute=True), device="cpu", pg_collection=dist_utils.process_groups())
    calls = []
    model.transformer_blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    text, pooled, timestep = _conditioning(1)
    model.train()
    model(torch.randn(1, 4, 8, 8), text, pooled, timestep).sum().backward()
    assert len(calls) == 2  # forward + recomputation in backward
    calls.clear()
    model.eval()
    model(torch.randn(1, 4, 8, 8), text, pooled, timestep).sum().backward()
    assert len(calls) == 1


def test_scalar_timestep_is_broadcast_over_the_batch():
    model = build_dit(_config(), device="cpu", pg_collection=dist_utils.process_groups()).eval()
    latents = torch.randn(2, 4, 8, 8)
    text, pooled, _ = _conditioning(2)
    with torch.no_grad():
        scalar = model(latents, text, pooled, torch.tensor(250.0))
        vector = model(latents, text, pooled, torch.tensor([250.0, 250.0]))
    assert torch.equal(scalar, vector)


def test_sharded_state_dict_covers_every_tensor():
    model = build_dit(_config(), device="cpu", pg_collection=dist_utils.process_groups())
    sharded = model.sharded_state_dict()
    names = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    assert names <= set(sharded)


def test_transformer_engine_spec_is_gated_with_the_install_line():
    if torch.cuda.is_available():
        pytest.skip("checks the error raised without a usable Transformer Engine")
    with pytest.raises(RuntimeError, match="needs Transformer Engine with CUDA.*transformer-engine\\[pytorch\\]"):
        get_dit_layer_spec("transformer_engine")
    with pytest.raises(ValueError, match="--transformer-impl \\(flash\\) must be one of local, transformer_engine"):
        get_dit_layer_spec("flash")


def test_patch_embed_keeps_diffusers_buffer_name():
    assert "pos_embed" in dict(PatchEmbed(_config()).named_buffers())
