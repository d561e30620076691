"""Undecodable samples inside a real shard at training time (pretrain_puffin.py, tiny configuration, workers on):
garbled image bytes, bad UTF-8, a bad index pointer and an infinite camera value are skipped (replaced by the next
sample that decodes), logged and written to the metrics file with shard, index and reason; a run stopped and
resumed repeats the uninterrupted run exactly; --max-bad-samples 0 stops at the first with an error naming it."""
import json
import os
import struct

import numpy as np
import pytest

from helpers.puffin import ROOT, make_tiny_dataset, run_pretrain

TINY = ROOT / "examples" / "tiny"
ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
FLAGS = [f"@{TINY / 'model.args'}", "--num-workers", "1", "--log-interval", "1", "--task-stream",
         "image2text:tiny/data/main", "--task-stream", "cam2image:tiny/data/main", "--micro-batch-size", "2",
         "--freeze-vision", "--train-iters", "6", "--lr", "1e-3", "--lr-warmup-iters", "2"]


def _field_item(shard, name, index):
    """(offset, length) in bytes of one sample's field, read from the megatron-core .idx."""
    raw = (shard / f"{name}.idx").read_bytes()
    count = struct.unpack("<Q", raw[18:26])[0]
    lengths = np.frombuffer(raw, np.int32, count, 34)
    pointers = np.frombuffer(raw, np.int64, count, 34 + 4 * count)
    itemsize = 4 if name == "camera" else 1
    return int(pointers[index]), int(lengths[index]) * itemsize


def _overwrite(path, offset, data):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_samples")
    make_tiny_dataset(root / "tiny", num_samples=16)
    shard = root / "tiny" / "data" / "main" / "shard-00000"
    # Each caught by the shard's per-sample checksums; tests/unit/test_data_format.py reads each kind in a shard
    # without them (written before they existed).
    for index in (1, 2, 3):  # garbled image bytes (same length: the shard's sizes still match its manifest)
        offset, length = _field_item(shard, "image", index)
        _overwrite(shard / "image.bin", offset, bytes(range(7, 7 + length % 200)) * (length // 200 + 1))
    for index in (4, 5):  # invalid UTF-8 in the caption
        offset, length = _field_item(shard, "caption", index)
        _overwrite(shard / "caption.bin", offset, b"\xff\xfe" * (length // 2))
    offset, _ = _field_item(shard, "camera", 6)  # an infinite roll
    _overwrite(shard / "camera.bin", offset, np.float32(np.inf).tobytes())
    count = struct.unpack("<Q", (shard / "image.idx").read_bytes()[18:26])[0]  # image pointer of sample 7 -> past the end
    _overwrite(shard / "image.idx", 34 + 4 * count + 8 * 7, struct.pack("<q", 10 ** 12))
    return root


def _run(workdir, *flags, check=True):
    return run_pretrain(workdir, *FLAGS, *flags, check=check, env=ENV)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _losses(path):
    return {r["iteration"]: {k: v for k, v in r.items() if k.startswith("loss/")} for r in _records(path)}


def test_bad_samples_are_skipped_reported_and_resume_stays_exact(workdir):
    full = _run(workdir, "--metrics-file", "full.jsonl")
    bad = [b for r in _records(workdir / "full.jsonl") for b in r.get("bad_sample_list", [])]
    assert bad, "the garbled samples were never drawn"
    reasons = " ".join(b["reason"] for b in bad)
    assert {b["shard"] for b in bad} == {"tiny/data/main/shard-00000"}  # as the stream names it
    assert {b["index"] for b in bad} <= {1, 2, 3, 4, 5, 6, 7}
    assert "CRC-32" in reasons, reasons  # the damaged bytes of samples 1-6 (the bad pointer of 7: IndexError)
    assert "bad sample skipped" in full.stderr and "shard-00000 index" in full.stderr, full.stderr[-3000:]
    assert _records(workdir / "full.jsonl")[-1]["bad_samples"] == len(bad)
    assert sorted(_losses(workdir / "full.jsonl")) == list(range(1, 7))

    _run(workdir, "--save", "run", "--exit-interval", "3", "--metrics-file", "part1.jsonl")
    _run(workdir, "--save", "run", "--load", "run", "--metrics-file", "part2.jsonl")
    resumed = {**_losses(workdir / "part1.jsonl"), **_losses(workdir / "part2.jsonl")}
    assert resumed == _losses(workdir / "full.jsonl")  # bit-identical: replacements are deterministic
    assert _records(workdir / "part2.jsonl")[-1]["bad_samples"] == len(bad)  # the count resumes too


def test_max_bad_samples_zero_stops_at_the_first_with_an_error_naming_it(workdir):
    proc = _run(workdir, "--save", "strict", "--max-bad-samples", "0", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "(--max-bad-samples 0); the last: shard" in proc.stderr and "shard-00000 index" in proc.stderr
    assert "Traceback" not in proc.stderr
    status = json.loads((workdir / "strict" / "run_status.json").read_text())
    assert (status["status"], status["reason"]) == ("failed", "--max-bad-samples")


def test_a_validation_stream_none_of_whose_samples_decodes_ends_the_run_in_one_line(workdir):
    """Every image of the validation stream's shard garbled: the run saves the step it trained, says which stream and
    sample and what to do in one line, and exits 1. It printed a worker's traceback and then hung at exit (the
    loader's workers outlived the error and ignore the SIGTERM multiprocessing sends them at exit); with the camera
    metric on (the tiny model's flags), it already stopped at start-up with a traceback."""
    import shutil

    held_out = workdir / "held_out_bad"
    shutil.copytree(workdir / "tiny" / "data" / "main", held_out)
    for images in held_out.glob("shard-*/image.bin"):
        garbled = bytearray(images.read_bytes())
        garbled[::7] = b"A" * len(garbled[::7])
        images.write_bytes(bytes(garbled))
    proc = run_pretrain(workdir, *FLAGS, "--save", "undecodable", "--valid-task-stream", f"image2text:{held_out}",
                        "--eval-interval", "2", "--eval-iters", "1", check=False, env=ENV, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "pretrain_puffin.py (rank 0): validation at iteration 2: stream image2text#0: none of its 16 samples decodes"
    ), proc.stderr[-3000:]
    # the camera metric's held-out images, read at start-up, leave each such sample out (it was an ImageError
    # traceback from the Trainer's constructor)
    assert "camera validation of image2text leaves out a sample that does not decode: shard" in proc.stderr
    status = json.loads((workdir / "undecodable" / "run_status.json").read_text())
    assert (status["status"], status["reason"], status["iteration"]) == ("failed", "validation data loader", 2)
