"""The process behind megatron-core's checkpoint write-results queue, made to live exactly as long as its rank.

``dist_checkpointing.save`` hands each writer's results back through a queue served by a
``multiprocessing.Manager`` process that megatron-core starts (spawn context) at a rank's first save and keeps for
the rest of the run (``filesystem_async._get_write_results_queue``). That process is in the rank's process group
and installs no signal handling of its own, which broke two things:

* **A group-wide stop signal lost the interrupt checkpoint.** torchrun and Slurm stop a run by signalling each
  rank's whole process group. SIGTERM (or SIGUSR1) killed the queue's process along with the signal reaching the
  rank; the rank then saved its interrupt checkpoint as it should, and the save died with ``BrokenPipeError`` in
  ``write_preloaded_data_multiproc``, leaving ``iter_N.tmp`` and a traceback instead of a checkpoint. Every run that
  had saved once before being stopped was affected.
* **A rank killed with SIGKILL left the process running** (an interpreter with the training script imported, about
  370 MB), forever.

:func:`write_results_queue` replaces megatron-core's function (patch ``SAVE_QUEUE_LIFETIME`` of
:mod:`megatron_puffin.platform`): the same manager and queue, whose process ignores the stop signals (the rank
acts on them and still needs the queue for the interrupt save) and asks Linux for SIGKILL when its rank exits
(``PR_SET_PDEATHSIG``), as the data-loader workers do (:mod:`megatron_puffin.process_lifetime`). The rank's normal
exit still shuts it down through the manager's own finalizer.
"""
from __future__ import annotations

import multiprocessing
import os
from multiprocessing import resource_tracker
from multiprocessing.managers import SyncManager
from typing import Any

from megatron_puffin.process_lifetime import ignore_stop_signals_and_die_with, stop_signals_blocked


def write_results_queue() -> Any:
    """megatron-core's ``_get_write_results_queue``: this process's queue for checkpoint write results, started on
    first use. The manager is started with the stop signals blocked, so one that arrives before the new process has
    set "ignore" cannot kill it; the signal reaches this process when the block is lifted. The queue's proxy keeps
    its manager alive (as in megatron-core's function)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        # A spawn first launches multiprocessing's resource tracker where it is not running yet (a run's first
        # save), and that launch ends by *unblocking* SIGINT and SIGTERM in this thread (its own protection,
        # bpo-33613): the manager's process then started unprotected, and the second signal of a double Ctrl-C
        # or of a launcher's SIGINT-then-SIGTERM killed it, failing the interrupt save with EOFError. So the
        # tracker is launched first, then the manager under a fresh block.
        with stop_signals_blocked():
            resource_tracker.ensure_running()
        with stop_signals_blocked():
            manager.start(initializer=ignore_stop_signals_and_die_with, initargs=(os.getpid(),))
        filesystem_async._results_queue = manager.Queue()
    return filesystem_async._results_queue


def replacements() -> list:
    """The ``SAVE_QUEUE_LIFETIME`` row's replacement: megatron-core's savers call the module function by name."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    return [(filesystem_async, "_get_write_results_queue", write_results_queue)]
