"""The training data loader: task streams -> task-homogeneous micro-batches with an exact, resumable position.

:class:`PuffinDataLoader` wraps a ``torch.utils.data.DataLoader`` (worker processes, prefetching, pinned memory)
whose batch sampler is :class:`~.sampler.TaskStreamBatchSampler`. Workers read samples from memory-mapped shards,
decode and preprocess images, tokenise and collate. Because workers run ahead of the training loop, the loader's
:meth:`~PuffinDataLoader.state_dict` is computed from the micro-batches actually *handed out*, by the schedule
arithmetic, so a checkpoint resumes exactly at the next unseen micro-batch (also at another data-parallel size).
"""
import contextlib
import ctypes
import functools
import logging
import multiprocessing.context
import multiprocessing.util
import re
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Collection, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_puffin.data.collate import Collator
from megatron_puffin.data.config import DataConfig, TaskStreamSpec, effective_data_seed, validate_data_config
from megatron_puffin.data.format import BAD_SAMPLE_ERRORS, DatasetFormatError, PuffinDataset, ShardUnavailableError
from megatron_puffin.data.latents import TASK_MOMENTS, LatentCache, check_latent_manifest
from megatron_puffin.data.sampler import (
    MicroBatchSchedule,
    SampleRef,
    ScheduleState,
    StreamSpec,
    TaskStreamBatchSampler,
    state_from_dict,
    state_to_dict,
)
from megatron_puffin.data.task_encoders import REQUIRED_FIELDS, TaskEncoder, TaskEncoderConfig, TextTooLong
from megatron_puffin.data.tokenizer import PuffinTokenizer
from megatron_puffin.process_lifetime import stop_signals_blocked, worker_init
from megatron_puffin.tasks import TASK_VARIANTS

logger = logging.getLogger(__name__)


@dataclass
class TaskStream:
    """A task stream with its opened dataset and encoder."""

    name: str
    spec: TaskStreamSpec
    dataset: PuffinDataset
    encoder: TaskEncoder
    latents: Optional[Any] = None
    """The stream's :class:`~.latents.LatentCache` with --cached-latents."""
    lengths: Optional[np.ndarray] = None
    """Per-sample length proxy with --length-grouped (:func:`length_proxy`)."""
    group_size: int = 0

    def sampler_spec(self) -> StreamSpec:
        return StreamSpec(self.name, len(self.dataset), self.spec.micro_batch_size, self.spec.repeats,
                          self.lengths, self.group_size)


_TEXT_FIELDS = ("caption", "reasoning", "scene", "answer")


def length_proxy(dataset: PuffinDataset, task: str) -> np.ndarray:
    """Per-sample length proxy of a stream for --length-grouped: the UTF-8 bytes of the text fields its task reads
    (the caption for image2image), read from the shards' indices without touching a sample (int64 [N]). Images
    are left out: the loader's pad-to-square / resize gives nearly every image the same token count."""
    names = [name for name in REQUIRED_FIELDS[task] if name in _TEXT_FIELDS] or ["caption"]
    parts = []
    for shard in dataset.shards:
        if not shard.num_samples:
            continue
        total = np.zeros(shard.num_samples, dtype=np.int64)
        for name in names:
            if shard.manifest["fields"][name]["num_bytes"]:
                total += shard.fields()[name].sequence_lengths.astype(np.int64)
        parts.append(total)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def stream_names(specs: Sequence[TaskStreamSpec]) -> List[str]:
    """Stable stream names: the task and its occurrence number among streams of that task ("image2text#0").

    Names do not include paths, so moving the data keeps the sample order and a saved state valid.
    """
    seen: Dict[str, int] = {}
    names = []
    for spec in specs:
        names.append(f"{spec.task}#{seen.get(spec.task, 0)}")
        seen[spec.task] = seen.get(spec.task, 0) + 1
    return names


def _shard_starts(dataset: PuffinDataset) -> List[int]:
    starts, offset = [], 0
    for shard in dataset.shards:
        if shard.num_samples:
            starts.append(offset)
        offset += shard.num_samples
    return starts


