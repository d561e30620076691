"""--length-grouped: similar lengths share a micro-batch; the order stays a permutation per epoch, independent of
the data-parallel size and exactly resumable; the padding fraction reaches the log line."""
import numpy as np
import pytest

from megatron_puffin.data.sampler import ScheduleState, StreamSpec, TaskStreamBatchSampler

LENGTHS = np.random.default_rng(0).integers(1, 500, size=103)


def _spec(grouped: bool, micro_batch_size: int = 4):
    return StreamSpec("text2text#0", len(LENGTHS), micro_batch_size, 1, LENGTHS if grouped else None,
                      16 * micro_batch_size if grouped else 0)


def _global_order(grouped: bool, dp: int, steps: int, state=None):
    """Dataset indices of ``steps`` global micro-batches, concatenated over the DP ranks."""
    samplers = [TaskStreamBatchSampler([_spec(grouped)], seed=3, data_parallel_rank=rank, data_parallel_size=dp,
                                       state=state) for rank in range(dp)]
    iterators = [iter(sampler) for sampler in samplers]
    order = []
    for _ in range(steps):
        for iterator in iterators:
            order.extend(index for _, _, index in next(iterator))
    return order


def _padding(order, micro_batch_size=4):
    chunks = [LENGTHS[order[i:i + micro_batch_size]] for i in range(0, len(order) - micro_batch_size + 1,
                                                                        micro_batch_size)]
    return sum(int(c.max()) * len(c) - int(c.sum()) for c in chunks) / sum(int(c.max()) * len(c) for c in chunks)


def test_grouping_cuts_padding_and_keeps_each_epoch_a_permutation():
    grouped, plain = _global_order(True, 1, 50), _global_order(False, 1, 50)
    epoch = grouped[: len(LENGTHS)]
    assert sorted(epoch) == list(range(len(LENGTHS)))
    assert _padding(grouped) < 0.5 * _padding(plain)
    assert grouped != sorted(grouped, key=lambda i: LENGTHS[i])  # chunks are shuffled, not one long ramp


def test_grouped_order_is_independent_of_dp_size_and_resumes_exactly():
    assert _global_order(True, 1, 24) == _global_order(True, 2, 12) == _global_order(True, 4, 6)
    full = _global_order(True, 1, 40)
    resumed = _global_order(True, 2, 10, state=ScheduleState(20, {"text2text#0": 80}))
    assert resumed == full[80:]


def test_length_proxy_reads_text_bytes_from_the_index(tmp_path):
    from megatron_puffin.camera import Camera
    from megatron_puffin.data.format import PuffinDataset, PuffinRecord, ShardWriter
    from megatron_puffin.data.loader import length_proxy

    writer = ShardWriter(tmp_path / "shard", "main")
    for i, caption in enumerate(["a", "bbb", "cc"]):
        writer.add(PuffinRecord(key=f"k{i}", caption=caption, reasoning="r" * i, camera=Camera(0.1, 0.2, 1.0)))
    writer.finalize()
    dataset = PuffinDataset(tmp_path / "shard")
    assert length_proxy(dataset, "text2text").tolist() == [1, 4, 4]  # caption + reasoning bytes
    assert length_proxy(dataset, "image2image").tolist() == [1, 3, 2]  # no required text: the caption


def test_padding_fraction_is_in_the_log_line():
    from megatron_puffin.training.metrics import Interval, Report

    interval = Interval(tasks=["text2text"])
    interval.add_padding(real_tokens=30, slots=40)
    interval.add_padding(real_tokens=10, slots=10)
    assert interval.padding_percent() == pytest.approx(20.0)
    report = Report(1, 2, {"text2text": 4}, 1e-4, {"text2text": 1.0}, 0.5, 0, {"text2text": 1.0}, {"text2text": 9.0},
                    0.1, None, 0.0, None, padding_percent=interval.padding_percent())
    assert report.line(["text2text"]).endswith("| padding 20.0%")
    assert report.scalars()["padding_percent"] == pytest.approx(20.0)
