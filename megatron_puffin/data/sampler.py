"""Task streams and their deterministic global sample order (docs/puffin.md §3.9).

Each stream (task, datasets, micro-batch size b, repeats r) has an infinite *global* order of its samples: epoch e
is ``randperm(N, generator(seed, "order", stream name, e))``, generated lazily when the epoch is reached (one
O(N) permutation per epoch, nothing per step that grows with N). Micro-batches cycle through the streams: stream 0
r_0 times, stream 1 r_1 times, ... then again. A micro-batch of stream s takes the next b * dp_size positions of its
global order; data-parallel rank k takes the k-th contiguous block of b. The whole position is therefore the
:class:`ScheduleState` (micro-batches done, samples consumed per stream), which does not depend on the number of
ranks: restoring it at another data-parallel size continues the same global order.

Length grouping (``--length-grouped``, off by default): each epoch's permutation is cut into windows of
``group_size`` positions (a fixed number of samples, independent of the data-parallel size); inside a window the
samples are sorted by their length proxy and the resulting micro-batch-sized chunks are put in a random order
(keyed by seed, stream, epoch and window). Samples of similar length therefore share a micro-batch, the order is
still a pure function of (seed, stream, epoch), and the position is still the consumed count.
"""
import logging
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_puffin.distributed.random import make_generator

logger = logging.getLogger(__name__)

STATE_VERSION = 1

SampleRef = Tuple[int, int, int]
"""(stream index, position in the stream's global order, dataset index)."""


@dataclass(frozen=True)
class StreamSpec:
    """One task stream as the sampler sees it.

    Attributes:
        name: Stable name, part of the order's random keys and of the state (e.g. "image2text#0").
        num_samples: Dataset size N.
        micro_batch_size: Samples per micro-batch per data-parallel rank.
        repeats: Consecutive micro-batches of this stream per cycle.
    """

    name: str
    num_samples: int
    micro_batch_size: int
    repeats: int = 1
    lengths: Optional[np.ndarray] = field(default=None, compare=False, hash=False, repr=False)
    """Per-sample length proxy for length grouping (int64 [N]), or None for the plain random order."""
    group_size: int = 0
    """Samples per length-grouping window (0: no grouping)."""


class StreamOrder:
    """The global order of one stream: position -> dataset index, epoch permutations generated lazily."""

    def __init__(self, name: str, num_samples: int, seed: int, lengths: Optional[np.ndarray] = None,
                 group_size: int = 0, chunk_size: int = 1):
        if num_samples < 1:
            raise ValueError(f"stream {name} has no samples")
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"stream {name}: {len(lengths)} lengths for {num_samples} samples")
        self.name, self.num_samples, self.seed = name, num_samples, seed
        self.lengths, self.group_size, self.chunk_size = lengths, group_size, max(1, chunk_size)
        self._cache: Dict[int, np.ndarray] = {}

    def _grouped(self, permutation: np.ndarray, epoch: int) -> np.ndarray:
        """Sort each window of the permutation by length, then shuffle its micro-batch-sized chunks."""
        pieces = []
        for window, start in enumerate(range(0, len(permutation), self.group_size)):
            indices = permutation[start : start + self.group_size]
            indices = indices[np.argsort(self.lengths[indices], kind="stable")]
            chunks = [indices[i : i + self.chunk_size] for i in range(0, len(indices), self.chunk_size)]
            generator = make_generator(self.seed, "length_group", self.name, epoch, window)
            pieces.extend(chunks[i] for i in torch.randperm(len(chunks), generator=generator).tolist())
        return np.concatenate(pieces)

    def permutation(self, epoch: int) -> np.ndarray:
        """Dataset indices of one epoch (int64 [N]); the two most recently generated epochs are cached."""
        if epoch not in self._cache:
            generator = make_generator(self.seed, "order", self.name, epoch)
            permutation = torch.randperm(self.num_samples, generator=generator).numpy()
            if self.lengths is not None and self.group_size > 1:
                permutation = self._grouped(permutation, epoch)
            self._cache[epoch] = permutation
            while len(self._cache) > 2:  # keep the two most recently generated epochs
                del self._cache[next(iter(self._cache))]
        return self._cache[epoch]

    def indices(self, start: int, count: int) -> List[int]:
        """Dataset indices at global positions [start, start + count)."""
        result: List[int] = []
        position = start
        while len(result) < count:
            epoch, offset = divmod(position, self.num_samples)
            take = min(count - len(result), self.num_samples - offset)
            result.extend(self.permutation(epoch)[offset : offset + take].tolist())
            position += take
        return result


@dataclass
class ScheduleState:
    """Where a run stands: micro-batches produced and global samples consumed per stream.

    Attributes:
        step: Micro-batches produced so far (all streams).
        consumed: Stream name -> samples consumed by all data-parallel ranks together.
    """

    step: int = 0
    consumed: Dict[str, int] = field(default_factory=dict)


