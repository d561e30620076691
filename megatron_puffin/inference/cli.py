"""What ``tools/understand.py`` and ``tools/generate.py`` share: the parser (the tool's own flags, then
``pretrain_puffin.py`` model flags or ``@flagfiles`` that override the checkpoint's stored ones), the batches dealt
to data-parallel replicas, progress reporting, rank-0 output and the one-line error convention."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch.distributed as dist

from megatron_puffin.config.dataclass_args import FlagFileParser
from megatron_puffin.optional_deps import quiet_library_deprecations

logger = logging.getLogger(__name__)

MODEL_FLAGS_EPILOG = (
    "Model flags: any pretrain_puffin.py flag or @flagfile (e.g. @examples/tiny/model.args) after the tool's own; "
    "they override the flags stored in the checkpoint's puffin_meta.json. --tensor-model-parallel-size N with N "
    "processes (torchrun) shards the model; the checkpoint reshards from any training layout."
)


class UsageError(ValueError):
    """A mistake in a tool's inputs (flags, files); the one-line message names it and the fix."""


def first_problems(problems: Sequence[str], shown: int = 3) -> str:
    """``problems`` for a one-line message: the first ``shown`` and how many more (a folder or request file with
    many bad entries is reported at once, not one per re-run)."""
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


def build_tool_parser(prog: str, description: str) -> FlagFileParser:
    """A parser with ``--checkpoint`` and the shared inference flags; the tool adds its own (``description`` is shown
    as written)."""
    parser = FlagFileParser(prog=prog, description=description, epilog=textwrap.fill(MODEL_FLAGS_EPILOG, 100),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory (iter_*) or run directory (its latest complete checkpoint)")
    parser.add_argument("--batch-size", type=int, default=4, help="images processed together (default: 4)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level (default: WARNING)")
    return parser


def parse_tool_args(parser: FlagFileParser, argv: Optional[Sequence[str]]) -> Tuple[argparse.Namespace, List[str]]:
    """(tool arguments, model flags): unknown ``--flags`` go to the model (validated when it is loaded)."""
    args, model_flags = parser.parse_known_args(argv)
    return args, model_flags


def prepare_output_file(path: str, flag: str) -> Path:
    """The output file's folder, created and checked writable before any work (a bad path would otherwise fail
    only when the results are written, after every image is done)."""
    output = Path(path)
    if output.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give the path of a file to write")
    _writable_folder(output.parent, f"{flag} {path}")
    return output


def prepare_output_dir(path: str, flag: str) -> Path:
    """The output folder, created and checked writable before any work."""
    output = Path(path)
    if output.exists() and not output.is_dir():
        raise UsageError(f"{flag} {path} is a file; give a folder (it is created when missing)")
    _writable_folder(output, f"{flag} {path}")
    return output


def _writable_folder(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{what}: cannot create the folder {folder} ({error.strerror or error})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{what}: the folder {folder} is not writable")


class ReplicaRounds:
    """Data-parallel inference: with more processes than the tensor-parallel size, each group of TP ranks is a
    replica of the model, and ``batches`` (lists of item indices) are dealt to the replicas one each per round, so
    P replicas finish a list about P times sooner. After each round every rank holds every replica's results
    (:meth:`gather`), in batch order, so rank 0 can write and journal them as one process would. Answers and images
    depend on their item only (not on the batch they share), so the outputs equal a single process's.

    Collective: every rank iterates every round and calls :meth:`gather` once per round (a replica without a batch
    in the last round gets an empty one).
    """

    def __init__(self, batches: Sequence[Sequence[int]]) -> None:
        import megatron_puffin.distributed as mpd

        self.group = mpd.process_groups().dp if dist.is_initialized() else None
        self.rank = dist.get_rank(self.group) if self.group is not None else 0
        self.size = dist.get_world_size(self.group) if self.group is not None else 1
        self.rounds = [list(batches[start:start + self.size]) for start in range(0, len(batches), self.size)]

    @classmethod
    def batched(cls, items: Sequence[int], batch_size: int) -> "ReplicaRounds":
        """Rounds of ``items`` cut into consecutive batches of at most ``batch_size``."""
        return cls([list(items[start:start + batch_size]) for start in range(0, len(items), batch_size)])

    def __iter__(self) -> Iterator[List[int]]:
        """This replica's batch of each round (empty when the round has none for it)."""
        for batches in self.rounds:
            yield list(batches[self.rank]) if self.rank < len(batches) else []

    def map(self, compute: Callable[[List[int]], Sequence[Any]]) -> Iterator[List[Tuple[int, Any]]]:
        """Per round: ``compute`` of this replica's batch (one result per index; not called for an empty batch),
        then every replica's ``(index, result)`` pairs of the round (:meth:`gather`)."""
        for batch in self:
            yield self.gather(list(zip(batch, compute(batch))) if batch else [])

    def gather(self, finished: List[Any]) -> List[Any]:
        """Every replica's ``finished`` items of this round, replica by replica (the order of the batches)."""
        if self.size == 1:
            return list(finished)
        parts: List[Any] = [None] * self.size
        dist.all_gather_object(parts, list(finished), group=self.group)
        return [item for part in parts for item in part]


def is_output_rank() -> bool:
    """Rank 0 writes files and prints. Before the process group starts (the resume journal is opened before the
    model loads) the launcher's ``RANK`` says which process that is: every rank of a torchrun launch used to count
    as rank 0 there, and all of them wrote the journal, ahead of the images rank 0 had saved."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def output_lock(lock_file: Path, outputs: str, prog: str) -> Iterator[None]:
    """Holds ``lock_file`` (beside the outputs, removed at the end) while a run writes ``outputs`` (the output rank
    only; the other ranks write nothing). A second run into the same outputs stops with one line naming the first:
    both used to pass the checks for an earlier run at once and then write the same journal and folder, mixing two
    runs' images under one generations.json.

    Raises:
        UsageError: another run holds it.
    """
    from megatron_puffin.files import locked

    if not is_output_rank():
        yield
        return
    with locked(lock_file, f"{outputs} is in use by another {prog} run ({{holder}}); wait for it to end, or choose "
                           "another output", UsageError):
        yield


def setup_logging(level: str) -> None:
    """Rank-0 logging; library deprecation chatter (megatron-core / torch checkpoint APIs, diffusers' CUDA autocast
    notice) is silenced unless ``DEBUG``."""
    if level != "DEBUG":
        quiet_library_deprecations()
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=level if rank == 0 else "ERROR", format="%(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":
        logging.getLogger("megatron").setLevel(logging.ERROR)


class Progress:
    """A tqdm bar when tqdm is installed (and wanted), else one log line per update; rank 0 only."""

    def __init__(self, total: int, description: str, enabled: bool = True) -> None:
        self.total, self.done, self.description = total, 0, description
        self.bar = None
        if enabled and is_output_rank():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=description, unit="img", file=sys.stderr)
            except ImportError:
                self.bar = None
        self.log = enabled and self.bar is None and is_output_rank()

    def __call__(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.log:
            logger.warning("%s: %d/%d", self.description, self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_tool(prog: str, body: Callable[[], int], expected: Tuple[type, ...]) -> int:
    """Runs ``body``; an expected error, or a checkpoint that cannot be used (damaged, refused), becomes one line
    on stderr and exit code 2, a file-system error mid-run (a full disk, a lost mount) one line and exit code 1;
    the process group is released. Ctrl-C, SIGTERM and SIGHUP are the data tools'
    (:func:`~megatron_puffin.process_lifetime.exit_on_ctrl_c`): one line, exit 128 + signal."""
    import megatron_puffin.distributed as mpd
    from megatron_puffin.process_lifetime import exit_on_ctrl_c
    from megatron_puffin.checkpoint_safety import CheckpointError

    expected = tuple(expected) + (CheckpointError,)

    def guarded() -> int:
        try:
            return body()
        except expected as error:
            message = " ".join(str(error).split())
            print(f"{prog}: error: {message}", file=sys.stderr)
            return 2
        except OSError as error:  # the tools write batch by batch and resume: nothing finished is lost
            where = f": {error.filename}" if error.filename else ""
            print(f"{prog}: error: {error.strerror or error}{where}; the outputs finished so far are kept: fix "
                  "that and run the same command again (it resumes)", file=sys.stderr)
            return 1
        finally:
            mpd.destroy()

    # every finished batch is in the journal
    return exit_on_ctrl_c(prog, guarded, "the outputs finished so far are kept: run the same command again "
                                         "(it resumes)")
