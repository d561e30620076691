"""Distributed start-up (process groups, megatron-core parallel state), RNG streams and the CPU shim."""
from megatron_puffin.distributed.cpu_compat import apply_cpu_compat, cpu_compat_active, cuda_available
from megatron_puffin.distributed.initialize import DistributedContext, destroy, find_free_port, initialize
from megatron_puffin.distributed.process_groups import process_groups
from megatron_puffin.distributed.random import derive_seed, make_generator, seed_everything

__all__ = [
    "DistributedContext",
    "apply_cpu_compat",
    "cpu_compat_active",
    "cuda_available",
    "derive_seed",
    "destroy",
    "find_free_port",
    "initialize",
    "make_generator",
    "process_groups",
    "seed_everything",
]
