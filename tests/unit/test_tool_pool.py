"""The tools' worker pool and exit (megatron_puffin/process_lifetime.py: worker_pool, exit_on_ctrl_c): results in
order, a stop that never hangs on a worker halfway through a large result, a dead worker as one exception (also one
killed while it sends a large result), a worker's exception raised with its traceback, Ctrl-C acted on between
waits, a stop signal as a tool ends, a second one during its exit clean-up.

Each case runs in its own interpreter with a time limit, so a hang fails the case instead of the suite."""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(body: str, timeout: float = 120) -> subprocess.CompletedProcess:
    script = "import os, signal, sys, time\nsys.path.insert(0, %r)\n" % str(ROOT) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)  # its own process group: the Ctrl-C case signals the group


def test_results_come_in_order_and_a_consumer_that_stops_early_ends_the_pool_at_once():
    """Each result (3 MB) is larger than a pipe's buffer, so a worker is usually halfway through sending one when the
    consumer stops: ``multiprocessing.Pool.terminate`` then waited forever for the queue lock that worker held
    (4 hangs in 45 tries with two busy cores beside it). 40 stops, each must end in well under a second (the
    slowest of 120 took 0.14 s)."""
    proc = _run("""
        from megatron_puffin.process_lifetime import worker_pool

        def work(i):
            time.sleep(0.001 * (i % 5))
            return i, b"x" * 3_000_000

        with worker_pool(2) as pool:
            assert [i for i, _ in pool.imap(work, range(12))] == list(range(12))
        slowest = 0.0
        for trial in range(40):
            started = time.perf_counter()
            try:
                with worker_pool(2) as pool:
                    for k, _ in pool.imap(work, range(50)):
                        if k == 3 + trial % 4:
                            time.sleep(0.002 * (trial % 5))
                            raise RuntimeError("stop")
            except RuntimeError:
                pass
            slowest = max(slowest, time.perf_counter() - started)
        print("slowest stop", round(slowest, 2))
        assert slowest < 10, slowest
    """, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_worker_killed_mid_task_or_mid_result_is_one_exception_and_the_pool_still_ends():
    """A worker killed (what the out-of-memory killer does) before it replies, and one killed by its sibling while
    it sends a 30 MB result: ``concurrent.futures``' pool waited forever for the rest of that message (2 hangs in
    about 40 tries of the preprocess test)."""
    proc = _run("""
        from megatron_puffin.process_lifetime import WorkerLost, worker_pool

        def work(i):
            if i == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return i

        def big(i):
            if i == 1:
                time.sleep(0.3)  # the other worker is halfway through sending task 2's result: the consumer sleeps
                for pid in open(f"/proc/{os.getppid()}/task/{os.getppid()}/children").read().split():
                    if int(pid) != os.getpid():
                        os.kill(int(pid), signal.SIGKILL)
            return b"x" * 30_000_000

        for function in (work, big):
            try:
                with worker_pool(2) as pool:
                    for _ in pool.imap(function, range(20)):
                        time.sleep(0.5)  # a slow consumer: results wait in the pipes
            except WorkerLost as error:
                print("lost:", error)
            else:
                raise AssertionError(f"no WorkerLost from {function.__name__}")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("lost: a worker process died while it held work")
                                   for line in lines), proc.stdout


def test_an_exception_in_a_worker_is_raised_in_the_tool_with_the_workers_traceback():
    proc = _run("""
        from megatron_puffin.process_lifetime import worker_pool

        def work(i):
            if i == 3:
                raise ValueError(f"bad task {i}")
            return i

        try:
            with worker_pool(2) as pool:
                list(pool.imap(work, range(10)))
        except ValueError as error:
            print(error, "|", "in work" in str(error.__cause__), "|", "bad task 3" in str(error.__cause__))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "bad task 3 | True | True", proc.stdout


def test_ctrl_c_is_raised_between_waits_and_the_workers_ignore_it():
    """SIGINT to the main process while it waits for a slow task: KeyboardInterrupt from ``imap`` within a few polls,
    the pool ends without waiting for the tasks handed out (its workers are killed), and a second SIGINT meanwhile
    is swallowed."""
    proc = _run("""
        from megatron_puffin.process_lifetime import worker_pool

        def work(i):
            time.sleep(0.5)
            return i

        started = time.perf_counter()
        try:
            with worker_pool(2) as pool:
                for i in pool.imap(work, range(100)):
                    if i == 1:
                        os.killpg(os.getpgid(0), signal.SIGINT)  # the terminal's Ctrl-C: the whole group
                        os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            print(f"interrupted after {time.perf_counter() - started:.1f} s")
        else:
            raise AssertionError("ran to the end")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seconds = float(proc.stdout.split()[2])
    assert seconds < 10, proc.stdout  # 100 tasks would take 25 s
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_a_stop_signal_landing_as_a_tool_ends_is_its_one_line_not_a_traceback():
    """A tool launched twice under torchrun: one copy says it must run alone and returns; torchrun then SIGTERMs the
    other, which may be between its main's return and the restoring of its signal handlers (1 CI run hit it and
    printed the ``Stopped`` traceback). Here the SIGTERM is sent at exactly that point, through the real handlers:
    the tool still ends with its one line and 128 + 15."""
    proc = _run("""
        import contextlib
        from megatron_puffin import process_lifetime

        real = process_lifetime.stop_signals_interrupt

        @contextlib.contextmanager
        def signalled_as_the_block_ends():
            with real():
                yield
                os.kill(os.getpid(), signal.SIGTERM)  # main has returned; the handlers are still the tool's
                time.sleep(2)  # the handler runs here
                raise AssertionError("the SIGTERM was not handled")

        process_lifetime.stop_signals_interrupt = signalled_as_the_block_ends
        print("status", process_lifetime.exit_on_ctrl_c("tool.py", lambda: 2, "nothing was written"))
    """)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.strip() == "status 143", proc.stdout
    assert proc.stderr.strip() == "tool.py: stopped by SIGTERM; nothing was written", proc.stderr


_SECOND_SIGNAL_IN_ATEXIT = """
    import atexit
    from megatron_puffin.process_lifetime import exit_on_ctrl_c, exit_process

    def clean_up():  # what the interpreter's exit runs after the tool's one line (temporary data, log handlers)
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C, or a scheduler's kill-after, lands in it
        time.sleep(1)  # the handler runs here
        print("clean-up finished", signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)

    def main():
        atexit.register(clean_up)
        if STOP:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2)
            raise AssertionError("the SIGTERM was not handled")
        return 0

    exit_process(exit_on_ctrl_c("tool.py", main, "nothing was written"))
"""


def test_a_second_stop_signal_during_a_stopped_tools_exit_clean_up_is_swallowed():
    """A tool stopped by SIGTERM prints its one line, then the interpreter's exit runs the ``atexit`` clean-up; a
    second signal landing there raised ``KeyboardInterrupt`` inside it ("Exception ignored in atexit callback" and a
    traceback under the one line) and cut the clean-up short. Now it is swallowed and the clean-up finishes. A tool
    that was not stopped keeps Python's Ctrl-C through its exit: that Ctrl-C is a new interruption."""
    stopped = _run("STOP = True\n" + textwrap.dedent(_SECOND_SIGNAL_IN_ATEXIT))
    assert stopped.returncode == 143, (stopped.returncode, stopped.stderr[-3000:])
    assert stopped.stderr.strip() == "tool.py: stopped by SIGTERM; nothing was written", stopped.stderr
    assert stopped.stdout.strip() == "clean-up finished False", stopped.stdout
    finished = _run("STOP = False\n" + textwrap.dedent(_SECOND_SIGNAL_IN_ATEXIT))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "KeyboardInterrupt" in finished.stderr and "clean-up finished" not in finished.stdout, finished


_WHILE_STARTING = """
    from megatron_puffin import process_lifetime

    process_lifetime.exit_quietly_while_starting("__main__", "tool.py")
    if SIGNAL == "SIGHUP":
        print("ignored", signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, flush=True)
    if SIGNAL != "none":
        os.kill(os.getpid(), getattr(signal, SIGNAL))
        for _ in range(200):  # a library loading: the handler runs between its steps
            time.sleep(0.01)
        print("still running", flush=True)
    # the tool's own handling takes over, and hands Python's defaults back when it ends (never the start-up handler)
    status = process_lifetime.exit_on_ctrl_c("tool.py", lambda: 0, "nothing was written")
    print("status", status, signal.getsignal(signal.SIGINT) is signal.default_int_handler,
          signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, flush=True)
"""


def test_a_stop_signal_while_a_tool_is_still_starting_is_one_line_and_its_exit_status():
    """Before a tool's own handling starts (its libraries load for seconds), Ctrl-C was a ``KeyboardInterrupt``
    traceback from inside an import and SIGTERM a silent end: now one line and 128 + the signal. A SIGHUP the tool
    was started ignoring (``nohup``) stays ignored; once the tool's main has run, Python's defaults are back; a tool
    module imported by other code installs nothing."""
    for name, status in (("SIGINT", 130), ("SIGTERM", 143)):
        proc = _run(f"SIGNAL = {name!r}\n" + textwrap.dedent(_WHILE_STARTING))
        what = "interrupted (Ctrl-C)" if name == "SIGINT" else f"stopped by {name}"
        assert proc.returncode == status, (name, proc.returncode, proc.stderr[-3000:])
        assert proc.stderr == f"tool.py: {what} while starting; nothing was written\n", proc.stderr
        assert proc.stdout == "", proc.stdout
    proc = _run("SIGNAL = 'none'\n" + textwrap.dedent(_WHILE_STARTING))
    assert proc.returncode == 0 and proc.stdout.strip() == "status 0 True True", (proc.stdout, proc.stderr[-3000:])
    trainer = _run("""
        from megatron_puffin import process_lifetime

        process_lifetime.exit_quietly_while_starting("tools.understand", "understand.py")  # imported, not run
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        process_lifetime.exit_quietly_while_starting("__main__", "pretrain_puffin.py")
        process_lifetime.startup_finished()  # the trainer's own handling takes over from here
        print(signal.getsignal(signal.SIGINT) is signal.default_int_handler,
              signal.getsignal(signal.SIGHUP) == signal.SIG_DFL)
    """)
    assert trainer.returncode == 0 and trainer.stdout.strip() == "True True", (trainer.stdout, trainer.stderr[-3000:])
    nohup = _run("signal.signal(signal.SIGHUP, signal.SIG_IGN)\nSIGNAL = 'SIGHUP'\n" + textwrap.dedent(_WHILE_STARTING))
    assert nohup.returncode == 0, nohup.stderr[-3000:]
    assert nohup.stdout.split("\n")[:2] == ["ignored True", "still running"], nohup.stdout
