"""One test per CPU patch of megatron-core (megatron_puffin.platform): each shows the patch works, and calls the
megatron-core function that needs it with the patch off to show it still fails there, so a patch that megatron-core
stops needing is noticed."""
import traceback
from pathlib import Path
from typing import Optional

import pytest
import torch

import megatron_puffin.distributed as mpd
from megatron_puffin import patching, platform
from megatron_puffin.distributed import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU patches apply only without CUDA")

CPU_PATCHES = {"CUDA_RNG", "CURRENT_DEVICE", "SYNCHRONIZE", "CUDA_FACTORIES", "TENSOR_CUDA", "PARAM_TYPE", "FSDP2_MESH"}


@pytest.fixture(scope="module", autouse=True)
def initialised():
    mpd.initialize(seed=5)
    yield
    mpd.destroy()


def _megatron_frames(tb) -> list:
    return [f"{Path(f.filename).name}:{f.name}" for f in traceback.extract_tb(tb) if "megatron/core" in f.filename]


def assert_fails_in_megatron(fn, where: str, error=(AssertionError, RuntimeError), match: Optional[str] = "CUDA"):
    """``fn()`` raises ``error`` (its message matching ``match``) inside megatron-core's ``where``
    (``file.py:function``): without CUDA, torch raises "Torch not compiled with CUDA enabled" (CPU build) or
    "... no CUDA GPUs ..." (CUDA build, no device)."""
    with pytest.raises(error, match=match) as info:
        fn()
    assert where in _megatron_frames(info.tb), _megatron_frames(info.tb)


def _tiny_ddp(params_dtype=torch.float32):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from helpers.llm import tiny_llm_config
    from megatron_puffin.models.llm import build_llm

    config = tiny_llm_config(num_layers=1)
    tconfig = config.to_transformer_config(params_dtype=params_dtype)
    model = build_llm(config, transformer_config=tconfig, pg_collection=mpd.process_groups())
    return lambda: DistributedDataParallel(tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)


def test_setup_applied_every_cpu_patch_once():
    assert CPU_PATCHES <= set(platform.applied())
    assert {patch.name for patch in platform.PATCHES} >= CPU_PATCHES and all(p.reason for p in platform.PATCHES)
    current_device = torch.cuda.current_device
    assert platform.setup() == platform.applied() and torch.cuda.current_device is current_device  # idempotent


def test_initialize_refuses_to_run_without_setup(monkeypatch):
    monkeypatch.setitem(patching._STATE, "set_up", False)
    with pytest.raises(RuntimeError, match=r"megatron_puffin\.platform\.setup\(\)"):
        mpd.initialize(seed=5)


def test_unpatched_restores_the_patch_afterwards():
    patched = torch.cuda.current_device
    with platform.unpatched("CURRENT_DEVICE"):
        assert torch.cuda.current_device is not patched
    assert torch.cuda.current_device is patched
    with pytest.raises(KeyError, match="NOT_A_PATCH"):
        with platform.unpatched("NOT_A_PATCH"):
            pass


def test_cuda_rng_tracker_keeps_cpu_states():
    from megatron.core import tensor_parallel

    with platform.unpatched("CUDA_RNG"):  # still needed: megatron-core's tracker reads the CUDA generator
        assert_fails_in_megatron(lambda: tensor_parallel.model_parallel_cuda_manual_seed(5, force_reset_rng=True),
                                 "random.py:add")
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_compat.CpuRNGStatesTracker)
    mpd.seed_everything(5)
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


def test_current_device_of_the_grad_buffers():
    build_ddp = _tiny_ddp()
    with platform.unpatched("CURRENT_DEVICE"):  # still needed: DDP allocates its buffers on current_device()
        assert_fails_in_megatron(build_ddp, "param_and_grad_buffer.py:__init__")
    ddp = build_ddp()
    assert ddp.buffers[0].grad_data.device.type == "cpu"
    assert torch.cuda.current_device() == torch.device("cpu")


def test_synchronize_in_the_dist_checkpoint_saver():
    # Every dist_checkpointing.save copies the tensors to host memory through this function first.
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    buckets = [("file_0.distcp", "storage", ([], [("item", torch.arange(4.0))]))]
    with platform.unpatched("SYNCHRONIZE"):  # still needed: it synchronises after the non-blocking copies
        assert_fails_in_megatron(lambda: FileSystemWriterAsync.preload_tensors(buckets, non_blocking=True),
                                 "filesystem_async.py:preload_tensors")
    [(_, _, (_, [(_, copied)]))] = FileSystemWriterAsync.preload_tensors(buckets, non_blocking=True)
    torch.testing.assert_close(copied, torch.arange(4.0), rtol=0, atol=0)