def _stream_label(spec: TaskStreamSpec, flag: str = "--task-stream") -> str:
    """How errors name a stream: its flag (``--task-stream`` or ``--valid-task-stream``), task and paths."""
    return f"{flag} {spec.task}:{','.join(spec.paths)}"


def _check_fields(spec: TaskStreamSpec, dataset: PuffinDataset, flag: str = "--task-stream") -> None:
    """Fails early when a stream's dataset has none of a field its task needs (e.g. no thinking captions)."""
    for field_name in REQUIRED_FIELDS[spec.task]:
        if field_name == "camera":  # stored as NaN when absent: look at the first sample of every shard (its
            # checksum unchecked: a damaged first sample is the sample reader's bad sample, not a start-up crash)
            present = any(not np.isnan(dataset.read_field(offset, "camera", verify=False)[0])
                          for offset in _shard_starts(dataset))
        else:
            present = any(shard.manifest["fields"][field_name]["num_bytes"] > 0 for shard in dataset.shards)
        if not present:
            raise ValueError(
                f"{_stream_label(spec, flag)}: task {spec.task} needs the field {field_name!r} "
                f"but the dataset has none (subsets {sorted({shard.subset for shard in dataset.shards})}); point "
                "the stream at a dataset that has it (see docs/data.md)"
            )


def stream_dataset_errors(spec: TaskStreamSpec, flag: str = "--task-stream",
                          cached_latents: Optional[Tuple[int, int]] = None) -> List[str]:
    """Opening problems of one stream's datasets (not a finished shard, truncated, missing fields for its task),
    as messages naming the stream (``flag``: ``--task-stream`` or ``--valid-task-stream``); cheap: manifests, index
    headers and file sizes, one sample per shard. ``cached_latents``: with ``--cached-latents``, the training
    ``(image_size, image_size_unit)``: a generation stream's shards must hold latents at that resolution (which
    VAE made them is checked when the loader is built, next to the model's VAE)."""
    label = _stream_label(spec, flag)
    try:
        dataset = PuffinDataset(list(spec.paths))
        if len(dataset) == 0:
            return [f"{label} has no samples"]
        _check_fields(spec, dataset, flag)
        if cached_latents is not None and TASK_VARIANTS[spec.task] in TASK_MOMENTS:
            for shard in dataset.shards:
                check_latent_manifest(shard.manifest, shard.dir, None, *cached_latents, label)
    except DatasetFormatError as error:
        return [f"{label}: {error}"]
    except ValueError as error:  # LatentCacheError included
        return [str(error)]
    return []


def build_streams(specs: Sequence[TaskStreamSpec], tokenizer: PuffinTokenizer,
                  encoder_config: TaskEncoderConfig, flag: str = "--task-stream") -> List[TaskStream]:
    """Opens every stream's datasets and builds its encoder (``flag`` names the streams in errors)."""
    streams = []
    for name, spec in zip(stream_names(specs), specs):
        dataset = PuffinDataset(list(spec.paths))
        if len(dataset) == 0:
            raise ValueError(f"{_stream_label(spec, flag)} has no samples")
        _check_fields(spec, dataset, flag)
        streams.append(TaskStream(name, spec, dataset, TaskEncoder(spec.task, tokenizer, encoder_config, name)))
    return streams


def _bad_sample(stream: TaskStream, index: int, error: BaseException) -> Dict[str, Any]:
    shard, local = stream.dataset.locate(index)
    reason = re.sub(r" at 0x[0-9a-f]+", "", f"{type(error).__name__}: {error}".replace("\n", " "))[:300]  # no addresses
    return {"stream": stream.name, "shard": str(shard.dir), "index": local, "reason": reason}


class UndecodableStreamError(DatasetFormatError):
    """No sample of a stream's dataset decodes (raised where a sample is read: in a worker, or in the rank)."""


