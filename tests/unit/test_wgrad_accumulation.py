"""Weight gradients accumulated into megatron-core's gradient buffer on CPU (patch CPU_WGRAD_ACCUMULATION):
still needed, and the same gradients within fp32 rounding (an understanding and a generation task: every tower)."""
import pytest
import torch

import megatron_puffin.distributed as mpd
from helpers.llm import tiny_llm_config
from helpers.puffin import make_tiny_dataset, task_batches, tiny_puffin_config
from megatron_puffin import platform
from megatron_puffin.training.wgrad_accumulation import PATCH_NAME, enable_gradient_accumulation_fusion


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    paths = make_tiny_dataset(tmp_path_factory.mktemp("wgrad"), num_samples=16)
    mpd.initialize(seed=0)
    yield paths
    mpd.destroy()


def test_megatron_core_refuses_the_fusion_without_the_patch(tiny):
    """megatron-core's linear layers reject gradient_accumulation_fusion without apex's CUDA module."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    assert PATCH_NAME in platform.applied()
    config = tiny_llm_config(num_layers=1).to_transformer_config()
    config.gradient_accumulation_fusion = True
    with platform.unpatched(PATCH_NAME), pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda"):
        ColumnParallelLinear(8, 8, config=config, init_method=config.init_method, bias=False, gather_output=False,
                             tp_group=mpd.process_groups().tp)
    assert ColumnParallelLinear(8, 8, config=config, init_method=config.init_method, bias=False, gather_output=False,
                                tp_group=mpd.process_groups().tp).gradient_accumulation_fusion


def _tiny_ddp(paths):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_puffin.models.puffin import build_puffin

    torch.manual_seed(0)
    model = build_puffin(tiny_puffin_config(paths), pg_collection=mpd.process_groups())
    model.train()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    return model, ddp


def test_plain_layers_stay_plain(tiny):
    """At TP=1 a linear layer is one F.linear (patch PLAIN_LINEAR_AT_TP1), faster than the fused path on a CPU:
    nothing is switched while that patch is in place, and every layer still is plain."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_puffin.models.common.plain_linear import is_plain

    assert platform.in_place("PLAIN_LINEAR_AT_TP1")
    model, ddp = _tiny_ddp(tiny)
    assert enable_gradient_accumulation_fusion(ddp) == 0
    linears = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
               and m.weight is not None]
    assert len(linears) > 20 and all(is_plain(m) for m in linears)


def test_gradients_equal_the_unfused_ones(tiny):
    """image2text then text2image (vision, LLM, connectors, MMDiT) through megatron-core's schedule and DDP,
    gradients accumulating over both: every gradient buffer entry equals the unfused run within fp32 rounding, the
    losses exactly; the tied output layer (an external weight) stays unfused, every other trainable linear is
    switched. megatron-core's own linear path, as layers at TP > 1 or with sequence parallelism run it (at TP=1
    they are plain, above). (The six-task equality of the towers' numbers is the golden-loss test's.)"""
    with platform.unpatched("PLAIN_LINEAR_AT_TP1"):
        _fused_equals_unfused(tiny)


def _fused_equals_unfused(tiny):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_puffin.training.step import forward_backward

    model, ddp = _tiny_ddp(tiny)
    batches = task_batches(tiny, micro_batch_size=2)
    cycle = [batches[task][0] for task in ("image2text", "text2image")]

    def run():
        ddp.zero_grad_buffer()
        losses = forward_backward(ddp, cycle).task_losses
        return losses, {name: p.main_grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    unfused_losses, unfused = run()
    linears = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    switched = enable_gradient_accumulation_fusion(ddp)
    assert switched == sum(m.weight is not None for m in linears) and switched > 20
    assert not model.llm.output_layer.gradient_accumulation_fusion  # fed the tied embedding weight
    fused_losses, fused = run()
    assert fused_losses == unfused_losses
    for name, grad in unfused.items():
        torch.testing.assert_close(fused[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # The fused path ran: megatron-core's linear backward marks a weight whose gradient went into the buffer. Every
    # switched linear but the MMDiT's last-block text queries (never computed: their outputs are discarded).
    unmarked = [name for name, m in model.named_modules()
                if m in linears and m.gradient_accumulation_fusion and not m.weight.grad_added_to_main_grad]
    assert unmarked == ["dit.transformer_blocks.1.attn.add_q_proj"], unmarked
