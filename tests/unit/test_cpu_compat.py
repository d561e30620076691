"""One test per CPU patch of megatron-core: each shows the patch works and that the unpatched behaviour still
fails on a CPU-only machine (so a patch that stops being needed is noticed)."""
import pytest
import torch

import megatron_puffin.distributed as mpd
from megatron_puffin.distributed import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim applies only without CUDA")


@pytest.fixture(scope="module", autouse=True)
def initialised():
    mpd.initialize(seed=5)
    yield
    mpd.destroy()


def _fails(fn, *args, **kwargs) -> bool:
    try:
        fn(*args, **kwargs)
    except (RuntimeError, AssertionError, AttributeError, TypeError):
        return True
    return False


def test_all_patches_applied():
    assert cpu_compat.cpu_compat_active()
    assert set(cpu_compat.PATCHES) == {"CUDA_RNG", "CURRENT_DEVICE", "CUDA_FACTORIES", "TENSOR_CUDA", "PARAM_TYPE",
                                            "FSDP2_MESH"}


def test_cuda_rng_tracker_keeps_cpu_states():
    from megatron.core import tensor_parallel

    assert _fails(cpu_compat.ORIGINALS["cuda_get_rng_state"])  # still needed
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_compat.CpuRNGStatesTracker)
    outer_before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outer_before)  # the default stream is untouched
    with tracker.fork():
        second = torch.rand(4)
    assert not torch.equal(first, second)  # the tracked stream advanced
    mpd.seed_everything(5)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), first)  # re-seeding reproduces it


def test_activation_recompute_reproduces_dropout_under_the_tracker():
    from megatron.core import tensor_parallel

    weight = torch.randn(8, 8, requires_grad=True)

    def block(x, w):
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(x @ w, p=0.5, training=True)

    x = torch.randn(3, 8)
    mpd.seed_everything(3)
    block(x, weight).sum().backward()
    plain = weight.grad.clone()
    weight.grad = None
    mpd.seed_everything(3)
    # The recomputation in backward must see the same dropout mask as the first forward.
    torch.rand(7)  # advance the default stream between forward and backward: must not matter
    tensor_parallel.checkpoint(block, False, x, weight).sum().backward()
    torch.testing.assert_close(weight.grad, plain, rtol=0, atol=0)


def test_current_device_and_synchronize():
    assert _fails(cpu_compat.ORIGINALS["cuda_current_device"])
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()  # a no-op instead of an error
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"


def test_cuda_factories_in_megatron_modules():
    from megatron.core.transformer import utils

    assert _fails(torch.zeros, 1, device="cuda")
    mask = utils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert torch.equal(mask, torch.ones(4, 4, dtype=torch.bool).triu(1))
    assert isinstance(utils.torch, cpu_compat._CpuFactoryTorch)
    assert torch.zeros is not utils.torch.zeros  # the global torch is not patched


def test_tensor_cuda_is_identity():
    t = torch.ones(2)
    assert _fails(cpu_compat.ORIGINALS["tensor_cuda"], t)
    assert t.cuda() is t


def test_param_type_checks_accept_cpu_parameters_in_a_real_optimizer():
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from helpers.llm import tiny_llm_config
    from megatron_puffin.models.llm import build_llm

    assert cpu_compat.ORIGINALS["tensor_type"](torch.ones(1)) == "torch.FloatTensor"  # what megatron rejects
    config = tiny_llm_config(num_layers=1)
    tconfig = config.to_transformer_config(params_dtype=torch.bfloat16)
    model = build_llm(config, transformer_config=tconfig, pg_collection=mpd.process_groups())
    ddp = DistributedDataParallel(tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True), [ddp])
    main_params = [p for group in optimizer.param_groups for p in group["params"]]
    assert main_params and all(p.dtype == torch.float32 for p in main_params)  # fp32 master copies of bf16 params
    assert torch.ones(1).type() == "torch.FloatTensor"  # the type() override is scoped to construction


def test_param_type_check_of_gradient_clipping():
    from megatron.core.optimizer import optimizer

    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.full((4,), 3.0)
    optimizer.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=6.0)
    torch.testing.assert_close(param.grad, torch.full((4,), 3.0 / (6.0 + 1e-6)))


def test_fsdp2_device_mesh_is_built_on_the_cpu():
    from megatron.core.distributed import torch_fully_sharded_data_parallel
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    group = torch.distributed.group.WORLD
    assert _fails(fully_shard, torch.nn.Linear(2, 2), mesh=DeviceMesh.from_group(group, "cuda"))  # still needed
    mesh = torch_fully_sharded_data_parallel.DeviceMesh.from_group(group, "cuda")
    assert mesh.device_type == "cpu"
    layer = fully_shard(torch.nn.Linear(2, 2), mesh=mesh)
    assert layer(torch.ones(1, 2)).shape == (1, 2)
