"""The indexed shard format: every field round-trips, several shards read as one, damaged shards are refused."""
import json
import pickle

import numpy as np
import pytest

from megatron_puffin.camera import Camera
from megatron_puffin.data.format import (
    CHECKSUM_FIELD,
    FIELDS,
    BadSampleError,
    DatasetFormatError,
    PuffinDataset,
    PuffinRecord,
    ShardWriter,
    find_shards,
)


def _records(count, offset=0):
    records = []
    for index in range(offset, offset + count):
        cross_view = index % 3 == 1
        records.append(PuffinRecord(
            key=f"main/{index:04d}.json",
            image=bytes([index % 256]) * (10 + index) + b"\xff\xd9",
            caption=f"Caption {index} with unicode é ü 中" if index % 5 else "",
            reasoning=f"reasoning {index}" if index % 2 else "",
            scene=f"scene {index}" if cross_view else "",
            answer=f"answer {index}" if index % 4 == 0 else "",
            image_init=b"init" * index if cross_view else b"",
            camera=None if index % 7 == 6 else Camera(0.01 * index, -0.02 * index, 0.5 + 0.01 * index,
                                                      yaw=0.1 * index if cross_view else None),
        ))
    return records


def _write(directory, records, subset="main", bad=None):
    writer = ShardWriter(directory, subset, source={"test": True}, flags={"shard_size": 10})
    for record in records:
        writer.add(record)
    return writer.finalize(bad)


def _expected(record, field):
    value = getattr(record, field)
    return value if value not in ("", b"") else None


def test_every_field_round_trips(tmp_path):
    records = _records(12)
    _write(tmp_path / "shard", records, bad={"image_empty": 2})
    dataset = PuffinDataset(tmp_path / "shard")
    assert len(dataset) == 12
    for index, record in enumerate(records):
        sample = dataset[index]
        assert sample["index"] == index and sample["subset"] == "main" and sample["key"] == record.key
        for field in ("image", "image_init", "caption", "reasoning", "scene", "answer"):
            assert sample[field] == _expected(record, field), field
        if record.camera is None:
            assert sample["camera"] is None
        else:
            got, want = sample["camera"], record.camera
            np.testing.assert_allclose([got.roll, got.pitch, got.vfov], [want.roll, want.pitch, want.vfov], rtol=1e-6)
            assert (got.yaw is None) == (want.yaw is None)
            if want.yaw is not None:
                assert got.yaw == pytest.approx(want.yaw, rel=1e-6)
    assert set(FIELDS) == {"key", "image", "image_init", "caption", "reasoning", "scene", "answer", "camera"}
    assert dataset.bad_sample_counts() == {"image_empty": 2}
    assert dataset[-1]["key"] == records[-1].key


def test_several_shards_read_as_one_and_pickle(tmp_path):
    first, second = _records(5), _records(7, offset=5)
    _write(tmp_path / "ds" / "main" / "shard-00000", first)
    _write(tmp_path / "ds" / "main" / "shard-00001", second)
    _write(tmp_path / "ds" / "zempty" / "shard-00000", [], subset="photography")
    (tmp_path / "ds" / "main" / "shard-00002.tmp").mkdir()  # unfinished shard: ignored
    assert len(find_shards(tmp_path / "ds")) == 3
    dataset = PuffinDataset(tmp_path / "ds")
    assert len(dataset) == 12
    assert [dataset[i]["key"] for i in range(12)] == [r.key for r in first + second]
    restored = pickle.loads(pickle.dumps(dataset))
    assert restored[7]["image"] == second[2].image
    as_list = PuffinDataset([tmp_path / "ds" / "main" / "shard-00001", tmp_path / "ds" / "main" / "shard-00000"])
    assert as_list[0]["key"] == second[0].key
    cameras = dataset.cameras()
    assert cameras.shape == (12, 4) and np.isnan(cameras[6]).all()
    with pytest.raises(IndexError):
        dataset[12]


def test_truncated_or_inconsistent_shards_are_refused(tmp_path):
    shard = _write(tmp_path / "shard", _records(6))
    data = (shard / "image.bin").read_bytes()
    (shard / "image.bin").write_bytes(data[:-3])
    with pytest.raises(DatasetFormatError, match="image.bin .*truncated"):
        PuffinDataset(shard)
    (shard / "image.bin").write_bytes(data)
    index = (shard / "caption.idx").read_bytes()
    (shard / "caption.idx").write_bytes(index[:-8])
    with pytest.raises(DatasetFormatError, match="caption.idx"):
        PuffinDataset(shard)
    (shard / "caption.idx").write_bytes(index)
    (shard / "scene.bin").unlink()
    with pytest.raises(DatasetFormatError, match="scene.bin is missing"):
        PuffinDataset(shard)