class _StreamSamples(torch.utils.data.Dataset):
    """Map-style dataset over :data:`SampleRef` items: reads one sample and encodes it for its stream.

    A sample that fails to decode is replaced by the next one of the same dataset that decodes (a pure function of
    the index, so the order stays deterministic and a resumed run sees the same replacements); each failure is
    returned beside the sample (see :func:`_collate_reporting`) for the training process to log and count.
    """

    def __init__(self, streams: Sequence[TaskStream]):
        self.streams = list(streams)

    def __getitem__(self, ref: SampleRef):
        stream, position, index = ref
        item = self.streams[stream]
        bad: List[Dict[str, Any]] = []
        last_error = None
        for attempt in range(len(item.dataset)):
            candidate = (index + attempt) % len(item.dataset)
            try:
                return self._encode(item, candidate, position), bad
            except BAD_SAMPLE_ERRORS as error:
                bad.append(_bad_sample(item, candidate, error))
                last_error = error
        last = bad[-1]
        where = f"shard {last['shard']} index {last['index']}"
        if isinstance(last_error, TextTooLong):  # a flag's limit, not the data (the pre-start check sees one sample)
            raise UndecodableStreamError(f"stream {item.name}: none of its {len(item.dataset)} samples fits (the "
                                         f"last: {where}: {last_error})")
        raise UndecodableStreamError(
            f"stream {item.name}: none of its {len(item.dataset)} samples decodes (the last: {where}: "
            f"{last['reason']}); preprocessing checks every sample, so its shards were damaged or replaced since: "
            "preprocess them again (tools/preprocess_data.py), or leave the stream out")

    @staticmethod
    def _encode(item: TaskStream, index: int, position: int):
        encoded = item.encoder(item.dataset[index], position)
        if item.latents is not None and encoded.task in TASK_MOMENTS:
            encoded.latents = item.latents.moments(index, TASK_MOMENTS[encoded.task])
        return encoded

    def __len__(self) -> int:
        return sum(len(stream.dataset) for stream in self.streams)


class DataLoaderError(RuntimeError):
    """The loader cannot go on; the one-line message says why and what to do (the training loop adds where the run
    resumes)."""


class DataLoaderWorkerError(DataLoaderError):
    """Data-loader workers kept dying (more often than ``--max-worker-restarts``)."""


class DataUnavailableError(DataLoaderError):
    """A shard opened at start-up cannot be read any more (see :class:`~.format.ShardUnavailableError`)."""


class DataUndecodableError(DataLoaderError):
    """No sample of a stream decodes (see :class:`UndecodableStreamError`)."""


def _original_message(error: Exception, kind: type) -> Optional[str]:
    """The one-line message of a ``kind`` error, also one a worker raised (torch re-raises it in this process with
    the worker's whole traceback as its message: keep the original line)."""
    if not isinstance(error, kind):
        return None
    return str(error).strip().splitlines()[-1].split(f"{kind.__name__}: ", 1)[-1]


_WORKER_DIED = re.compile(r"DataLoader worker \(pid")  # torch's errors for a worker process that died
_NAMED_PIDS = re.compile(r"\(pid(?:\(s\))? ([\d, ]+)\)")


class _WorkerDeaths:
    """The worker deaths torch's SIGCHLD check found, by process id, and the workers the main thread is waiting on.

    torch's SIGCHLD handler raises its "worker died" error wherever the main thread is when the signal arrives:
    inside a training step, or half-way through writing a checkpoint. Wrapped (:func:`_defer_worker_failure_errors`),
    it records the death instead, and the loader acts on it before it next reads a batch: a worker killed half-way
    through writing a batch into the pipe all workers share leaves a partial message there, and a read of it never
    ends (no other worker can write: the dead one holds their lock). The handler still raises
    (:class:`_WorkerDied`) while the main thread waits for a batch from the dead worker's set, which ends that read."""

    def __init__(self):
        self.recorded: Dict[int, str] = {}  # pid -> torch's description of its death
        self.waiting_on: FrozenSet[int] = frozenset()

    def record(self, message: str) -> bool:
        """Records a death; True when the main thread is waiting on that worker (the handler then raises)."""
        named = _NAMED_PIDS.search(message)
        pids = {int(pid) for pid in re.findall(r"\d+", named.group(1))} if named else {0}  # 0: any worker
        for pid in pids:
            self.recorded.setdefault(pid, message)
        return bool(pids & self.waiting_on)

    def take(self, pids: Optional[Collection[int]] = None) -> Optional[str]:
        """The recorded deaths of ``pids`` (None: all of them), forgotten once taken; None if there are none."""
        taken = [self.recorded.pop(pid) for pid in list(self.recorded) if pids is None or pid in pids or pid == 0]
        return "; ".join(dict.fromkeys(taken)) or None

    @contextlib.contextmanager
    def waiting(self, pids: FrozenSet[int]) -> Iterator[None]:
        """Within the block the main thread waits on ``pids``: a death of one of them raises at once."""
        self.waiting_on = pids
        try:
            yield
        finally:
            self.waiting_on = frozenset()


