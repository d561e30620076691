"""What opening a dataset checks (cheap: manifests, record coverage, half-written shards), what preprocessing reports
(duplicate summary records, paths outside --input), and the loader's replacement of undecodable samples."""
from pathlib import Path

import numpy as np
import pytest

from megatron_puffin.camera import Camera
from megatron_puffin.data.format import BadSampleError, DatasetFormatError, PuffinDataset, PuffinRecord, ShardWriter, \
    array_to_camera
from megatron_puffin.data.puffin4m import BadSample, DuplicateRecord, SubsetLayout, build_record, mark_duplicates


def _subset(root: Path, sizes=(2, 2)) -> Path:
    """A subset directory laid out as tools/preprocess_data.py writes it (record ranges in the manifests)."""
    total, start = sum(sizes), 0
    for index, size in enumerate(sizes):
        source = {"records": [start, start + size], "subset_records": total, "subset": "main"}
        writer = ShardWriter(root / "main" / f"shard-{index:05d}", "main", source=source)
        for offset in range(size):
            writer.add(PuffinRecord(key=f"k{start + offset}", image=b"\xff\xd8", caption="c",
                                    camera=Camera(0.1, 0.2, 0.9)))
        writer.finalize()
        start += size
    return root / "main"


def test_complete_subset_opens(tmp_path):
    assert len(PuffinDataset(_subset(tmp_path))) == 4


def test_shard_without_manifest_is_an_error_naming_it(tmp_path):
    subset = _subset(tmp_path)
    (subset / "shard-00001" / "manifest.json").unlink()
    with pytest.raises(DatasetFormatError, match="shard-00001 has field files but no manifest.json"):
        PuffinDataset(subset)


def test_missing_last_shard_of_a_killed_preprocess_is_an_error(tmp_path):
    subset = _subset(tmp_path, sizes=(2, 2, 2))
    for path in (subset / "shard-00002").iterdir():
        path.unlink()
    (subset / "shard-00002").rmdir()
    with pytest.raises(DatasetFormatError, match=r"hold summary records \[0, 4\) of 6"):
        PuffinDataset(subset)
    with pytest.raises(DatasetFormatError, match=r"records \[0, 4\) of 6"):
        PuffinDataset(tmp_path)  # also through the output prefix


def test_a_gap_and_a_half_written_shard_are_errors(tmp_path):
    subset = _subset(tmp_path, sizes=(2, 2, 2))
    (subset / "shard-00001").rename(subset / "shard-00001.tmp")
    with pytest.raises(DatasetFormatError, match="half-written shard .*shard-00001.tmp"):
        PuffinDataset(subset)
    (subset / "shard-00001.tmp").rename(tmp_path / "elsewhere")
    with pytest.raises(DatasetFormatError, match=r"no shard holds summary records \[2, 4\)"):
        PuffinDataset(subset)


def test_truncated_bin_is_an_error_naming_the_shard(tmp_path):
    subset = _subset(tmp_path)
    path = subset / "shard-00000" / "caption.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DatasetFormatError, match="shard-00000: caption.bin has 1 bytes, the manifest says 2"):
        PuffinDataset(subset)


def test_non_finite_camera_is_a_bad_sample():
    assert array_to_camera(np.array([np.nan] * 4, np.float32)) is None
    with pytest.raises(BadSampleError, match="non-finite camera"):
        array_to_camera(np.array([np.inf, 0.1, 0.9, np.nan], np.float32))


def test_preprocess_rejects_duplicates_and_paths_outside_the_input(tmp_path):
    items = [{"annotation": "a.json", "image": "a.jpg"}, {"annotation": "b.json", "image": "b.jpg"},
             {"annotation": "a.json", "image": "c.jpg"}]
    marked, count = mark_duplicates(items)
    assert count == 1 and marked[:2] == items[:2] and marked[2] == DuplicateRecord(items[2], 2, 0)
    layout = SubsetLayout("main", tmp_path, {"caption": "cap_folder"})
    with pytest.raises(BadSample) as info:
        build_record(layout, marked[2])
    assert info.value.reason == "duplicate_record" and "repeats the annotation of record 0" in str(info.value)
    for record in ({"annotation": "a.json", "image": "../../etc/passwd"}, {"annotation": "/abs/a.json", "image": "x"}):
        with pytest.raises(BadSample) as info:
            build_record(layout, record)
        assert info.value.reason == "path_outside_input", record


def test_loader_replaces_an_undecodable_sample_counts_it_and_keeps_the_count_in_its_state(tmp_path):
    import io

    from PIL import Image

    from megatron_puffin.data import DataConfig, build_data_loader
    from megatron_puffin.data.tokenizer import train_sentencepiece_tokenizer

    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), "red").save(buffer, format="JPEG")
    writer = ShardWriter(tmp_path / "shard", "main")
    for index in range(4):
        writer.add(PuffinRecord(key=f"k{index}", image=b"garbage" if index == 2 else buffer.getvalue(),
                                caption="a red square", camera=Camera(0.1, 0.2, 0.9)))
    writer.finalize()
    tokenizer = train_sentencepiece_tokenizer(["a red square in a photo"] * 10, tmp_path / "tok.model", vocab_size=300)

    def loader(max_bad):
        config = DataConfig(task_stream=[f"image2text:{tmp_path / 'shard'}:4"], tokenizer=str(tokenizer),
                            image_size=96, num_workers=0, pin_memory=False, max_bad_samples=max_bad)
        return build_data_loader(config, seed=1, vision_patch_size=16, vision_fold=2, num_query_tokens=4)

    tolerant = loader(1)
    batch = next(iter(tolerant))
    assert batch["input_ids"].shape[0] == 4  # the bad sample was replaced, not dropped
    assert tolerant.bad_samples_total == 1 and tolerant.bad_sample_error is None
    (bad,) = tolerant.new_bad_samples
    assert (bad["stream"], bad["shard"], bad["index"]) == ("image2text#0", str(tmp_path / "shard"), 2)
    assert "0x" not in bad["reason"] and "image" in bad["reason"].lower()
    resumed = loader(1)
    resumed.load_state_dict(tolerant.state_dict())
    assert resumed.bad_samples_total == 1

    strict = loader(0)
    next(iter(strict))
    assert strict.bad_sample_error.startswith("1 samples failed to decode (--max-bad-samples 0); the last: shard")
