"""Speed patches of megatron-core (megatron_puffin.platform): each is still needed (megatron-core's own call site
does the extra work with the patch off) and changes no number."""
import contextlib
from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import megatron_puffin.distributed as mpd
from helpers.llm import tiny_llm_config
from megatron_puffin import platform
from megatron_puffin.models.llm import build_llm


@pytest.fixture()
def single_process():
    mpd.initialize(seed=0)
    yield mpd.process_groups()
    mpd.destroy()


def _profiled_fwd_bwd(model, input_ids, position_ids):
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        logits = model(input_ids=input_ids, position_ids=position_ids)
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    counts = Counter({event.key: event.count for event in prof.key_averages()})
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}, counts


def _with_and_without(patch: str, groups, num_layers: int):
    """``_profiled_fwd_bwd`` of one LLM of ``num_layers`` layers on one batch, with ``patch`` and without it."""
    assert patch in platform.applied()
    model = build_llm(tiny_llm_config(num_layers=num_layers), pg_collection=groups)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 250, (2, 11), generator=generator)
    position_ids = torch.arange(11).expand(2, 11)
    patched = _profiled_fwd_bwd(model, input_ids, position_ids)
    with platform.unpatched(patch):
        return patched, _profiled_fwd_bwd(model, input_ids, position_ids)


def test_rope_cos_sin_once_is_still_needed_and_bit_identical(single_process):
    """Through SelfAttention.forward of a 3-layer LLM: megatron-core's RoPE takes cos and sin twice per layer
    (query, key) and copies both; patched, once per forward and one cat fewer per call (rotate_half's remains),
    with identical logits and gradients (torch.equal)."""
    num_layers = 3
    patched, original = _with_and_without("ROPE_COS_SIN_ONCE", single_process, num_layers)
    assert original[2]["aten::cos"] == original[2]["aten::sin"] == 2 * num_layers
    assert patched[2]["aten::cos"] == patched[2]["aten::sin"] == 1
    assert original[2]["aten::cat"] - patched[2]["aten::cat"] == 2 * num_layers
    assert torch.equal(patched[0], original[0])
    for name, grad in original[1].items():
        assert torch.equal(patched[1][name], grad), name


def test_rope_replacement_leaves_other_variants_to_megatron_core(single_process):
    """Partial rotary dims (a pass-through part) and mscale != 1 go to megatron-core's function unchanged."""
    from megatron.core.transformer import attention

    replacement = attention.apply_rotary_pos_emb
    config = tiny_llm_config(num_layers=1).to_transformer_config()
    t = torch.randn(5, 2, 3, 16)
    partial = torch.randn(5, 2, 1, 8)
    assert torch.equal(replacement(t, partial, config), replacement.original(t, partial, config))
    full = torch.randn(5, 2, 1, 16)
    assert torch.equal(replacement(t, full, config, mscale=0.5), replacement.original(t, full, config, mscale=0.5))
    assert torch.equal(replacement(t, full, config), replacement.original(t, full, config))


def test_plain_linear_at_tp1_is_still_needed_and_changes_no_number(single_process):
    """Through a 3-layer LLM at TP=1: megatron-core's forward runs its own autograd function and the two region
    functions in every one of the 12 layer linears; patched, those 12 are one aten::linear each (the tied output
    layer, fed the embedding's weight, stays megatron-core's), with the same logits and gradients."""
    num_layers = 3
    patched, original = _with_and_without("PLAIN_LINEAR_AT_TP1", single_process, num_layers)
    megatron_linear = "autograd::engine::evaluate_function: LinearWithGradAccumulationAndAsyncCommunicationBackward"
    layer_linears = 4 * num_layers  # qkv, proj, fc1, fc2
    assert original[2][megatron_linear] == layer_linears + 1 and original[2]["aten::linear"] == 0
    assert patched[2][megatron_linear] == 1 and patched[2]["aten::linear"] == layer_linears
    for region in ("_CopyToModelParallelRegion", "_ReduceFromModelParallelRegion"):
        assert original[2][region] - patched[2][region] == layer_linears // 2
    torch.testing.assert_close(patched[0], original[0], rtol=1e-6, atol=1e-7)
    for name, grad in original[1].items():
        torch.testing.assert_close(patched[1][name], grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("skip_bias_add", [False, True], ids=["bias_added", "bias_returned"])
def test_plain_linear_returns_what_megatron_core_returns(single_process, skip_bias_add):
    """Both layer kinds, bias added or handed back (skip_bias_add): the same (output, output_bias) and gradients;
    a call that is not plain (fused weight-gradient accumulation, sequence parallelism, an external weight) is
    megatron-core's own forward."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_puffin.models.common.plain_linear import is_plain

    config = tiny_llm_config(num_layers=1).to_transformer_config()
    init = torch.nn.init.normal_
    layers = [ColumnParallelLinear(16, 24, config=config, init_method=init, bias=True, gather_output=False,
                                   skip_bias_add=skip_bias_add, tp_group=single_process.tp),
              RowParallelLinear(16, 24, config=config, init_method=init, bias=True, input_is_parallel=True,
                                skip_bias_add=skip_bias_add, tp_group=single_process.tp)]
    x = torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(1))
    for layer in layers:
        assert is_plain(layer)
        results = []
        for patch_on in (True, False):
            layer.zero_grad(set_to_none=True)
            with contextlib.nullcontext() if patch_on else platform.unpatched("PLAIN_LINEAR_AT_TP1"):
                output, output_bias = layer(x)
            assert (output_bias is layer.bias) if skip_bias_add else output_bias is None
            (output * torch.linspace(-1, 1, 24)).sum().backward()
            results.append((output.detach(), layer.weight.grad.clone()))
        torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)
        layer.gradient_accumulation_fusion = True
        assert not is_plain(layer)
        layer.gradient_accumulation_fusion = False
        layer.sequence_parallel = True
        assert not is_plain(layer)
        layer.sequence_parallel = False
    external = torch.randn(24, 16)  # the tied output layer's way: megatron-core's forward, external weight used
    torch.testing.assert_close(layers[0](x, weight=external)[0][..., :3],
                               (x @ external.t() + (0 if skip_bias_add else layers[0].bias))[..., :3])


def test_plain_linear_is_what_a_compiled_layer_traces(single_process):
    """Under torch.compile (--compile) a TP=1 layer traces one F.linear: one graph, no break, no megatron-core
    linear function in it; compiled calls equal eager ones. Two layers share the compiled code whether or not one
    ran eagerly first (the single-rank flag it cached then is not read while dynamo traces: a guard on it made every
    MMDiT block recompile once)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    config = tiny_llm_config(num_layers=1).to_transformer_config()

    def layer():
        return ColumnParallelLinear(16, 24, config=config, init_method=torch.nn.init.normal_, bias=True,
                                    gather_output=False, tp_group=single_process.tp)

    x = torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(2))
    explanation = torch._dynamo.explain(layer())(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    code = explanation.graphs[0].code
    assert "linear" in code and "LinearWithGradAccumulation" not in code, code
    torch._dynamo.reset()
    ran_eagerly, fresh = layer(), layer()
    ran_eagerly(x)
    compiled = [torch.compile(module, backend="aot_eager") for module in (ran_eagerly, fresh)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        outputs = [function(x)[0] for function in compiled for _ in range(2)]
    for output, module in zip(outputs, (ran_eagerly, ran_eagerly, fresh, fresh)):
        torch.testing.assert_close(output, module(x)[0], rtol=1e-6, atol=1e-7)