_DEATHS = _WorkerDeaths()


class _WorkerDied(BaseException):
    """The death of a worker the main thread is waiting on, raised by the SIGCHLD wrapper inside ``next()``.

    A ``BaseException``, as ``KeyboardInterrupt`` is: library code on that path catches ``Exception``, and torch's
    profiler logs and drops one raised while ``record_function`` imports its optional CUPTI monitor, which the first
    batch read does (2 runs in 6 of the worker-death test under load: a warning with a traceback, and the death
    acted on only by torch's 5 s timeout check)."""


def _defer_worker_failure_errors() -> None:
    """Wraps torch's SIGCHLD handler (once per process) so that it records a worker's death in :data:`_DEATHS` and
    only raises while the main thread waits on that worker. Installed before the first workers start: torch's own
    handler, which its worker iterator would install once the workers run, is installed here first (a no-op for
    torch afterwards), so no death can meet it unwrapped (a worker killed while the first iterator started raised
    its error outside the loader's handling)."""
    if threading.current_thread() is not threading.main_thread():
        return
    torch.utils.data._utils.signal_handling._set_SIGCHLD_handler()
    handler = signal.getsignal(signal.SIGCHLD)
    if not callable(handler) or getattr(handler, "records_worker_failures", False):
        return

    def record(signum, frame) -> None:
        try:
            handler(signum, frame)
        except RuntimeError as error:  # e.g. "DataLoader worker (pid 812) is killed by signal: Killed."
            if not _WORKER_DIED.match(str(error)):
                raise
            if _DEATHS.record(str(error)):
                raise _WorkerDied(str(error)) from None

    record.records_worker_failures = True
    signal.signal(signal.SIGCHLD, record)


def _worker_death(error: Exception, pids: Collection[int]) -> Optional[str]:
    """torch's description of the death of one of ``pids`` behind ``error`` from their iterator; None if it is
    not one."""
    if isinstance(error, RuntimeError) and _WORKER_DIED.match(str(error)):  # torch found the dead worker itself
        return _DEATHS.take(pids) or str(error)
    if isinstance(error, (ConnectionError, EOFError, FileNotFoundError)):
        # A worker killed while handing a batch's shared memory over breaks the hand-over before the kernel reports
        # the death: wait for its SIGCHLD (recorded by _defer_worker_failure_errors) to tell the two apart.
        deadline = time.monotonic() + 2.0
        death = _DEATHS.take(pids)
        while death is None and time.monotonic() < deadline:
            time.sleep(0.05)
            death = _DEATHS.take(pids)
        return death
    return None


def _signal_of_dead_worker(batches) -> Optional[str]:
    """torch's wording for a worker a signal ended, read from the worker iterator's processes. torch says "exited
    unexpectedly" when its timeout check finds the dead worker before its SIGCHLD check names the signal (a race:
    1 CI run in 8 met it), which lost the signal, and with it the out-of-memory hint."""
    for worker in getattr(batches, "_workers", None) or ():
        code = worker.exitcode  # None while alive; -N: ended by signal N
        if code is not None and code < 0:
            return f"DataLoader worker (pid {worker.pid}) is killed by signal: {signal.strsignal(-code)}."
    return None