def test_cuda_factories_in_megatron_modules():
    from megatron.core.transformer import utils

    with platform.unpatched("CUDA_FACTORIES"):  # still needed: the default causal mask is built on "cuda"
        assert_fails_in_megatron(lambda: utils.get_default_causal_mask(7), "utils.py:get_default_causal_mask")
    mask = utils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert torch.equal(mask, torch.ones(4, 4, dtype=torch.bool).triu(1))
    assert isinstance(utils.torch, cpu_compat._CpuFactoryTorch)
    assert torch.zeros is not utils.torch.zeros  # the global torch is not patched


def test_tensor_cuda_in_tensor_parallel_broadcast():
    from megatron.core.tensor_parallel import broadcast_data

    data = {"tokens": torch.arange(6).view(2, 3)}
    with platform.unpatched("TENSOR_CUDA"):  # still needed: broadcast_data moves its inputs with .cuda()
        assert_fails_in_megatron(lambda: broadcast_data(["tokens"], data, torch.int64), "data.py:broadcast_data")
    assert torch.equal(broadcast_data(["tokens"], data, torch.int64)["tokens"], data["tokens"])
    t = torch.ones(2)
    assert t.cuda() is t


def test_param_type_checks_accept_cpu_parameters_in_a_real_optimizer():
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = _tiny_ddp(torch.bfloat16)()
    config = OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True)
    with platform.unpatched("PARAM_TYPE"):  # still needed: parameter groups accept torch.cuda.* types only
        assert_fails_in_megatron(lambda: get_megatron_optimizer(config, [ddp]), "optimizer.py:__init__",
                                 error=TypeError, match="torch.cuda.BFloat16Tensor")
    optimizer = get_megatron_optimizer(config, [ddp])
    main_params = [p for group in optimizer.param_groups for p in group["params"]]
    assert main_params and all(p.dtype == torch.float32 for p in main_params)  # fp32 master copies of bf16 params
    assert torch.ones(1).type() == "torch.FloatTensor"  # the type() override is scoped to construction


def test_param_type_check_of_gradient_clipping():
    from megatron.core.optimizer import optimizer

    def clip(param):
        optimizer.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=6.0)

    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.full((4,), 3.0)
    with platform.unpatched("PARAM_TYPE"):  # still needed: clipping asserts a torch.cuda.FloatTensor gradient
        assert_fails_in_megatron(lambda: clip(param), "clip_grads.py:clip_grad_by_total_norm_fp32", match=None)
    torch.testing.assert_close(param.grad, torch.full((4,), 3.0))  # the failed call changed nothing
    clip(param)
    torch.testing.assert_close(param.grad, torch.full((4,), 3.0 / (6.0 + 1e-6)))


def _row_parallel_linear():
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    from helpers.llm import tiny_llm_config

    config = tiny_llm_config(num_layers=1).to_transformer_config(params_dtype=torch.float32)
    return RowParallelLinear(8, 8, config=config, init_method=torch.nn.init.zeros_, bias=False,
                             input_is_parallel=True, skip_bias_add=True, tp_group=mpd.process_groups().tp)


def test_row_parallel_linear_passes_its_group_so_compiled_layers_do_not_break_their_graph():
    """megatron-core's RowParallelLinear still hands tp_group=None to its linear function (a DeprecationWarning from
    get_tensor_model_parallel_group_if_none, which dynamo cannot trace); patched, no warning and one graph. (At TP=1
    a call is F.linear, PLAIN_LINEAR_AT_TP1, and never reaches the linear function: that patch is off here, as if
    the layer were one of several tensor-parallel ranks.)"""
    layer, x = _row_parallel_linear(), torch.randn(3, 2, 8)
    with platform.unpatched("ROW_PARALLEL_TP_GROUP", "PLAIN_LINEAR_AT_TP1"), \
            pytest.warns(DeprecationWarning, match="tp_group is None"):
        layer(x)
    import warnings

    with platform.unpatched("PLAIN_LINEAR_AT_TP1"), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*tp_group is None.*")
        layer(x)
        explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_fsdp2_device_mesh_is_built_on_the_cpu():
    """megatron-core's TorchFullyShardedDataParallel asks for a "cuda" mesh: with the patch off, FSDP2 cannot
    shard on it; patched, the mesh is a CPU mesh and a sharded layer runs."""
    from megatron.core.distributed import torch_fully_sharded_data_parallel
    from torch.distributed.fsdp import fully_shard

    group = torch.distributed.group.WORLD
    with platform.unpatched("FSDP2_MESH"), pytest.raises((RuntimeError, AssertionError, TypeError)):
        fully_shard(torch.nn.Linear(2, 2), mesh=torch_fully_sharded_data_parallel.DeviceMesh.from_group(group, "cuda"))
    mesh = torch_fully_sharded_data_parallel.DeviceMesh.from_group(group, "cuda")
    assert mesh.device_type == "cpu"
    layer = fully_shard(torch.nn.Linear(2, 2), mesh=mesh)
    assert layer(torch.ones(1, 2)).shape == (1, 2)
