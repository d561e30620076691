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

torchrun also makes a fresh temporary folder (``torchelastic_*``, for its workers' redirected output and error files)
on every launch and leaves it behind, an empty tree of folders unless something was written into it; hundreds
pile up in ``/tmp`` (or a node's local disk) over a project's runs. Without ``--log-dir`` or ``--logs-specs`` this
launcher makes that folder itself and removes the folders in it that stay empty when the launch ends (a rank
failure and a stop signal included); files, e.g. ``--redirects`` logs, are never removed, nor the folders holding
them. A launcher killed with SIGKILL still leaves its folder.

Two of torchrun's defaults are the training scripts' instead, where the environment does not set them:
``PET_SIGNALS_TO_HANDLE`` (``--signals-to-handle``) includes SIGUSR1, Slurm's warning before a time limit, which
plain torchrun does not handle and dies of; and ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, how long the ranks get to save
after a forwarded signal before they are killed, is 600 s instead of 30 s (a large checkpoint takes longer).

``examples/train.sh``, the sbatch script and the quickstart launch through it; plain ``torchrun`` still works the
same way, with torchrun's endings and defaults.
"""
from __future__ import annotations

import copy
import os
import signal
import socket
import sys
import tempfile
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


def own_log_dir(args) -> Optional[str]:
    """Make the temporary folder torchrun would make for its logs (``torchelastic_*``), and return it, unless the
    command gives ``--log-dir`` or ``--logs-specs`` (then None: that is the user's)."""
    if args.log_dir or getattr(args, "logs_specs", None):
        return None
    args.log_dir = tempfile.mkdtemp(prefix="torchelastic_")
    return args.log_dir


def remove_empty_folders(path: str) -> None:
    """Remove ``path`` and the folders below it that hold no file, deepest first; ``os.rmdir`` removes only an empty
    folder, so a file, and every folder above one, stays."""
    for folder, _, _ in os.walk(path, topdown=False):
        try:
            os.rmdir(folder)
        except OSError:  # not empty (it holds a file, or a folder that does), or already gone
            pass


def launch_flag_problem(args) -> Optional[str]:
    """What torchrun would refuse in the parsed flags, as one message (torchrun raises it as a traceback from inside
    its launch: a bare ``AssertionError`` for ``--nproc-per-node 0``), or None. Checked before anything is made."""
    from torch.distributed.run import config_from_args

    try:
        if int(args.nproc_per_node) < 1:
            return f"--nproc-per-node ({args.nproc_per_node}) must be at least 1 (or gpu, cpu, auto)"
    except ValueError:
        pass  # gpu / cpu / auto, or a word torchrun names below
    if args.log_dir and os.path.isfile(args.log_dir):
        return f"--log-dir ({args.log_dir}) is a file; give a folder"
    probe = copy.copy(args)
    probe.log_dir = os.devnull  # torchrun's log specs would make (and leave) a torchelastic_* folder for None
    try:
        config_from_args(probe)
    except (ValueError, AssertionError) as error:
        message = " ".join(str(error).split()).rstrip(".") or type(error).__name__
        flag = next((f"{flag} ({value}): " for prefix, flag, value in (
            ("min_nodes", "--nnodes", args.nnodes), ("max_restarts", "--max-restarts", args.max_restarts),
            ("Unsupported nproc_per_node", "--nproc-per-node", args.nproc_per_node),
            ("Cuda is not available", "--nproc-per-node", args.nproc_per_node)) if message.startswith(prefix)), "")
        return flag + message
    return None


def main(argv: Optional[List[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    args = parse_args(argv)
    problem = launch_flag_problem(args)
    if problem:
        print(f"{PROG}: error: {problem}; see python -m megatron_puffin.launch --help (torchrun's flags)",
              file=sys.stderr, flush=True)
        return 2
    log_dir = own_log_dir(args)
    startup_finished()  # from here torchrun's agent handles the stop signals
    status, line = 0, None
    try:
        run(args)
    except ChildFailedError as error:
        status, line = _describe_failure(error)
    except SignalException as error:
        name = _signal_name(int(error.sigval))
        status = 128 + int(error.sigval)
        line = (f"{PROG}: stopped by {name}, which it forwarded to every rank (pretrain_puffin.py saves a checkpoint "
                "and exits; its run_status.json says how the run ended)")
    finally:
        for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
            signal.signal(stop, signal.SIG_IGN)  # the ranks are gone: a late second signal ends nothing mid-line
        if log_dir is not None:
            remove_empty_folders(log_dir)
            if os.path.isdir(log_dir):
                print(f"{PROG}: the ranks' log files are kept under {log_dir}", file=sys.stderr, flush=True)
    if line is not None:
        print(line, file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    exit_quietly_while_starting(__name__, PROG)
    sys.exit(main())