def _describe_death(message: str) -> str:
    """torch's message ("DataLoader worker (pid 812) is killed by signal: Killed."), plus what the signal usually
    means here."""
    message = message.rstrip(". ").replace("DataLoader worker", "data-loader worker", 1)
    if message.endswith("Killed"):
        message += " (SIGKILL: usually the kernel's out-of-memory killer, see dmesg)"
    elif "Bus error" in message:
        # torch only names shared memory; our shards are memory-mapped, and a read past the end of a file truncated
        # under the run is the other SIGBUS (the restarted workers check every shard's size and name it)
        message = message.split(". It is possible", 1)[0] + (" (SIGBUS: a memory-mapped shard file truncated while "
                                                             "the run read it, or /dev/shm too small)")
    return message


class _UnlockedEvent:
    """The "workers done" flag torch's DataLoader shares with its worker processes, without a lock.

    multiprocessing's Event takes a lock shared by every worker each time one of them calls ``is_set()`` (after
    every index it receives). A worker killed while holding it (the out-of-memory killer's SIGKILL lands anywhere)
    never releases it, and the main process blocks forever in its next ``is_set()`` or ``set()``: when torch
    finds the dead worker, or shuts the others down. Here the flag is one byte of shared memory that only the main
    process writes, so a worker's death cannot block anyone. It has what torch's DataLoader calls: ``set`` in the
    main process, ``is_set`` in both."""

    def __init__(self, context: multiprocessing.context.BaseContext):
        self._flag = context.RawValue(ctypes.c_bool, False)

    def is_set(self) -> bool:
        return bool(self._flag.value)

    def set(self) -> None:
        self._flag.value = True


class _WorkerContext(multiprocessing.context.ForkContext):
    """The fork start method (what the loader has always used on Linux, and what ``stop_signals_blocked`` around
    the workers' start assumes), with :class:`_UnlockedEvent` as its Event."""

    def Event(self) -> _UnlockedEvent:  # noqa: N802 - multiprocessing's name
        return _UnlockedEvent(self)


_WORKER_CONTEXT = _WorkerContext()


def _collate_reporting(collator: Collator, items: Sequence[tuple]) -> Dict[str, Any]:
    """Collates the samples and carries the decoding failures met while reading them (``bad_samples``)."""
    batch = collator([sample for sample, _ in items])
    batch["bad_samples"] = [bad for _, failures in items for bad in failures]
    return batch


