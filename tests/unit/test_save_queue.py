"""Patch SAVE_QUEUE_LIFETIME (megatron_puffin/training/save_queue.py): the process serving megatron-core's checkpoint
write-results queue survives the stop signals its rank's process group receives, and dies with its rank.

One child interpreter (the queue is a per-process global of megatron-core) gets the queue the way
``FileSystemWriterAsync.prepare_write_data`` does (``filesystem_async._get_write_results_queue()``), first with the
patch off, then on, and sends the queue's process SIGTERM each time; then the test SIGKILLs the child. The end-to-end
behaviour (a group-wide SIGTERM after a periodic save still writes the interrupt checkpoint; nothing outlives a
SIGKILLed rank) is tests/functional/test_signals.py.
"""
import json
import os
import signal
import subprocess
import sys
import time

from helpers.puffin import process_running as _alive

CHILD = r"""
import json, multiprocessing, os, signal, sys, time
from megatron_puffin.platform import setup, unpatched
setup()
from megatron.core.dist_checkpointing.strategies import filesystem_async

def queue_after_sigterm():
    before = {p.pid for p in multiprocessing.active_children()}
    queue = filesystem_async._get_write_results_queue()
    server = next(p for p in multiprocessing.active_children() if p.pid not in before)
    os.kill(server.pid, signal.SIGTERM)
    time.sleep(1.0)
    try:
        queue.put({"bucket": [1, 2]})
        answer = queue.get(timeout=10)
    except Exception as exc:  # the server is gone: BrokenPipeError, EOFError, ConnectionRefusedError
        answer = type(exc).__name__
    return server.pid, answer

with unpatched("SAVE_QUEUE_LIFETIME"):
    _, unpatched_answer = queue_after_sigterm()
filesystem_async._results_queue = None  # megatron-core's dead queue; the patched function starts its own
server, patched_answer = queue_after_sigterm()
print(json.dumps({"unpatched": unpatched_answer, "patched": patched_answer, "server": server}), flush=True)
sys.stdin.read()  # until the test kills this process
"""


def test_queue_process_ignores_stop_signals_and_dies_with_its_rank(tmp_path):
    # the SIGKILLed child cannot remove its multiprocessing folder (pymp-*): it goes under tmp_path, not /tmp
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", TMPDIR=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read()[-3000:]
        result = json.loads(line)
        # megatron-core's own queue process dies of the SIGTERM, and the queue with it: still needed.
        assert result["unpatched"] in ("BrokenPipeError", "EOFError", "ConnectionRefusedError",
                                       "ConnectionResetError"), result
        assert result["patched"] == {"bucket": [1, 2]}, result
        assert _alive(result["server"])
        child.kill()
        child.wait(timeout=30)
        deadline = time.time() + 30
        while _alive(result["server"]) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(result["server"]), "the queue's process outlived its SIGKILLed rank"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


FIRST_SPAWN = r"""
import json, multiprocessing, signal
from multiprocessing import resource_tracker, util
from megatron_puffin.platform import setup
from megatron_puffin.process_lifetime import STOP_SIGNALS
setup()
from megatron.core.dist_checkpointing.strategies import filesystem_async

spawned, spawn = [], util.spawnv_passfds
def recording_spawn(path, args, passfds):  # the signal mask each new process starts with (inherited over exec)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    spawned.append({"cmd": str(args[-1])[-80:], "unblocked": sorted(s.name for s in STOP_SIGNALS if s not in blocked)})
    return spawn(path, args, passfds)
util.spawnv_passfds = recording_spawn
tracker_was_running = resource_tracker._resource_tracker._fd is not None
filesystem_async._get_write_results_queue()
print(json.dumps({"tracker_was_running": tracker_was_running, "spawned": spawned}), flush=True)
"""


def test_the_first_spawn_of_a_process_starts_the_queue_process_with_the_stop_signals_blocked(tmp_path):
    # A run's first save is the first spawn of the rank: multiprocessing launches its resource tracker first, and
    # that launch unblocks SIGINT and SIGTERM when done. The queue's process must still start with every stop
    # signal blocked (it sets "ignore" before unblocking them), or the second signal of a double Ctrl-C kills it.
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", TMPDIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", FIRST_SPAWN], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["tracker_was_running"], report
    assert len(report["spawned"]) == 2, report  # the tracker, then the manager
    assert all(not spawn["unblocked"] for spawn in report["spawned"]), report
