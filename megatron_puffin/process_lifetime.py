"""Signals and lifetime of the processes a rank starts: its DataLoader workers and the server of megatron-core's
checkpoint write-results queue (:mod:`megatron_puffin.training.save_queue`); and Ctrl-C in the command-line tools
(:func:`exit_on_ctrl_c`, :func:`worker_pool`).

torchrun (and Slurm) stop a run by signalling each rank's whole process group, and those processes are in that
group. A worker killed by SIGTERM makes the rank's DataLoader raise ("worker ... is killed by signal") before the
rank can save; a queue server killed by it makes the rank's interrupt checkpoint fail. So they ignore the stop
signals (the rank's main process acts on them at the next step boundary and shuts them down itself), and they die
with their rank (``PR_SET_PDEATHSIG``), so a rank killed with SIGKILL leaves nothing behind.

They are started with the stop signals blocked (:func:`stop_signals_blocked`; a forked or spawned child inherits
the mask), so a signal that arrives between the start and :func:`ignore_stop_signals_and_die_with` cannot kill
them; the rank receives it when the block is lifted.

This module imports nothing heavy: a spawned server process imports it to run its initializer.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
from typing import Callable, Iterator, Optional

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
"""Signals the training process handles (save and stop) and the processes it starts ignore: a scheduler's stop or
warning, Ctrl-C, and the terminal closing (SIGHUP; torchrun forwards it to every rank's process group)."""

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int, expected_parent: Optional[int] = None) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent exits (``prctl(PR_SET_PDEATHSIG)``).

    Args:
        sig: Signal to receive.
        expected_parent: The parent's pid at fork time; if the parent is already gone, ``sig`` is raised now.

    Returns:
        False where prctl is unavailable (not Linux); the caller then relies on the weaker fallbacks.
    """
    name = ctypes.util.find_library("c")
    if name is None or not hasattr(os, "getppid"):
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)  # the parent died before prctl took effect
    return True


def ignore_stop_signals_and_die_with(parent: Optional[int]) -> None:
    """In a process a rank (or a tool's :func:`worker_pool`) started with the stop signals blocked: ignore them,
    unblock them, and ask for SIGKILL when ``parent`` (the rank, the tool) exits."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    set_parent_death_signal(signal.SIGKILL, expected_parent=parent)


def worker_init(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """``worker_init_fn`` of every training DataLoader: ignore the stop signals, die with the rank."""
    ignore_stop_signals_and_die_with(_FORK_PARENT.get("pid"))


_FORK_PARENT = {}  # pid of the process that forks the workers (read in the child after fork)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals while DataLoader workers are forked or a helper process is spawned (the children
    inherit the mask and unblock it after installing SIG_IGN); signals that arrive meanwhile are delivered to this
    process afterwards."""
    _FORK_PARENT["pid"] = os.getpid()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def die_with_launcher() -> None:
    """Under torchrun, ask for SIGTERM when the launcher dies, so a launcher killed by a signal it does not handle
    (SIGUSR1 without ``--signals-to-handle``) leaves no orphaned rank: the rank saves and exits as on SIGTERM."""
    if "TORCHELASTIC_RUN_ID" in os.environ and set_parent_death_signal(signal.SIGTERM):
        logger.debug("SIGTERM on launcher exit (PR_SET_PDEATHSIG)")


# -- Ctrl-C in the command-line tools ----------------------------------------------------------------------------
EXIT_CTRL_C = 130
"""Exit status of a tool stopped by Ctrl-C (128 + SIGINT, what a shell reports for a command it interrupted)."""


TOOL_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
"""What a scheduler (``scancel``, a time limit, ``kill``) or a closed terminal sends a command-line tool; the tools
stop on them as on Ctrl-C (:func:`stop_signals_interrupt`)."""


class Stopped(BaseException):
    """A stop signal (:data:`TOOL_STOP_SIGNALS`) raised in a tool's main thread, like ``KeyboardInterrupt`` for
    SIGINT. ``exit_status`` is 128 + the signal number, what a shell reports for a command the signal ended."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.name, self.exit_status = signal.Signals(signum).name, 128 + int(signum)


def _raise_stopped(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    for sig in TOOL_STOP_SIGNALS:  # a second signal does not cut the one-line exit short
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Stopped` in the main thread (where they would otherwise
    end the process at once, with no word about what was kept). A signal the process ignores (``nohup``'s SIGHUP)
    stays ignored; the previous handlers come back afterwards."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in TOOL_STOP_SIGNALS}
    for sig, handler in previous.items():
        if handler == signal.SIG_DFL:
            signal.signal(sig, _raise_stopped)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class _ToolPool(multiprocessing.pool.Pool):
    """A pool whose ``terminate`` ends its workers with SIGKILL: they ignore the stop signals (see
    :func:`worker_pool`)."""

    @staticmethod
    def Process(ctx, *args, **kwds):  # noqa: N802 - multiprocessing.pool.Pool's factory name
        process = ctx.Process(*args, **kwds)
        process.terminate = process.kill
        return process


def worker_pool(workers: int):
    """A ``multiprocessing`` pool (fork where the platform has it, else spawn) for the tools, whose workers leave
    Ctrl-C, SIGTERM and SIGHUP to the tool's main process, which ends the pool.

    Those signals reach the whole job (a terminal's foreground process group, ``kill`` of the group, a scheduler).
    On Ctrl-C every worker printed its own ``KeyboardInterrupt`` traceback; a worker killed by the group's SIGTERM
    could die holding one of the pool's queue locks, and ``Pool.terminate`` then waited for that lock forever (the
    tool hung in 1 of 4 tries; a handler that let a late-running SIGTERM through once the pool was ending still
    hung in 2 of 12). So the workers ignore the stop signals and die with the tool
    (:func:`ignore_stop_signals_and_die_with`, as the training's DataLoader workers do), and the pool ends them
    with SIGKILL where a stock pool sends SIGTERM, after it has taken those locks (:class:`_ToolPool`). The pool is
    created with the signals blocked (:func:`stop_signals_blocked`): a Ctrl-C during a fork would otherwise kill a
    worker before its initializer ran, or be swallowed in the main process (Python ignores exceptions raised in its
    at-fork callbacks), and the tool ran on; it is delivered when the block is lifted. The pool's threads keep the
    block, so workers it starts later are protected the same way.
    """
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with stop_signals_blocked():
        return _ToolPool(workers, initializer=ignore_stop_signals_and_die_with, initargs=(os.getpid(),),
                         context=context)


def one_process_problem(prog: str) -> Optional[str]:
    """The one-line error for a tool that must run as one process but was launched as several (torchrun sets
    ``WORLD_SIZE``): each copy would write the same outputs, racing on every file. None when launched alone."""
    world_size = os.environ.get("WORLD_SIZE", "1")
    if world_size.strip() in ("", "1"):
        return None
    return (f"{prog} runs as one process (its --workers spread the work over the CPU cores); launch it with python, "
            f"not torchrun (this launch has WORLD_SIZE={world_size}, and every copy would write the same files)")


def exit_on_ctrl_c(prog: str, main: Callable[[], int], kept: str) -> int:
    """Run a tool's ``main``; Ctrl-C (``KeyboardInterrupt``) becomes one line saying what was kept, and
    :data:`EXIT_CTRL_C`, instead of a traceback; SIGTERM / SIGHUP likewise (:class:`Stopped`, exit 128 + signal).

    Args:
        prog: The tool's name, first on the line.
        main: The tool's main function; its return value is the exit status.
        kept: What an interrupted run leaves and how to go on (each tool's own recovery).
    """
    with stop_signals_interrupt():
        try:
            return main()
        except KeyboardInterrupt:
            print(f"{prog}: interrupted (Ctrl-C); {kept}", file=sys.stderr)
            return EXIT_CTRL_C
        except Stopped as stop:
            print(f"{prog}: stopped by {stop.name}; {kept}", file=sys.stderr)
            return stop.exit_status
