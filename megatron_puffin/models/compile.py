"""``--compile``: ``torch.compile`` applied per transformer layer / block of every tower (torchtitan's granularity).

Compiling one layer at a time (instead of the whole model) keeps compile time proportional to the number of
*distinct* layer shapes, keeps the Python control flow between layers (pipeline stages, recomputation, the
task-dependent forward of :class:`~megatron_puffin.models.puffin.PuffinModel`) in eager mode, and lets one compiled
graph serve every layer of a stack (parameters are graph inputs). Each layer is compiled **in place**
(``nn.Module.compile``), so parameter names, state dicts, DDP buckets and checkpoints are unchanged.

Layers compiled (:func:`compile_targets`): megatron-core ``TransformerLayer`` (the LLM's decoder layers, the RADIO
blocks, both connectors), the MMDiT's ``JointTransformerBlock``, and the frozen VAE encoder's down blocks and mid
block (diffusers). Frozen towers compile too: their forward is as expensive as a trainable one's.

Backends: inductor generates C++/OpenMP code on CPU (needs a C++ compiler) and Triton kernels on CUDA. Where
``torch.compile`` is unusable, :func:`check_compile_available` says why in one line; asking for ``--compile``
there is an error, never a silent eager run.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, List, Optional, Tuple

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class CompileConfig:
    """torch.compile of the towers' layers (a speed lever; numerics equal to eager within fp32 rounding)."""

    FLAG_PREFIX: ClassVar[str] = ""

    compile: bool = False
    """torch.compile every transformer layer/block of every tower (LLM, RADIO, connectors, MMDiT) and the frozen VAE
    encoder's blocks, one layer at a time (inductor: C++ on CPU, Triton on GPU). The first steps are slower while
    each distinct layer shape compiles."""
    compile_dynamic: bool = True
    """Compile with dynamic shapes (one graph for every sequence length; task micro-batches differ in length).
    --no-compile-dynamic specialises per shape: faster kernels, one recompilation per new length."""

    compile_backend: str = field(default="inductor", metadata={"choices": ["inductor", "aot_eager", "eager"]})
    """torch.compile backend: inductor (generated kernels, the speed-up); aot_eager / eager (graph capture without
    code generation: to tell a capture problem from a code-generation one)."""

    def validate(self) -> List[str]:
        if not self.compile and (self.compile_backend != "inductor" or not self.compile_dynamic):
            logger.warning("--compile-backend / --no-compile-dynamic have no effect without --compile")
        if self.compile and self.compile_backend == "inductor":
            problem = check_compile_available()
            if problem:
                return [f"--compile: {problem}"]
        return []


def check_compile_available(device_type: Optional[str] = None) -> Optional[str]:
    """None when ``torch.compile`` (inductor) can run here, else why not and the fix (one line)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile; install torch >= 2.1 or drop --compile"
    if device_type == "cpu":
        compiler = next((name for name in ("g++", "c++", "clang++") if shutil.which(name)), None)
        if compiler is None:
            return "inductor needs a C++ compiler on CPU and none (g++, c++, clang++) is on PATH; install one " \
                   "(e.g. apt-get install g++) or drop --compile"
    else:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "inductor needs triton on CUDA; pip install triton (torch's matching version) or drop --compile"
    return None


def _block_types() -> Tuple[type, ...]:
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_puffin.models.dit.joint_block import JointTransformerBlock

    types: List[type] = [TransformerLayer, JointTransformerBlock]
    try:
        from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D

        types += [DownEncoderBlock2D, UNetMidBlock2D]
    except ImportError:  # diffusers is a dependency; without it there is no VAE to compile either
        pass
    return tuple(types)


def compile_targets(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """(name, module) of every layer :func:`compile_model` compiles: the outermost modules of the block types,
    in the model and in its frozen VAE (held outside the module tree, see ``PuffinModel.vae``)."""
    types = _block_types()
    roots = [("", model)]
    vae = getattr(model, "vae", None)
    if vae is not None:
        roots.append(("vae.", vae.vae.encoder))
    for prefix, root in roots:
        skip: Optional[str] = None
        for name, module in root.named_modules():
            if skip is not None and name.startswith(skip):
                continue
            if isinstance(module, types):
                skip = name + "."
                yield prefix + name, module


RECOMPILE_LIMIT = 32
"""Graphs dynamo keeps per layer class. One class's ``forward`` is one code object, shared by every layer of that
class in every tower: megatron-core's ``TransformerLayer`` serves the LLM, RADIO and both connectors (three widths,
masked or not); the MMDiT joint block has masked / unmasked joint attention x the last block (no text-stream
output) x inductor's size-dependent kernel choice on CPU. Dynamo's default (8) was exceeded by the joint block at
real proportions, and every variant past it silently ran eager."""


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    if config.recompile_limit < RECOMPILE_LIMIT:
        logger.info("torch._dynamo recompile_limit %d -> %d (one code object per layer class, see "
                    "compile.RECOMPILE_LIMIT)", config.recompile_limit, RECOMPILE_LIMIT)
        config.recompile_limit = RECOMPILE_LIMIT


def compile_model(model: nn.Module, dynamic: bool = True, backend: str = "inductor") -> int:
    """Compile every layer of :func:`compile_targets` in place; returns how many were compiled.

    Raises:
        RuntimeError: where the inductor backend cannot run (see :func:`check_compile_available`).
    """
    device = next(model.parameters()).device.type
    problem = check_compile_available(device) if backend == "inductor" else None
    if problem:
        raise RuntimeError(f"--compile: {problem}")
    _raise_recompile_limit()
    count = 0
    for _, module in compile_targets(model):
        module.compile(dynamic=dynamic, backend=backend)
        count += 1
    logger.info("torch.compile (%s, %s, dynamic=%s) applied to %d layers", backend, device, dynamic, count)
    return count
