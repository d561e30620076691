"""CPU compatibility shim for megatron-core 0.16.1.

megatron-core assumes CUDA in a handful of places. Development and CI machines have no GPU, so when CUDA is
absent (and only then) :func:`apply_cpu_compat` patches exactly these points, all in this one module:

* ``CUDA_RNG``: the model-parallel RNG tracker keeps CUDA generator states. Replaced by a tracker that keeps CPU
  generator states (same fork semantics, so dropout in tensor-parallel regions and activation recomputation
  stay reproducible).
* ``CURRENT_DEVICE``: ``torch.cuda.current_device()`` is used as a ``device=`` argument everywhere; it returns
  the CPU device.
* ``SYNCHRONIZE``: ``torch.cuda.synchronize()`` is called by the dist-checkpoint save path; a no-op.
* ``CUDA_FACTORIES``: modules that create tensors with a literal ``device="cuda"`` (default causal mask, pipeline
  schedules, dist-checkpoint saver and exchange, optimizers, grad clipping, grad buffers, utils) see a ``torch``
  whose tensor factories map ``"cuda"`` to ``"cpu"``.
* ``TENSOR_CUDA``: ``Tensor.cuda()`` (dist-checkpoint exchange, distributed optimizer) returns the tensor itself.
* ``PARAM_TYPE``: the (distributed) optimizer accepts parameters, and gradient clipping gradients, by their
  ``type()`` string, which must be ``torch.cuda.*Tensor``; while the optimizer builds its parameter groups and
  while gradients are clipped, CPU tensors report the CUDA name.
* ``FSDP2_MESH``: megatron-core's ``TorchFullyShardedDataParallel`` builds its device mesh with the literal device
  type ``"cuda"`` (``DeviceMesh.from_group(group, "cuda")``); FSDP2 then places the shards there. It gets a
  ``DeviceMesh`` whose ``from_group`` builds a CPU mesh (FSDP2 itself runs on CPU with gloo).

Each patch has a test in ``tests/unit/test_cpu_compat.py`` that fails if the patch stops working or stops being
needed (the unpatched behaviour is checked to still fail).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from typing import Any, Dict, Iterator, List

import torch

logger = logging.getLogger(__name__)

# Modules of megatron-core that build tensors with a literal device "cuda".
CUDA_FACTORY_MODULES: List[str] = [
    "megatron.core.transformer.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
    "megatron.core.tensor_parallel.data",
]

_FACTORY_NAMES = (
    "tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like", "full_like",
    "rand", "randn",
)

_APPLIED: Dict[str, bool] = {}

# The unpatched callables, kept so tests can show each patch is still needed.
ORIGINALS: Dict[str, Any] = {
    "cuda_get_rng_state": torch.cuda.get_rng_state,
    "cuda_current_device": torch.cuda.current_device,
    "cuda_synchronize": torch.cuda.synchronize,
    "tensor_cuda": torch.Tensor.cuda,
    "tensor_type": torch.Tensor.type,
}


def cuda_available() -> bool:
    """Whether a usable CUDA device exists (the shim is applied only when it does not)."""
    return torch.cuda.is_available()


def _to_cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    return device


class _CpuFactoryTorch:
    """A stand-in for the ``torch`` module inside one megatron-core module: tensor factories asked for a CUDA
    device build the tensor on the CPU; every other attribute is torch's own."""

    def __init__(self) -> None:
        self._wrapped = {name: self._wrap(getattr(torch, name)) for name in _FACTORY_NAMES}

    @staticmethod
    def _wrap(factory):
        @functools.wraps(factory)
        def cpu_factory(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            return factory(*args, **kwargs)

        return cpu_factory

    def __getattr__(self, name: str) -> Any:
        wrapped = self.__dict__.get("_wrapped", {})
        if name in wrapped:
            return wrapped[name]
        return getattr(torch, name)


class CpuRNGStatesTracker:
    """Drop-in for megatron-core's ``CudaRNGStatesTracker`` that keeps CPU generator states.

    ``fork(name)`` swaps the global CPU generator to the named state, runs the body, stores the advanced state
    and restores the previous one: the same contract as the CUDA tracker.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: Dict[str, torch.Tensor] = {}
        self.seeds_ = set()

    def get_states(self) -> Dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    def initialize_rng_tracker(*args: Any, force_reset: bool = False, **kwargs: Any) -> None:
        if mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED and not force_reset:
            return
        mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.initialize_rng_tracker = initialize_rng_tracker
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    initialize_rng_tracker(force_reset=True)


def _patch_device_queries() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]


def _patch_factory_modules() -> None:
    proxy = _CpuFactoryTorch()
    for name in CUDA_FACTORY_MODULES:
        module = importlib.import_module(name)
        module.torch = proxy


def _patch_tensor_cuda() -> None:
    def cuda_on_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    torch.Tensor.cuda = cuda_on_cpu  # type: ignore[assignment]


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    """While active, CPU tensors answer ``type()`` with the name of their CUDA counterpart."""
    original = torch.Tensor.type

    def cuda_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if not args and not kwargs and isinstance(result, str) and result.startswith("torch.") and not self.is_cuda:
            return result.replace("torch.", "torch.cuda.", 1)
        return result

    torch.Tensor.type = cuda_type  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[assignment]


def _patch_param_type_checks() -> None:
    from megatron.core.optimizer import distrib_optimizer, optimizer

    def with_cuda_type_names(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with _cuda_type_names():
                return fn(*args, **kwargs)

        return wrapper

    dist_cls = distrib_optimizer.DistributedOptimizer
    dist_cls._build_model_and_main_param_groups = staticmethod(
        with_cuda_type_names(dist_cls._build_model_and_main_param_groups)
    )
    fp16_cls = optimizer.Float16OptimizerWithFloat16Params
    fp16_cls.__init__ = with_cuda_type_names(fp16_cls.__init__)
    from megatron.core.optimizer import clip_grads

    optimizer.clip_grad_by_total_norm_fp32 = with_cuda_type_names(optimizer.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)


class CpuDeviceMesh:
    """What ``torch_fully_sharded_data_parallel`` sees as ``DeviceMesh``: ``from_group`` builds a CPU mesh."""

    @staticmethod
    def from_group(group: Any, device_type: str, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.device_mesh import DeviceMesh

        return DeviceMesh.from_group(group, "cpu" if device_type == "cuda" else device_type, *args, **kwargs)


def _patch_fsdp2_mesh() -> None:
    from megatron.core.distributed import torch_fully_sharded_data_parallel

    torch_fully_sharded_data_parallel.DeviceMesh = CpuDeviceMesh


PATCHES = {
    "CUDA_RNG": _patch_rng,
    "CURRENT_DEVICE": _patch_device_queries,
    "CUDA_FACTORIES": _patch_factory_modules,
    "TENSOR_CUDA": _patch_tensor_cuda,
    "PARAM_TYPE": _patch_param_type_checks,
    "FSDP2_MESH": _patch_fsdp2_mesh,
}


def apply_cpu_compat(force: bool = False) -> bool:
    """Apply every CPU patch once, if CUDA is absent (or ``force``).

    Returns:
        True when the shim is (now) active.
    """
    if cuda_available() and not force:
        return False
    for name, patch in PATCHES.items():
        if not _APPLIED.get(name):
            patch()
            _APPLIED[name] = True
    if not _APPLIED.get("_logged"):
        logger.info("no CUDA device: megatron-core CPU compatibility patches applied (%s)", ", ".join(PATCHES))
        _APPLIED["_logged"] = True
    return True


def cpu_compat_active() -> bool:
    """Whether :func:`apply_cpu_compat` has patched this process."""
    return all(_APPLIED.get(name) for name in PATCHES)
