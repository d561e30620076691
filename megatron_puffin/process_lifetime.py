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
    """In a process a rank started with the stop signals blocked: ignore them, unblock them, and ask for SIGKILL
    when ``parent`` (the rank) exits."""
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


def ignore_ctrl_c() -> None:
    """``initializer`` of :func:`worker_pool`'s workers (started with SIGINT blocked): ignore it, then unblock it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def worker_pool(workers: int):
    """A ``multiprocessing`` pool (fork where the platform has it, else spawn) for the tools, whose workers ignore
    Ctrl-C.

    A terminal's Ctrl-C reaches the whole foreground process group: every worker printed its own
    ``KeyboardInterrupt`` traceback, while the tool's main process is the one that handles it and ends the pool
    (``Pool.__exit__`` terminates the workers with SIGTERM). The pool is created with SIGINT blocked: a Ctrl-C during
    a fork would otherwise kill a worker before its initializer ran, or be swallowed in the main process (Python
    ignores exceptions raised in its at-fork callbacks), and the tool ran on; it is delivered when the block is
    lifted. The pool's threads keep the block, so workers it starts later are protected the same way.
    """
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
    try:
        return context.Pool(workers, initializer=ignore_ctrl_c)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
    :data:`EXIT_CTRL_C`, instead of a traceback.

    Args:
        prog: The tool's name, first on the line.
        main: The tool's main function; its return value is the exit status.
        kept: What an interrupted run leaves and how to go on (each tool's own recovery).
    """
    try:
        return main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C); {kept}", file=sys.stderr)
        return EXIT_CTRL_C
