"""The one multi-process helper of the test suite.

``run_distributed(worker, world_size, *args)`` runs ``worker(*args)`` on ``world_size`` gloo ranks (loopback, a free
port per call) with torchrun's environment variables set (so ``megatron_puffin.distributed.initialize`` works
unchanged; each rank first calls ``megatron_puffin.platform.setup()``, as every entry point does), gathers
each rank's return value (tensors must be CPU; keep them small), always tears the process group down
(``megatron_puffin.distributed.destroy``), and re-raises the first rank's exception with its traceback.

The ranks are started once per world size and pytest process and then serve call after call: importing torch +
megatron-core costs ~6 s of CPU per interpreter, which every distributed test module used to pay again. They are
forked from multiprocessing's forkserver, which has imported the package once (the same server as the one-process
CLI runs of helpers/puffin.py, with the same preload), so a new group of ranks does not pay the imports again either
(spawned ranks paid them once per rank: 6 ranks, ~36 s of CPU, for tests/distributed).
A call that fails or times out kills its ranks (the next call starts fresh ones), so a broken collective never
leaks into the next test; :func:`close_pools` (called by tests/conftest.py when the suite leaves a folder of tests)
ends them. A worker should still run several checks (``initialize`` can be called again with other TP/PP sizes)
and return all their results together.
"""
from __future__ import annotations

import atexit
import gc
import io
import os
import queue as queue_module
import socket
import sys
import time
import traceback
from typing import Any, Callable, Dict, List

import torch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(rank: int, world_size: int, tasks: Any, results: Any) -> None:
    """A pooled rank: runs ``(port, sys.path, worker, args, kwargs)`` tasks until it gets ``None``."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    from megatron_puffin.platform import setup

    setup()  # the forkserver only imported the package: megatron-core's patches are applied here, as at any start-up
    while True:
        task = tasks.get()
        if task is None:
            return
        port, path, payload = task
        # test folders collected after the forkserver started
        sys.path[:0] = [entry for entry in path if entry not in sys.path]
        os.environ["MASTER_PORT"] = str(port)
        _run_task(rank, payload, results)
        gc.collect()


def _run_task(rank: int, payload: bytes, results: Any) -> None:
    try:
        worker, args, kwargs = torch.load(io.BytesIO(payload), weights_only=False)
        value = worker(*args, **kwargs)
        # Tensors put on a multiprocessing queue travel as shared-memory file descriptors that the parent must
        # fetch from this process while it still holds them (a FileNotFoundError on the resource-sharer socket was
        # seen in CI); plain bytes carry no such reference.
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


class _Pool:
    """``world_size`` ranks forked from the forkserver, each with its own task queue and one shared result queue."""

    def __init__(self, world_size: int) -> None:
        from helpers.puffin import CLI_ENV, _environ, forkserver_context

        # Kept from the spawned ranks (which read it at start-up): later subprocesses of the suite inherit it.
        os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning")
        ctx = forkserver_context()
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.procs = [ctx.Process(target=_serve, args=(rank, world_size, self.tasks[rank], self.results),
                                  daemon=False) for rank in range(world_size)]
        # The forkserver, if this starts it, runs in the CLI runs' environment, whoever starts it first: warnings
        # ignored (the ranks' logs stay with what the test is about) and the GPUs hidden (the CPU-parity tests run
        # the gloo/CPU path even on a GPU machine: several ranks cannot share one GPU with NCCL; GPU paths are
        # tested under tests/gpu).
        with _environ(CLI_ENV):
            for proc in self.procs:
                proc.start()

    def alive(self) -> bool:
        return all(proc.is_alive() for proc in self.procs)

    def close(self, kill: bool = False) -> None:
        if not kill:
            for tasks in self.tasks:
                tasks.put(None)
        for proc in self.procs:
            proc.join(timeout=5 if kill else 30)
            if proc.is_alive():
                proc.kill()
                proc.join()


_POOLS: Dict[int, _Pool] = {}


def close_pools() -> None:
    """End every pooled rank (the next :func:`run_distributed` spawns new ones)."""
    while _POOLS:
        _POOLS.popitem()[1].close()


atexit.register(close_pools)  # registered after multiprocessing's own exit hook, so it runs before that joins


def _pool(world_size: int) -> _Pool:
    pool = _POOLS.get(world_size)
    if pool is not None and not pool.alive():
        pool.close(kill=True)
        pool = None
    if pool is None:
        pool = _POOLS[world_size] = _Pool(world_size)
    return pool


def run_distributed(worker: Callable, world_size: int, *args: Any, timeout: float = 600, **kwargs: Any) -> List[Any]:
    """Run ``worker(*args, **kwargs)`` on ``world_size`` gloo ranks; return the per-rank results by rank."""
    pool = _pool(world_size)
    buffer = io.BytesIO()
    torch.save((worker, args, kwargs), buffer)  # the worker travels by reference (module and name)
    port = _free_port()
    for tasks in pool.tasks:
        tasks.put((port, list(sys.path), buffer.getvalue()))
    gathered: dict = {}
    errors: List[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(gathered) + len(errors) < world_size:
            try:
                rank, ok, value = pool.results.get(timeout=5)
            except queue_module.Empty:
                dead = [p.pid for p in pool.procs if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    raise TimeoutError(f"distributed test: no result after {timeout}s or a rank died "
                                       f"(dead pids: {dead})")
                continue
            if ok:
                gathered[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
                break
    except BaseException:
        _POOLS.pop(world_size, None)
        pool.close(kill=True)
        raise
    if errors:  # the other ranks may be waiting in a collective: these ranks serve no further call
        _POOLS.pop(world_size, None)
        pool.close(kill=True)
        raise RuntimeError("a distributed worker failed:\n" + "\n".join(errors))
    return [gathered[rank] for rank in range(world_size)]