class MicroBatchSchedule:
    """The cyclic stream schedule and the pure state arithmetic shared by the sampler and the loader."""

    def __init__(self, streams: Sequence[StreamSpec], data_parallel_size: int):
        if not streams:
            raise ValueError("at least one task stream is needed")
        names = [stream.name for stream in streams]
        if len(set(names)) != len(names):
            raise ValueError(f"task stream names must be unique, got {names}")
        if data_parallel_size < 1:
            raise ValueError(f"data-parallel size must be >= 1, got {data_parallel_size}")
        self.streams, self.data_parallel_size = list(streams), data_parallel_size
        self.cycle = [index for index, stream in enumerate(streams) for _ in range(stream.repeats)]

    def stream_at(self, step: int) -> int:
        """Index of the stream of micro-batch ``step``."""
        return self.cycle[step % len(self.cycle)]

    def global_batch(self, stream: int) -> int:
        """Samples one micro-batch of ``stream`` takes from its order (all ranks together)."""
        return self.streams[stream].micro_batch_size * self.data_parallel_size

    def advance(self, state: ScheduleState, num_steps: int = 1) -> ScheduleState:
        """State after ``num_steps`` more micro-batches (a new object; O(num_steps))."""
        consumed = dict(state.consumed)
        for step in range(state.step, state.step + num_steps):
            stream = self.stream_at(step)
            name = self.streams[stream].name
            consumed[name] = consumed.get(name, 0) + self.global_batch(stream)
        return ScheduleState(state.step + num_steps, consumed)

    def initial_state(self) -> ScheduleState:
        return ScheduleState(0, {stream.name: 0 for stream in self.streams})

    def check_state(self, state: ScheduleState) -> None:
        """Raises ValueError when a restored state does not belong to these streams."""
        expected = {stream.name for stream in self.streams}
        if set(state.consumed) != expected:
            raise ValueError(
                f"the data state was saved with task streams {sorted(state.consumed)} but this run has "
                f"{sorted(expected)}; resume with the same --task-stream flags (order and tasks)"
            )


def state_to_dict(state: ScheduleState, streams: Sequence[StreamSpec], seed: int) -> Dict:
    """Serialisable form (what goes into checkpoints)."""
    return {
        "version": STATE_VERSION,
        "seed": seed,
        "step": state.step,
        "streams": {
            stream.name: {"consumed": state.consumed.get(stream.name, 0), "num_samples": stream.num_samples}
            for stream in streams
        },
    }


def state_from_dict(payload: Dict, streams: Sequence[StreamSpec], seed: int) -> ScheduleState:
    """Parses and checks a saved state against this run's streams and seed."""
    if payload.get("version") != STATE_VERSION:
        raise ValueError(f"data state version {payload.get('version')} is not {STATE_VERSION}")
    if payload.get("seed") != seed:
        raise ValueError(f"the data state was saved with seed {payload.get('seed')}, this run uses {seed}")
    saved = payload.get("streams", {})
    for stream in streams:
        entry = saved.get(stream.name)
        if entry is not None and entry.get("num_samples") != stream.num_samples:
            raise ValueError(
                f"stream {stream.name} had {entry.get('num_samples')} samples when saved, now {stream.num_samples}: "
                "the dataset changed, so the saved order cannot be continued"
            )
    return ScheduleState(int(payload["step"]), {name: int(entry["consumed"]) for name, entry in saved.items()})


class TaskStreamBatchSampler(torch.utils.data.Sampler):
    """Infinite batch sampler yielding this rank's part of each task-homogeneous micro-batch.

    Args:
        streams: The task streams.
        seed: Order seed.
        data_parallel_rank: This rank.
        data_parallel_size: Number of data-parallel ranks.
        state: Where to start (default: the beginning).

    Yields:
        Lists of :data:`SampleRef` (stream index, position, dataset index), ``micro_batch_size`` long.
    """

    def __init__(self, streams: Sequence[StreamSpec], seed: int, data_parallel_rank: int, data_parallel_size: int,
                 state: Optional[ScheduleState] = None):
        super().__init__()
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data-parallel rank {data_parallel_rank} outside [0, {data_parallel_size})")
        self.schedule = MicroBatchSchedule(streams, data_parallel_size)
        self.orders = [StreamOrder(stream.name, stream.num_samples, seed, stream.lengths, stream.group_size,
                                   stream.micro_batch_size) for stream in streams]
        self.rank = data_parallel_rank
        self.state = state if state is not None else self.schedule.initial_state()
        self.schedule.check_state(self.state)

    def micro_batch(self, state: ScheduleState) -> List[SampleRef]:
        """This rank's sample references of the micro-batch that starts at ``state``."""
        stream = self.schedule.stream_at(state.step)
        spec = self.schedule.streams[stream]
        start = state.consumed[spec.name] + self.rank * spec.micro_batch_size
        indices = self.orders[stream].indices(start, spec.micro_batch_size)
        return [(stream, start + offset, index) for offset, index in enumerate(indices)]

    def __iter__(self) -> Iterator[List[SampleRef]]:
        state = self.state
        while True:
            yield self.micro_batch(state)
            state = self.schedule.advance(state)
