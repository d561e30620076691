"""The one multi-process helper of the test suite.

``run_distributed(worker, world_size, *args)`` spawns ``world_size`` gloo ranks on a free loopback port, runs
``worker(*args)`` in each with torchrun's environment variables set (so ``megatron_puffin.distributed.initialize``
works unchanged; each rank first calls ``megatron_puffin.platform.setup()``, as every entry point does), gathers
each rank's return value (tensors must be CPU; keep them small), always tears the process group down, and re-raises
the first rank's exception with its traceback.

Spawning costs ~6 s per group on 2 cores: a worker should run several checks (``initialize`` can be called again
with other TP/PP sizes inside the same processes) and return all their results together.
"""
from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import traceback
from typing import Any, Callable, List

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(worker: Callable, rank: int, world_size: int, port: int, results: Any, args: tuple, kwargs: dict) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": "1",
        }
    )
    import torch

    torch.set_num_threads(1)
    try:
        from megatron_puffin.platform import setup

        setup()  # a spawned rank is a new interpreter: megatron-core's patches are applied here, as at any start-up
        value = worker(*args, **kwargs)
        # Tensors put on a multiprocessing queue travel as shared-memory file descriptors that the parent must
        # fetch from this process while it is still alive; a rank that finishes first and exits makes the
        # parent's unpickling fail (FileNotFoundError on the resource-sharer socket, seen in CI). Plain bytes
        # carry no such reference.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron_puffin.distributed import destroy

            destroy()
        except Exception:  # noqa: BLE001 - teardown must not hide the worker's result
            pass


def run_distributed(worker: Callable, world_size: int, *args: Any, timeout: float = 600, **kwargs: Any) -> List[Any]:
    """Run ``worker(*args, **kwargs)`` on ``world_size`` gloo ranks; return the per-rank results by rank."""
    # Children read these at interpreter start: keep their logs to what the test is about.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning")
    # The CPU-parity tests run the gloo/CPU path even on a GPU machine (several ranks cannot share one GPU with
    # NCCL); GPU paths are tested under tests/gpu.
    saved_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(worker, rank, world_size, port, results, args, kwargs), daemon=False)
        for rank in range(world_size)
    ]
    try:
        for proc in procs:
            proc.start()
    finally:  # only the children must not see the GPUs
        if saved_visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved_visible
    gathered: dict = {}
    errors: List[str] = []
    try:
        while len(gathered) + len(errors) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue_module.Empty:
                dead = [p.pid for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                raise TimeoutError(f"distributed test timed out after {timeout}s (crashed pids: {dead})")
            if ok:
                gathered[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
                break
    finally:
        for proc in procs:
            proc.join(timeout=5 if errors else 60)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if errors:
        raise RuntimeError("a distributed worker failed:\n" + "\n".join(errors))
    return [gathered[rank] for rank in range(world_size)]
