"""Seeding and derived random streams.

Model initialisation uses the run seed on every rank (tensor-parallel layers initialise the full master weight
on every rank and slice it, so TP ranks must agree). Inside tensor-parallel regions megatron-core's tracker
gives each TP rank its own stream (``seed + 2718 + tp_rank``). Training randomness (diffusion noise, timesteps,
CFG text dropout) comes from :func:`make_generator`: a pure function of (seed, purpose, iteration, DP rank), so it
is identical inside a TP/PP group, distinct across data-parallel ranks, and a resumed run repeats the
uninterrupted one.
"""
from __future__ import annotations

import hashlib
import random
import struct

import numpy as np
import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed derived from ``seed`` and any hashable keys (stable across processes and runs)."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
    return struct.unpack("<Q", digest[:8])[0] & ((1 << 63) - 1)


def seed_problems(flag: str, seed: int) -> list:
    """The flag-naming problem of a run seed torch cannot take (its generators are seeded with 64 bits; megatron-core
    adds small offsets, which the unsigned upper half of that range absorbs), or none."""
    if -(1 << 63) <= seed < (1 << 63):
        return []
    return [f"{flag} ({seed}) must lie in [-2^63, 2^63): torch seeds its generators with 64 bits"]


def make_generator(seed: int, *keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` seeded from ``derive_seed(seed, *keys)``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, *keys))
    return generator


def seed_everything(seed: int, tp_rank: int = 0) -> None:
    """Seed python, numpy and torch for model initialisation, and megatron-core's model-parallel tracker.

    All ranks get the same default streams (so every rank builds the same master weights); the tracker's
    model-parallel stream differs per TP rank as megatron-core expects.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