class PuffinDataLoader:
    """Infinite iterator of task-homogeneous micro-batches for one data-parallel rank.

    Args:
        streams: The task streams (see :func:`build_streams`).
        collator: Collation into batch dicts.
        seed: Order seed (same on every rank).
        data_parallel_rank: This rank.
        data_parallel_size: Number of data-parallel ranks.
        num_workers: DataLoader worker processes.
        prefetch_factor: Micro-batches per worker prepared ahead.
        pin_memory: Pin tensors (only when CUDA is available; otherwise a warning is logged once).
        max_bad_samples: Samples of this rank that may fail to decode (each is logged and replaced); one more sets
            :attr:`bad_sample_error` (the training loop stops on it). 0: the first one does.
        max_worker_restarts: Times the worker processes are restarted after one of them died (killed by the
            out-of-memory killer, a segfault in a decoder); one more death raises :class:`DataLoaderWorkerError`.

    Each batch dict (see :class:`~.collate.Collator`) also has ``stream`` (name) and ``step`` (micro-batch number).
    """

    def __init__(self, streams: Sequence[TaskStream], collator: Collator, seed: int, data_parallel_rank: int = 0,
                 data_parallel_size: int = 1, num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False,
                 max_bad_samples: Optional[int] = None, max_worker_restarts: int = 3):
        self.streams, self.collator, self.seed = list(streams), collator, seed
        self.rank, self.world = data_parallel_rank, data_parallel_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        if pin_memory and not torch.cuda.is_available():
            logger.warning("--pin-memory has no effect without CUDA; batches are not pinned")
            pin_memory = False
        self.pin_memory = pin_memory
        self.specs = [stream.sampler_spec() for stream in self.streams]
        self.schedule = MicroBatchSchedule(self.specs, data_parallel_size)
        self._state = self.schedule.initial_state()
        self.max_bad_samples = max_bad_samples
        self.bad_samples_total = 0
        self.new_bad_samples: List[Dict[str, Any]] = []  # since the caller last cleared it (for the metrics file)
        self.bad_sample_error: Optional[str] = None
        self.max_worker_restarts = max_worker_restarts
        self.worker_restarts = 0

    # --- position ------------------------------------------------------------------------------------------------
    @property
    def position(self) -> ScheduleState:
        """The state after the last micro-batch handed out."""
        return self._state

    def mark(self) -> Tuple[ScheduleState, int]:
        """The position and bad-sample count now, for :meth:`rewind`."""
        return self._state, self.bad_samples_total

    def rewind(self, mark: Tuple[ScheduleState, int]) -> None:
        """Back to a :meth:`mark`: micro-batches handed out since then were not trained (the run stops before the
        step that drew them), so the checkpoint's position must hand them out again. Takes effect on the next
        iter(), like :meth:`load_state_dict`."""
        self._state, self.bad_samples_total = mark

    def state_dict(self) -> Dict[str, Any]:
        """Consumed samples per stream and micro-batches done (small; store it in checkpoints)."""
        return {**state_to_dict(self._state, self.specs, self.seed), "bad_samples": self.bad_samples_total}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores a position saved by :meth:`state_dict` (any data-parallel size); takes effect on the next iter()."""
        restored = state_from_dict(state, self.specs, self.seed)
        self.schedule.check_state(restored)
        self._state = restored
        self.bad_samples_total = int(state.get("bad_samples", 0))

    # --- iteration -----------------------------------------------------------------------------------------------
    def sampler(self) -> TaskStreamBatchSampler:
        """A batch sampler starting at the current position."""
        return TaskStreamBatchSampler(self.specs, self.seed, self.rank, self.world, self._state)

    def _torch_loader(self) -> torch.utils.data.DataLoader:
        kwargs: Dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs.update(prefetch_factor=self.prefetch_factor, persistent_workers=False, worker_init_fn=worker_init,
                          multiprocessing_context=_WORKER_CONTEXT)
            # multiprocessing's temporary folder (``pymp-*``: the sockets workers pass shared-memory handles through)
            # made here, before the fork: the workers share it and this process removes it when it exits. A worker's
            # own, made on its first batch, stayed behind whenever the worker was killed (the out-of-memory killer, a
            # SIGBUS), one folder per death.
            multiprocessing.util.get_temp_dir()
        return torch.utils.data.DataLoader(
            _StreamSamples(self.streams), batch_sampler=self.sampler(),
            collate_fn=functools.partial(_collate_reporting, self.collator),
            num_workers=self.num_workers, pin_memory=self.pin_memory, **kwargs,
        )

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        while True:
            if self.num_workers > 0:
                _defer_worker_failure_errors()
            with stop_signals_blocked():  # workers are forked here (see megatron_puffin/process_lifetime.py)
                batches = iter(self._torch_loader())
            workers = frozenset(worker.pid for worker in getattr(batches, "_workers", None) or ())
            unavailable = death = None
            try:
                while True:
                    with _DEATHS.waiting(workers):
                        # a worker of this set died since the last batch: restart before reading (see _WorkerDeaths)
                        death = _DEATHS.take(workers) if workers else None
                        if death is not None:
                            break
                        batch = next(batches)
                    stream = self.schedule.stream_at(self._state.step)
                    batch["stream"] = self.specs[stream].name
                    batch["step"] = self._state.step
                    self._record_bad_samples(batch.pop("bad_samples"))
                    self._state = self.schedule.advance(self._state)
                    yield batch
            except StopIteration:
                return
            except _WorkerDied as died:
                death = _DEATHS.take(workers) or str(died)
                traceback.clear_frames(died.__traceback__)  # the torch iterator's frames (see below)
            except Exception as error:  # noqa: BLE001 - re-raised below unless a worker died or a shard is gone
                unavailable = _original_message(error, ShardUnavailableError)
                if unavailable is None:
                    death = _worker_death(error, workers)
                    if death is None:
                        # Not something a restart cures: end this iterator and its workers before raising (the
                        # interpreter's exit would wait for them forever otherwise; see below).
                        undecodable = _original_message(error, UndecodableStreamError)
                        traceback.clear_frames(error.__traceback__)
                        batches = None
                        if undecodable is not None:
                            raise DataUndecodableError(undecodable) from None
                        raise
                # torch's re-raised worker error sits in a reference cycle with the frames of its iterator: clear
                # them, or the iterator and its workers live until a garbage collection, and at interpreter exit
                # multiprocessing waits forever for workers that ignore its SIGTERM (process_lifetime.py).
                traceback.clear_frames(error.__traceback__)
            finally:
                _DEATHS.take(workers)  # deaths of this set recorded since: its iterator ends (pids are reused)
            if death is not None and "exited unexpectedly" in death:
                death = _signal_of_dead_worker(batches) or death
            del batches  # shuts the surviving workers down now (the torch iterator's __del__)
            if unavailable is not None:
                raise DataUnavailableError(unavailable)
            self._restart_after(death)

    def _restart_after(self, death: str) -> None:
        """A worker process died (e.g. the kernel's out-of-memory killer): start new workers at the next micro-batch
        not yet handed out, which yields exactly the batches the dead ones would have (the resume guarantee)."""
        self.worker_restarts += 1
        if self.worker_restarts > self.max_worker_restarts:
            raise DataLoaderWorkerError(
                f"{_describe_death(death)}. This rank's workers were restarted {self.max_worker_restarts} time(s) "
                f"already (--max-worker-restarts {self.max_worker_restarts}): lower --num-workers or "
                "--prefetch-factor, or give the job more memory"
            )
        logger.warning("data-loader worker died (%s): restarting the workers at micro-batch %d (restart %d of at "
                       "most %d, --max-worker-restarts)", _describe_death(death), self._state.step,
                       self.worker_restarts, self.max_worker_restarts)


    def _record_bad_samples(self, failures: List[Dict[str, Any]]) -> None:
        for bad in failures:
            self.bad_samples_total += 1
            self.new_bad_samples.append(bad)
            logger.warning("bad sample skipped (%d so far): stream %s shard %s index %d: %s", self.bad_samples_total,
                           bad["stream"], bad["shard"], bad["index"], bad["reason"])
            if self.max_bad_samples is not None and self.bad_samples_total > self.max_bad_samples \
                    and self.bad_sample_error is None:
                self.bad_sample_error = (
                    f"{self.bad_samples_total} samples failed to decode (--max-bad-samples {self.max_bad_samples}); "
                    f"the last: shard {bad['shard']} index {bad['index']}: {bad['reason']}. Re-create that shard with "
                    "tools/preprocess_data.py, or raise --max-bad-samples to skip more"
                )


def task_encoder_config(config: DataConfig, data_seed: int, vision_patch_size: int, vision_fold: int,
                        num_query_tokens: int) -> TaskEncoderConfig:
    """The task encoders' settings from the data flags (``data_seed``: :func:`effective_data_seed`)."""
    return TaskEncoderConfig(
        seed=data_seed, image_max_size=config.image_size, image_unit=config.image_size_unit,
        vision_patch_size=vision_patch_size, vision_fold=vision_fold, num_query_tokens=num_query_tokens,
        max_understanding_text_tokens=config.max_understanding_text_tokens,
        max_generation_text_tokens=config.max_generation_text_tokens,
        cfg_dropout_prob=config.cfg_text_dropout_prob, mixed_motion_prob=config.mixed_motion_prob,
    )


def stream_prompt_error(spec: TaskStreamSpec, tokenizer: PuffinTokenizer, encoder_config: TaskEncoderConfig,
                        flag: str = "--task-stream") -> Optional[str]:
    """A text-token limit too small for the fixed part of the stream's prompts, found before training starts by
    encoding its first sample with each prompt template (at run time the samples would be skipped as undecodable);
    the message names the smallest limit that fits every template. None when they fit or the sample does not
    decode for another reason (the loader reports that one)."""
    try:
        dataset = PuffinDataset(list(spec.paths))
        if len(dataset) == 0:
            return None
        too_long = TaskEncoder(spec.task, tokenizer, encoder_config).prompt_limit_error(dataset[0])
    except (DatasetFormatError, *BAD_SAMPLE_ERRORS):
        return None
    return f"{_stream_label(spec, flag)}: {too_long}" if too_long else None


def build_data_loader(config: DataConfig, seed: int, data_parallel_rank: int = 0, data_parallel_size: int = 1,
                      vision_patch_size: int = 16, vision_fold: int = 2, num_query_tokens: int = 64,
                      tokenizer: Optional[PuffinTokenizer] = None,
                      vae_identity: Optional[Dict[str, Any]] = None,
                      stream_flag: str = "--task-stream") -> PuffinDataLoader:
    """Builds the loader of one data-parallel rank from the flags.

    Args:
        config: Data flags (validated here).
        seed: Run seed; ``config.data_seed`` overrides it for the data.
        data_parallel_rank: This rank.
        data_parallel_size: Number of data-parallel ranks.
        vision_patch_size: Vision tower patch size (image tokens per side = size / (patch * fold)).
        vision_fold: Space-to-depth fold of visual tokens.
        num_query_tokens: Meta queries appended to generation prompts.
        tokenizer: Reuse an opened tokenizer (default: open ``config.tokenizer``).
        vae_identity: With ``config.cached_latents``, the training VAE's :func:`~.latents.vae_identity`, checked
            against every shard's cached latents (None: only the resolution is checked, e.g. on pipeline stages
            that hold no VAE).
        stream_flag: The flag that named ``config.task_stream`` (``--valid-task-stream`` for the validation
            loader), for error messages.
    """
    validate_data_config(config, vision_patch_size=vision_patch_size, vision_fold=vision_fold)
    data_seed = effective_data_seed(config.data_seed, seed)
    tokenizer = tokenizer or PuffinTokenizer(config.tokenizer)
    encoder_config = task_encoder_config(config, data_seed, vision_patch_size, vision_fold, num_query_tokens)
    streams = build_streams(config.streams(), tokenizer, encoder_config, stream_flag)
    _apply_speed_levers(streams, config, vae_identity, stream_flag)
    collator = Collator(tokenizer.pad_id, compute_camera_maps=config.camera_maps_in_loader)
    return PuffinDataLoader(streams, collator, data_seed, data_parallel_rank, data_parallel_size,
                            config.num_workers, config.prefetch_factor, config.pin_memory, config.max_bad_samples,
                            config.max_worker_restarts)


def _apply_speed_levers(streams: Sequence[TaskStream], config: DataConfig,
                        vae_identity: Optional[Dict[str, Any]], flag: str = "--task-stream") -> None:
    """--length-grouped (length proxies and windows) and --cached-latents (each generation stream's cache)."""
    if config.length_grouped:
        for stream in streams:
            stream.lengths = length_proxy(stream.dataset, stream.spec.task)
            stream.group_size = config.length_group_window * stream.spec.micro_batch_size
    if config.cached_latents and not any(s.encoder.loss_task in TASK_MOMENTS for s in streams):
        logger.warning("--cached-latents has no effect: no generation --task-stream (only they run the VAE)")
    if not config.length_grouped and config.length_group_window != DataConfig.length_group_window:
        logger.warning("--length-group-window (%d) has no effect without --length-grouped", config.length_group_window)
    if config.cached_latents:
        for stream in (s for s in streams if s.encoder.loss_task in TASK_MOMENTS):  # generation streams only
            what = _stream_label(stream.spec, flag)
            stream.latents = LatentCache(stream.dataset, vae_identity, config.image_size, config.image_size_unit, what)
