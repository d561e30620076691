"""Distributed start-up (process groups, megatron-core parallel state) and RNG streams; the CPU patches are applied
by :func:`megatron_puffin.platform.setup`."""
from megatron_puffin.distributed.cpu_compat import cuda_available
from megatron_puffin.distributed.initialize import DistributedContext, destroy, find_free_port, initialize
from megatron_puffin.distributed.process_groups import process_groups
from megatron_puffin.distributed.random import derive_seed, make_generator, seed_everything

__all__ = [
    "DistributedContext",
    "cuda_available",
    "derive_seed",
    "destroy",
    "find_free_port",
    "initialize",
    "make_generator",
    "process_groups",
    "seed_everything",
]
