"""Train Puffin on megatron-core: parse flags -> validate -> build -> train.

    torchrun --nproc-per-node 2 pretrain_puffin.py @examples/tiny/stage2_sft.args
    python pretrain_puffin.py --dry-run @examples/stages/stage2_sft.args --world-size 64

This file only wires things together; the pieces live in ``megatron_puffin``.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed")

logger = logging.getLogger("pretrain_puffin")


def main(argv=None) -> int:
    """Returns the exit code: 0 finished (or --dry-run), 2 bad flags, 1 failed, 75 stopped early after saving."""
    # Imported here, not at module level: the process megatron-core spawns at the first checkpoint save (the
    # write-results queue, megatron_puffin/training/save_queue.py) re-imports this file as its __main__ before it
    # can answer; with these imports at module level that took 6.3 s of the first save (0.13 s without).
    from megatron_puffin.config import ConfigError
    from megatron_puffin.training.preflight import parse_run_args

    try:
        args = parse_run_args(argv)
    except ConfigError as error:
        print(f"pretrain_puffin.py: {error}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    level = args.logging.log_level if rank == 0 else "WARNING"
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    from megatron_puffin.optional_deps import log_backends_once, quiet_library_deprecations

    if args.logging.log_level != "DEBUG":  # megatron-core logs every shard it opens at INFO
        logging.getLogger("megatron.core").setLevel(logging.WARNING)
        quiet_library_deprecations()

    log_backends_once(logger)
    if args.dry_run:
        from megatron_puffin.training.layout import describe
        from megatron_puffin.training.preflight import path_problems_here

        print(describe(args))
        problems = path_problems_here(args)
        if problems:
            print(f"paths on this machine: {len(problems)} problem(s); the dry run does not need the files, a real "
                  "run with these flags stops on them:")
            print("\n".join(f"  - {problem}" for problem in problems))
        else:
            print("paths on this machine: the data, tokenizer, VAE files, checkpoints and output folders the flags "
                  "name all check out")
        return 0
    from megatron_puffin.platform import setup
    from megatron_puffin.checkpoint_safety import CheckpointError
    from megatron_puffin.training.loop import TrainingError, run

    setup()  # megatron-core's patches, once per process (each torchrun child runs this main)
    try:
        return run(args, restore_signal_handlers=False)  # after a stop, __main__'s exit_process takes over
    except ConfigError as error:
        print(f"pretrain_puffin.py: {error}", file=sys.stderr)
        return 2
    except (CheckpointError, TrainingError) as error:
        print(f"pretrain_puffin.py (rank {rank}): {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # SIGINT outside the training loop (building, loading); in it, Ctrl-C saves and stops
        from megatron_puffin.process_lifetime import EXIT_CTRL_C

        print(f"pretrain_puffin.py (rank {rank}): interrupted (SIGINT) before training started or after its last "
              "save; nothing trained is lost", file=sys.stderr)
        return EXIT_CTRL_C


if __name__ == "__main__":
    from megatron_puffin.process_lifetime import (EXIT_CTRL_C, EXIT_INTERRUPTED, exit_process,
                                                  exit_quietly_while_starting, startup_finished)

    # a stop signal while torch and megatron-core load (seconds): one line, not an import's traceback
    exit_quietly_while_starting(__name__, "pretrain_puffin.py")
    import megatron_puffin.training.loop  # noqa: F401,E402  the libraries main imports
    startup_finished()
    status = main()
    # stopped by a signal (saved and stopped; Ctrl-C before training): a later one cannot change the exit status
    # or print a traceback while the interpreter shuts the run's helper processes down
    exit_process(status, stopped=status in (EXIT_INTERRUPTED, EXIT_CTRL_C))
