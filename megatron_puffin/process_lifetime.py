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
from typing import Callable, Iterator, NoReturn, Optional

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
EXIT_INTERRUPTED = 75
"""Exit status of a training run a stop signal ended after saving (EX_TEMPFAIL: requeue and ``--load`` to
continue)."""

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


def _swallow(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    """The handler of a stop signal once the tool is stopping: a later one does nothing. A Python function, not
    ``SIG_IGN``: a signal that arrived while the first was being handled would otherwise make Python print "Signal 15
    ignored due to race condition" under the one-line message."""


def _stopping() -> None:
    """A stop signal is being acted on: a later one (Ctrl-C pressed twice, a scheduler's kill-after) neither cuts
    the tool's clean-up (``finally`` blocks removing temporary or half-written files) nor its one-line exit short."""
    for sig in (signal.SIGINT,) + TOOL_STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _swallow)


def _raise_stopped(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    _stopping()
    raise Stopped(signum)


def _raise_interrupted(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    _stopping()
    raise KeyboardInterrupt


_starting_prog = ""
"""The tool named by :func:`exit_quietly_while_starting`, first on its one line."""


def _exit_while_starting(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    os.write(2, f"{_starting_prog}: {what} while starting; nothing was written\n".encode())
    os._exit(128 + int(signum))


def exit_quietly_while_starting(module_name: str, prog: str) -> None:
    """A command-line tool's first step, before it imports its libraries (torch, megatron-core: seconds): until
    :func:`exit_on_ctrl_c` takes over, Ctrl-C, SIGTERM and SIGHUP end the process at once with one line and exit
    status 128 + the signal. Ctrl-C there was a ``KeyboardInterrupt`` traceback from deep inside an import, SIGTERM
    and SIGHUP a silent end. The tool has written nothing yet, so there is nothing to clean up. A signal the process
    ignores (``nohup``'s SIGHUP) stays ignored.

    Args:
        module_name: The caller's ``__name__``. Only a tool run as a program (``"__main__"``) gets the handler: it
            ends the whole process, so a tool module imported by other code (the tests, a notebook) installs nothing.
        prog: The tool's name, first on the line.
    """
    global _starting_prog
    if module_name != "__main__":
        return
    _starting_prog = prog
    for sig in (signal.SIGINT,) + TOOL_STOP_SIGNALS:
        if signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL):
            signal.signal(sig, _exit_while_starting)


def startup_finished() -> None:
    """Give Python's own handlers back where :func:`exit_quietly_while_starting`'s are still installed: for a program
    whose own stop handling is not a :func:`stop_signals_interrupt` block (``pretrain_puffin.py``: its main catches
    ``KeyboardInterrupt`` while it builds, and the training loop installs its own handler)."""
    for sig in (signal.SIGINT,) + TOOL_STOP_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is _exit_while_starting:
            signal.signal(sig, _python_default(sig, handler))


def _python_default(sig: int, handler):
    """``handler``, or Python's own default where it is the start-up handler (which must not outlive the start)."""
    if handler is not _exit_while_starting:
        return handler
    return signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Stopped` in the main thread (where they would otherwise
    end the process at once, with no word about what was kept), and Ctrl-C raises ``KeyboardInterrupt`` as Python's
    own handler does; after the first of them, every later one is swallowed. A signal the process ignores
    (``nohup``'s SIGHUP, SIGINT of a background job) stays ignored; the previous handlers come back afterwards."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: _python_default(sig, signal.getsignal(sig)) for sig in (signal.SIGINT,) + TOOL_STOP_SIGNALS}
    for sig, handler in previous.items():
        if sig == signal.SIGINT:
            if handler is signal.default_int_handler:
                signal.signal(sig, _raise_interrupted)
        elif handler == signal.SIG_DFL:
            signal.signal(sig, _raise_stopped)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class WorkerLost(RuntimeError):
    """A process of a tool's :func:`worker_pool` died while it held work (the out-of-memory killer, ``kill -9``)."""


class _DeferredStop:
    """While a tool's worker pool runs, Ctrl-C, SIGTERM and SIGHUP are recorded by their handler and acted on by
    :meth:`check`, which the pool calls in the main thread between waits.

    The action is the one the tool had installed (``KeyboardInterrupt``, :class:`Stopped`, the default exit), taken
    once: the first signal decides, and a second one (a terminal's Ctrl-C pressed twice, a scheduler's kill-after)
    neither raises again while the pool kills its workers nor cuts the tool's one-line exit short.
    """

    SIGNALS = (signal.SIGINT,) + TOOL_STOP_SIGNALS

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.acted = False
        self.previous = {}

    def _record(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.signum is None:  # the first one decides; a second one does not cut the stop short
            self.signum = signum

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread runs signal handlers; a pool in another thread keeps the process's own
        for sig in self.SIGNALS:
            handler = signal.getsignal(sig)
            if handler not in (signal.SIG_IGN, None, _swallow):  # a signal started ignored (nohup) stays ignored
                self.previous[sig] = handler
                signal.signal(sig, self._record)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            if signal.getsignal(sig) == self._record:
                signal.signal(sig, _swallow if self.acted else handler)  # the tool is ending after a stop: swallow

    def check(self) -> None:
        """Act on a recorded signal, once: call the handler the tool had (it raises), or take the default action."""
        if self.signum is None or self.acted:
            return
        self.acted = True
        handler = self.previous[self.signum]
        if callable(handler):
            handler(self.signum, None)
        else:  # SIG_DFL: the process ends as the signal's default action ends it
            signal.signal(self.signum, signal.SIG_DFL)
            signal.raise_signal(self.signum)


class ToolPool:
    """The workers of :func:`worker_pool`: :meth:`imap` maps a function over tasks on them, in order.

    Each worker has a pipe of its own to the main process and shares no queue or lock with the others, so a worker
    that dies (killed by the out-of-memory killer, halfway through sending a result) leaves nothing locked or half
    read behind: its pipe reaches its end and the main process knows at once.
    """

    POLL_S = 0.1
    """How often the main thread, waiting for a result, looks at a recorded stop signal."""

    def __init__(self, context, workers: int, stop: _DeferredStop) -> None:
        self._context, self._size, self._stop = context, workers, stop
        self._workers = []  # (process, the main process's end of its pipe)
        self._idle = True  # no worker holds a task or an unread result

    def _start(self) -> None:
        with stop_signals_blocked():  # a signal during a fork neither kills a worker early nor is lost
            for _ in range(self._size):
                ours, theirs = self._context.Pipe()
                process = self._context.Process(target=_serve, args=(theirs, os.getpid()), daemon=True)
                process.start()
                theirs.close()  # the worker holds the only other end: its death ends the pipe
                self._workers.append((process, ours))

    def imap(self, function: Callable, tasks) -> Iterator:
        """``function(task)`` for each task, computed by the workers and yielded in the order of ``tasks``; at most
        two tasks per worker are handed out or held ahead of the one the caller waits for (memory stays bounded
        however slowly the caller consumes). Tasks are small (a pipe's buffer holds two); results may be large.

        Raises:
            WorkerLost: A worker died (killed by the out-of-memory killer or a signal).
            KeyboardInterrupt, Stopped: After Ctrl-C / SIGTERM / SIGHUP, where the tool had those handlers.
            Exception: The exception ``function`` raised in a worker, with the worker's traceback as its cause.
        """
        from collections import deque
        from multiprocessing.connection import wait

        if not self._workers:
            self._start()
        self._idle = False
        held = [deque() for _ in self._workers]  # per worker: the indices of the tasks it holds, in order
        done, tasks, handed, wanted, exhausted = {}, iter(tasks), 0, 0, False
        while True:
            while not exhausted and handed < wanted + 2 * self._size:
                task = next(tasks, _NO_TASK)
                exhausted = task is _NO_TASK
                if not exhausted:
                    worker = min(range(len(held)), key=lambda w: len(held[w]))
                    try:
                        self._workers[worker][1].send((function, task))
                    except OSError:  # its end of the pipe is closed: it died
                        raise WorkerLost(_WORKER_LOST) from None
                    held[worker].append(handed)
                    handed += 1
            if wanted in done:
                self._stop.check()
                yield done.pop(wanted)
                wanted += 1
                continue
            if exhausted and wanted == handed:
                self._idle = True
                return
            busy = {self._workers[w][1]: w for w in range(len(held)) if held[w]}
            ready = wait(list(busy) + [process.sentinel for process, _ in self._workers], timeout=self.POLL_S)
            self._stop.check()
            for connection in (r for r in ready if r in busy):
                try:
                    ok, value = connection.recv()
                except (EOFError, OSError):
                    raise WorkerLost(_WORKER_LOST) from None
                if not ok:
                    error, remote_traceback = value
                    raise error from _RemoteTraceback(remote_traceback)
                done[held[busy[connection]].popleft()] = value
            if any(not process.is_alive() for process, _ in self._workers):
                raise WorkerLost(_WORKER_LOST)

    def close(self, finished: bool) -> None:
        """End the workers: a finished pool's are asked to exit; after an error, a stop or a consumer that left
        early they are killed (each one computes in a process of its own and shares nothing, so no state is lost or
        left locked)."""
        finished = finished and self._idle
        for process, connection in self._workers:
            if finished:
                try:
                    connection.send(None)
                except OSError:
                    pass
            connection.close()
        for process, _ in self._workers:
            process.join(timeout=10 if finished else 0)
            if process.is_alive():
                process.kill()
                process.join()
        self._workers = []


_NO_TASK = object()
_WORKER_LOST = "a worker process died while it held work (killed by the out-of-memory killer or a signal)"


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a pool worker, shown as its cause."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


def _serve(connection, parent: int) -> None:
    """A :func:`worker_pool` worker: run ``(function, task)`` messages until a ``None`` (or the main process's end
    of the pipe closing), sending back ``(True, result)`` or ``(False, (exception, traceback text))``."""
    import traceback

    ignore_stop_signals_and_die_with(parent)
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        function, task = message
        try:
            reply = (True, function(task))
        except Exception as error:  # noqa: BLE001 - sent to the main process, which raises it
            reply = (False, (error, traceback.format_exc()))
        try:
            connection.send(reply)
        except (EOFError, OSError):
            return
        except Exception as error:  # noqa: BLE001 - a result or an exception that does not pickle
            connection.send((False, (RuntimeError(f"a pool worker's reply does not pickle: {error!r}"),
                                     traceback.format_exc())))


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ToolPool]:
    """A process pool for the tools (fork where the platform has it, else spawn), whose workers leave Ctrl-C,
    SIGTERM and SIGHUP to the tool's main process, which ends them.

    Those signals reach the whole job (a terminal's foreground process group, ``kill`` of the group, a scheduler).
    On Ctrl-C every worker printed its own ``KeyboardInterrupt`` traceback, and a stock ``multiprocessing`` pool
    (or ``concurrent.futures``' process pool) could hang forever: its workers share one result queue, and a worker
    killed while it sent a result (a chunk of images is larger than a pipe's buffer) leaves that queue's lock taken
    and half a message that the pool's result thread waits to finish. So:

    - each worker has a pipe of its own (:class:`ToolPool`): a dead worker is :class:`WorkerLost` at once, and
      killing the workers at a stop is safe;
    - the workers ignore the stop signals and die with the tool (:func:`ignore_stop_signals_and_die_with`, as the
      training's DataLoader workers do); they are created with the signals blocked (:func:`stop_signals_blocked`),
      so a signal during a fork neither kills a worker before it ignores the signal nor is lost;
    - the tool's main thread acts on the first stop signal between waits and swallows later ones until it has
      ended (:class:`_DeferredStop`).
    """
    stop = _DeferredStop()
    stop.install()
    pool = ToolPool(multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                                else "spawn"), workers, stop)
    finished = False
    try:
        yield pool
        finished = True
    finally:
        pool.close(finished)
        stop.uninstall()
    stop.check()  # a signal recorded after the last wait acts now


def one_process_problem(prog: str) -> Optional[str]:
    """The one-line error for a tool that must run as one process but was launched as several (torchrun sets
    ``WORLD_SIZE``): each copy would write the same outputs, racing on every file. None when launched alone."""
    world_size = os.environ.get("WORLD_SIZE", "1")
    if world_size.strip() in ("", "1"):
        return None
    return (f"{prog} runs as one process (its --workers spread the work over the CPU cores); launch it with python, "
            f"not torchrun (this launch has WORLD_SIZE={world_size}, and every copy would write the same files)")


_a_tool_was_stopped = False
"""Whether :func:`exit_on_ctrl_c` has acted on a stop signal in this process (read by :func:`exit_process`)."""


def exit_on_ctrl_c(prog: str, main: Callable[[], int], kept: str) -> int:
    """Run a tool's ``main``; Ctrl-C (``KeyboardInterrupt``) becomes one line saying what was kept, and
    :data:`EXIT_CTRL_C`, instead of a traceback; SIGTERM / SIGHUP likewise (:class:`Stopped`, exit 128 + signal).

    Args:
        prog: The tool's name, first on the line.
        main: The tool's main function; its return value is the exit status.
        kept: What an interrupted run leaves and how to go on (each tool's own recovery).
    """
    global _a_tool_was_stopped
    try:
        # caught outside the block: a stop signal that lands while it ends (main has returned, the previous
        # handlers are not back yet; torchrun stopping the other copy of a tool launched twice did it) is the same
        # one line, not a traceback from the context manager's exit
        with stop_signals_interrupt():
            return main()
    except KeyboardInterrupt:
        _a_tool_was_stopped = True
        print(f"{prog}: interrupted (Ctrl-C); {kept}", file=sys.stderr)
        return EXIT_CTRL_C
    except Stopped as stop:
        _a_tool_was_stopped = True
        print(f"{prog}: stopped by {stop.name}; {kept}", file=sys.stderr)
        return stop.exit_status


def exit_process(status: int, stopped: bool = False) -> NoReturn:
    """End a command-line program's process with ``status`` (its ``if __name__ == "__main__"`` line).

    After a stop signal was acted on (by :func:`exit_on_ctrl_c`, or ``stopped``: the training run saved and
    stopped), every later one (:data:`STOP_SIGNALS`) is swallowed until the process is gone. The interpreter's
    exit still runs clean-up (``atexit`` handlers, temporary folders, multiprocessing's helper processes), and a
    second Ctrl-C landing there raised ``KeyboardInterrupt`` inside it: "Exception ignored in atexit callback" and a
    traceback under the one line, the clean-up half done, and for training an exit status of "killed by SIGINT"
    instead of 75. :func:`exit_on_ctrl_c` and the training run restore the previous handlers themselves, since
    their code also runs inside other programs (a notebook, the tests)."""
    while stopped or _a_tool_was_stopped:
        try:
            # "ignore", which the interpreter's shutdown keeps (it resets Python handlers to the default action: a
            # signal landing after that ended the process by SIGINT); each change first runs the pending handlers
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
            break
        except (KeyboardInterrupt, Stopped):  # one landed before "ignore" was in place: again
            continue
    sys.exit(status)
