"""``python -m megatron_puffin.launch``: torchrun, whose exit status is the ranks' and whose endings are one line.

Takes exactly torchrun's flags and runs torchrun's own launcher (``torch.distributed.run``: rendezvous, worker
processes, signal forwarding, ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``). What differs is how it ends:

* A rank that exits with a non-zero status: torchrun exits 1 whatever the status was and prints a Python traceback of
  its own ``ChildFailedError`` under a failure table. Here the exit status is the first failed rank's (75: stopped
  early after saving, resume with ``--load``; 2: a flag mistake, printed by the ranks above), 128 + N for a rank
  killed by signal N, and the ending is one line naming the rank, its host and its status.
* A stop signal to the launcher (Ctrl-C in its terminal, SIGTERM from a scheduler): torchrun forwards it to the ranks
  and waits for them as before (they save and exit), then printed a ``SignalException`` traceback and exited 1. Here
  it is one line and exit status 128 + the signal.

Two of torchrun's defaults are the training scripts' instead, where the environment does not set them:
``PET_SIGNALS_TO_HANDLE`` (``--signals-to-handle``) includes SIGUSR1, Slurm's warning before a time limit, which
plain torchrun does not handle and dies of; and ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, how long the ranks get to save
after a forwarded signal before they are killed, is 600 s instead of 30 s (a large checkpoint takes longer).

``examples/train.sh``, the sbatch script and the quickstart launch through it; plain ``torchrun`` still works the
same way, with torchrun's endings and defaults.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
from typing import List, Optional

from megatron_puffin.process_lifetime import EXIT_INTERRUPTED, exit_quietly_while_starting, startup_finished

PROG = "megatron_puffin.launch"

ENVIRONMENT_DEFAULTS = {
    "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600",
}
"""torchrun settings this launcher gives where the environment does not (flags on the command line still win)."""

def rank_exit_status(exitcode: int) -> int:
    """A shell's exit status for a worker's ``exitcode`` as torch reports it (negative: killed by that signal)."""
    if exitcode < 0:
        return 128 + (-exitcode)
    return exitcode if 0 < exitcode < 256 else 1


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal has no name
        return f"signal {number}"


def _describe_failure(error) -> tuple[int, str]:
    """(exit status, one line) for torchrun's ``ChildFailedError``."""
    rank, failure = error.get_first_failure()
    status = rank_exit_status(failure.exitcode)
    if failure.exitcode < 0:
        how = f"was killed by {_signal_name(-failure.exitcode)}"
    else:
        how = f"exited with status {failure.exitcode}"
    hint = {EXIT_INTERRUPTED: "; it stopped early after saving a checkpoint: run the same command with --load "
                                  "<the --save folder> to resume",
            2: "; the ranks' error lines above say which flags to fix"}.get(status, "; its log above says why")
    where = f"rank {rank} (local rank {failure.local_rank} on {socket.gethostname()})"
    return status, f"{PROG}: {where} {how} first{hint}"


def main(argv: Optional[List[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    args = parse_args(argv)
    startup_finished()  # from here torchrun's agent handles the stop signals
    try:
        run(args)
    except ChildFailedError as error:
        status, line = _describe_failure(error)
        print(line, file=sys.stderr, flush=True)
        return status
    except SignalException as error:
        name = _signal_name(int(error.sigval))
        print(f"{PROG}: stopped by {name}, which it forwarded to every rank (pretrain_puffin.py saves a checkpoint "
              "and exits; its run_status.json says how the run ended)", file=sys.stderr, flush=True)
        return 128 + int(error.sigval)
    return 0


if __name__ == "__main__":
    exit_quietly_while_starting(__name__, PROG)
    sys.exit(main())
