"""Task-stream order: cyclic schedule, lazy epoch permutations, exact resume, resume at another DP size."""
import numpy as np
import pytest

from megatron_puffin.data.config import DataConfig, data_config_errors, parse_task_stream
from megatron_puffin.data.sampler import (
    MicroBatchSchedule,
    StreamOrder,
    StreamSpec,
    TaskStreamBatchSampler,
    state_from_dict,
    state_to_dict,
)

STREAMS = [StreamSpec("image2text_cross_view#0", 37, 3, 2), StreamSpec("image2image#0", 23, 2, 2),
           StreamSpec("image2text#0", 11, 4, 1)]


def _take(sampler, count):
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


def _per_stream(batches_per_rank):
    """Stream -> list of (position, index) in global order, from several ranks' batches of the same steps."""
    seen = {}
    for step_batches in zip(*batches_per_rank):
        for refs in step_batches:
            for stream, position, index in refs:
                seen.setdefault(stream, []).append((position, index))
    return {stream: sorted(items) for stream, items in seen.items()}


def test_every_epoch_is_a_permutation_generated_lazily():
    order = StreamOrder("s", 10, seed=3)
    indices = order.indices(0, 35)
    for epoch in range(3):
        assert sorted(indices[epoch * 10 : epoch * 10 + 10]) == list(range(10))
    assert indices[:10] != indices[10:20]
    assert order.indices(17, 9) == indices[17:26]  # across an epoch boundary
    assert len(order._cache) <= 2
    assert StreamOrder("s", 10, seed=4).indices(0, 10) != indices[:10]
    assert StreamOrder("s", 10, seed=3).indices(0, 10) == indices[:10]


def test_schedule_cycles_through_streams_with_repeats():
    schedule = MicroBatchSchedule([StreamSpec("a", 5, 1, 8), StreamSpec("b", 5, 1, 8), StreamSpec("c", 5, 1, 1)], 1)
    assert [schedule.stream_at(step) for step in range(19)] == [0] * 8 + [1] * 8 + [2] + [0, 0]
    state = schedule.advance(schedule.initial_state(), 17)
    assert state.step == 17 and state.consumed == {"a": 8, "b": 8, "c": 1}


def test_ranks_take_disjoint_contiguous_blocks_of_each_global_micro_batch():
    ranks = [_take(TaskStreamBatchSampler(STREAMS, 7, rank, 3), 10) for rank in range(3)]
    single = _take(TaskStreamBatchSampler([StreamSpec(s.name, s.num_samples, 3 * s.micro_batch_size, s.repeats)
                                           for s in STREAMS], 7, 0, 1), 10)
    for step in range(10):
        joined = [ref for rank in range(3) for ref in ranks[rank][step]]
        assert joined == single[step]
        assert len({position for _, position, _ in joined}) == len(joined)
        assert len({stream for stream, _, _ in joined}) == 1


def test_resume_reproduces_the_uninterrupted_run_exactly():
    uninterrupted = _take(TaskStreamBatchSampler(STREAMS, 11, 1, 2), 25)
    schedule = MicroBatchSchedule(STREAMS, 2)
    saved = state_to_dict(schedule.advance(schedule.initial_state(), 13), STREAMS, 11)
    resumed = TaskStreamBatchSampler(STREAMS, 11, 1, 2, state_from_dict(saved, STREAMS, 11))
    assert _take(resumed, 12) == uninterrupted[13:]


@pytest.mark.parametrize("new_size", [1, 4])
def test_resume_at_another_data_parallel_size_continues_the_same_global_order(new_size):
    before = [_take(TaskStreamBatchSampler(STREAMS, 5, rank, 2), 40) for rank in range(2)]
    reference = _per_stream(before)
    state = MicroBatchSchedule(STREAMS, 2).advance(MicroBatchSchedule(STREAMS, 2).initial_state(), 6)
    saved = state_to_dict(state, STREAMS, 5)
    after = [_take(TaskStreamBatchSampler(STREAMS, 5, rank, new_size, state_from_dict(saved, STREAMS, 5)), 10)
             for rank in range(new_size)]
    first = _per_stream([batches[:6] for batches in before])
    continued = _per_stream(after)
    for stream, items in continued.items():
        start = len(first.get(stream, []))
        assert items[0][0] == start  # continues exactly where the saved run stopped
        assert items == reference[stream][start : start + len(items)]


def test_saved_states_are_checked_against_the_run():
    saved = state_to_dict(MicroBatchSchedule(STREAMS, 1).initial_state(), STREAMS, 1)
    with pytest.raises(ValueError, match="seed"):
        state_from_dict(saved, STREAMS, 2)
    changed = [StreamSpec(STREAMS[0].name, 99, 3, 2)] + STREAMS[1:]
    with pytest.raises(ValueError, match="dataset changed"):
        state_from_dict(saved, changed, 1)
    with pytest.raises(ValueError, match="same --task-stream"):
        TaskStreamBatchSampler(STREAMS[:2], 1, 0, 1, state_from_dict(saved, STREAMS, 1))


def test_task_stream_flag_parsing():
    spec = parse_task_stream("image2text_cross_view:/data/a,/data/b:16:8")
    assert (spec.task, spec.paths, spec.micro_batch_size, spec.repeats) == (
        "image2text_cross_view", ("/data/a", "/data/b"), 16, 8)
    assert parse_task_stream("cam2image:s3:bucket/x:4").paths == ("s3:bucket/x",)
    assert parse_task_stream("cam2image:/d:4").repeats == 1
    for bad, message in [("video:/d:4", "unknown or missing task"), ("cam2image:/d", "MICRO_BATCH_SIZE"),
                         ("cam2image:/d:0", ">= 1"), ("cam2image:/d:x", "must be an integer"), ("cam2image::4", "no dataset")]:
        with pytest.raises(ValueError, match=message):
            parse_task_stream(bad)
    errors = data_config_errors(DataConfig(task_stream=["cam2image:/nonexistent:4"], cfg_text_dropout_prob=2.0,
                                           image_size=500))
    assert any("do not exist" in e for e in errors) and any("--tokenizer is required" in e for e in errors)
    assert any("--cfg-text-dropout-prob" in e for e in errors) and any("--image-size (500)" in e for e in errors)
    assert np.all([isinstance(e, str) for e in errors])


def test_image_size_unit_must_match_vision_patch_and_fold():
    config = DataConfig(task_stream=["cam2image:/d:4"], tokenizer="t.model", image_size_unit=32)
    assert data_config_errors(config, check_paths=False, vision_patch_size=16, vision_fold=2) == []
    errors = data_config_errors(config, check_paths=False, vision_patch_size=14, vision_fold=2)
    assert errors == ["--image-size-unit (32) must be a multiple of the vision patch size x fold (14 x 2 = 28)"]
