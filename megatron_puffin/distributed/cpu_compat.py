"""The replacements behind the CPU patches of :mod:`megatron_puffin.platform` (megatron-core 0.16.1).

megatron-core assumes CUDA in a handful of places. Development and CI machines have no GPU, so when CUDA is absent
(and only then) :func:`megatron_puffin.platform.setup` replaces exactly the attributes named here, and nothing else:

* ``CUDA_RNG``: the model-parallel RNG tracker keeps CUDA generator states. Replaced by a tracker that keeps CPU
  generator states (same fork semantics, so dropout in tensor-parallel regions and activation recomputation
  stay reproducible).
* ``CURRENT_DEVICE``: ``torch.cuda.current_device()`` is used as a ``device=`` argument everywhere; it returns
  the CPU device.
* ``SYNCHRONIZE``: ``torch.cuda.synchronize()`` follows batched pipeline sends and receives; a no-op.
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

Each patch has a test in ``tests/unit/test_cpu_compat.py`` that calls the megatron-core function needing it with
the patch off (:func:`megatron_puffin.platform.unpatched`) and checks it still fails, so a patch that stops being
needed is noticed.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any, Callable, Dict, Iterator, List

import torch

from megatron_puffin.patching import Replacement

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


def cuda_available() -> bool:
    """Whether a usable CUDA device exists (the CPU patches are applied only when it does not)."""
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


def _rng() -> List[Replacement]:
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

    return [
        (mrandom, "_get_cuda_rng_state", get_state),
        (mrandom, "_set_cuda_rng_state", set_state),
        (mrandom, "initialize_rng_tracker", initialize_rng_tracker),
        (mrandom, "CudaRNGStatesTracker", CpuRNGStatesTracker),
        # a fresh tracker, as initialize_rng_tracker(force_reset=True) makes
        (mrandom, "_CUDA_RNG_STATE_TRACKER", CpuRNGStatesTracker()),
        (mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True),
    ]


def _current_device() -> List[Replacement]:
    return [(torch.cuda, "current_device", lambda: torch.device("cpu"))]


def _synchronize() -> List[Replacement]:
    return [(torch.cuda, "synchronize", lambda *args, **kwargs: None)]


def _factory_modules() -> List[Replacement]:
    proxy = _CpuFactoryTorch()
    return [(importlib.import_module(name), "torch", proxy) for name in CUDA_FACTORY_MODULES]


def _tensor_cuda() -> List[Replacement]:
    def cuda_on_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    return [(torch.Tensor, "cuda", cuda_on_cpu)]


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


def _with_cuda_type_names(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


def _param_type_checks() -> List[Replacement]:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    dist_cls = distrib_optimizer.DistributedOptimizer
    fp16_cls = optimizer.Float16OptimizerWithFloat16Params
    return [
        (dist_cls, "_build_model_and_main_param_groups",
         staticmethod(_with_cuda_type_names(dist_cls._build_model_and_main_param_groups))),
        (fp16_cls, "__init__", _with_cuda_type_names(fp16_cls.__init__)),
        (optimizer, "clip_grad_by_total_norm_fp32", _with_cuda_type_names(optimizer.clip_grad_by_total_norm_fp32)),
        (clip_grads, "clip_grad_by_total_norm_fp32", _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)),
    ]


class CpuDeviceMesh:
    """What ``torch_fully_sharded_data_parallel`` sees as ``DeviceMesh``: ``from_group`` builds a CPU mesh."""

    @staticmethod
    def from_group(group: Any, device_type: str, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.device_mesh import DeviceMesh

        return DeviceMesh.from_group(group, "cpu" if device_type == "cuda" else device_type, *args, **kwargs)


def _fsdp2_mesh() -> List[Replacement]:
    from megatron.core.distributed import torch_fully_sharded_data_parallel

    return [(torch_fully_sharded_data_parallel, "DeviceMesh", CpuDeviceMesh)]


# The builders megatron_puffin.platform's table names; each returns (owner, attribute, replacement) triples.
REPLACEMENTS: Dict[str, Callable[[], List[Replacement]]] = {
    "CUDA_RNG": _rng,
    "CURRENT_DEVICE": _current_device,
    "SYNCHRONIZE": _synchronize,
    "CUDA_FACTORIES": _factory_modules,
    "TENSOR_CUDA": _tensor_cuda,
    "PARAM_TYPE": _param_type_checks,
    "FSDP2_MESH": _fsdp2_mesh,
}