def test_missing_or_foreign_manifest_is_refused(tmp_path):
    shard = _write(tmp_path / "shard", _records(2))
    manifest = (shard / "manifest.json").read_text()
    (shard / "manifest.json").write_text(manifest.replace('"schema_version": 1', '"schema_version": 99'))
    with pytest.raises(DatasetFormatError, match="schema"):
        PuffinDataset(shard)
    (shard / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="not valid JSON"):
        PuffinDataset(shard)
    # valid JSON of the wrong shape, or bytes that are no text: one DatasetFormatError naming the file, where a list
    # or null raised AttributeError and binary bytes a UnicodeDecodeError that named no file
    good = json.loads(manifest)
    wrong_counts = dict(good, fields=dict(good["fields"], caption=dict(good["fields"]["caption"], num_bytes="9")))
    for content, message in ((b"[1, 2]", "holds an array, not a JSON object; the shard is corrupt"),
                             (b"null", "holds null, not a JSON object"),
                             (b"\xff\xfe\x00\x01garbage", "is not valid JSON"),
                             (json.dumps(dict(good, fields=[])).encode(), 'has no "fields" object'),
                             (json.dumps(dict(good, num_samples=-1)).encode(), '"num_samples" and each field'),
                             (json.dumps(wrong_counts).encode(), "must be whole numbers of at least 0")):
        (shard / "manifest.json").write_bytes(content)
        with pytest.raises(DatasetFormatError) as refused:
            PuffinDataset(shard)
        assert message in str(refused.value) and str(shard / "manifest.json") in str(refused.value), content
    with pytest.raises(DatasetFormatError, match="no shard"):
        PuffinDataset(tmp_path / "nothing_here_dir" if (tmp_path / "nothing_here_dir").mkdir() is None else None)


def test_writer_refuses_existing_shard_and_empty_key(tmp_path):
    _write(tmp_path / "shard", _records(1))
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path / "shard", "main")
    writer = ShardWriter(tmp_path / "other", "main")
    with pytest.raises(ValueError, match="key"):
        writer.add(PuffinRecord(key=""))


def test_raw_puffin4m_data_given_as_a_dataset_points_to_the_preprocessing(tmp_path):
    (tmp_path / "raw" / "local_folder" / "000000").mkdir(parents=True)
    (tmp_path / "raw" / "summary.json").write_text("[]")
    for given in (tmp_path / "raw", tmp_path / "raw" / "local_folder"):
        with pytest.raises(DatasetFormatError, match=r"looks like raw Puffin-4M data: make shards with "
                                                     r"tools/preprocess_data.py --input .*raw --output-prefix"):
            find_shards(given)
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetFormatError, match=r"found under .*other$"):
        find_shards(tmp_path / "other")


def _flip_bit(shard, field, sample, records):
    """Flips one bit of ``sample``'s stored ``field`` in place: the file keeps its size."""
    from megatron_puffin.data.format import _field_payload

    offset = sum(_field_payload(record, field).nbytes for record in records[:sample])
    data = bytearray((shard / f"{field}.bin").read_bytes())
    data[offset] ^= 0x08
    (shard / f"{field}.bin").write_bytes(bytes(data))


@pytest.mark.parametrize("field", ["caption", "camera", "image", "key"])
def test_bytes_damaged_on_disk_are_a_bad_sample_naming_the_field(tmp_path, field):
    """A flipped bit in a stored field keeps the file's size and mostly still decodes (a caption reads as another
    word, a camera as another angle, many JPEG bits as other pixels): each sample carries a CRC-32 of each field,
    so reading it is a BadSampleError (the loader counts and skips those) naming the field, and the other samples
    read as written."""
    records = _records(12)
    shard = _write(tmp_path / "shard", records)
    sample = 3
    assert getattr(records[sample], field) not in ("", b"", None)
    _flip_bit(shard, field, sample, records)
    dataset = PuffinDataset(shard)
    with pytest.raises(BadSampleError, match=f"^field {field}: its bytes do not match their stored CRC-32"):
        dataset[sample]
    for index in set(range(len(records))) - {sample}:
        assert dataset[index]["key"] == records[index].key
    if field == "camera":  # the bulk read checks them too (it returned the damaged angle)
        with pytest.raises(BadSampleError, match=f"^sample {sample}: field camera: its bytes do not match"):
            dataset.cameras()


def test_shards_written_before_checksums_are_read_unchecked_with_a_warning(tmp_path, caplog):
    records = _records(6)
    shard = _write(tmp_path / "shard", records)
    for suffix in (".bin", ".idx"):
        (shard / f"{CHECKSUM_FIELD}{suffix}").unlink()
    manifest = json.loads((shard / "manifest.json").read_text())
    del manifest["fields"][CHECKSUM_FIELD]
    (shard / "manifest.json").write_text(json.dumps(manifest))
    _flip_bit(shard, "caption", 1, records)
    caption = sum(len(record.caption.encode()) for record in records[:2])
    with open(shard / "caption.bin", "r+b") as handle:  # sample 2's caption: not UTF-8 any more
        handle.seek(caption)
        handle.write(b"\xff\xfe")
    dataset = PuffinDataset(shard)
    assert dataset[1]["caption"] != records[1].caption  # what a shard without checksums cannot see
    with pytest.raises(UnicodeDecodeError):  # a bad sample the loader skips, as before checksums existed
        dataset[2]
    assert "1 of 1 shards" in caplog.text and "without per-sample checksums" in caplog.text


@pytest.mark.parametrize("damage, message", [
    (lambda shard: (shard / "crc.bin").write_bytes((shard / "crc.bin").read_bytes()[:-8]), "crc.bin has"),
    (lambda shard: (shard / "manifest.json").write_text((shard / "manifest.json").read_text().replace(
        '"kind": "checksum",\n      "num_bytes": ', '"kind": "checksum",\n      "num_bytes": -')), "whole numbers"),
], ids=["truncated", "manifest"])
def test_a_damaged_checksum_field_is_refused_on_open(tmp_path, damage, message):
    shard = _write(tmp_path / "shard", _records(6))
    damage(shard)
    with pytest.raises(DatasetFormatError, match=message):
        PuffinDataset(shard)
