"""tools/preprocess_data.py end to end: bad-sample fixture, exact per-reason counts, --strict, resume, read-only input."""
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from helpers.faults import file_size_limit_in_child
from helpers.puffin import run_script
from megatron_puffin.data.format import PuffinDataset
from megatron_puffin.data.preprocess import PreprocessOptions, preprocess
from megatron_puffin.data.synthetic import SyntheticOptions, make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "preprocess_data.py"
EXPECTED_BAD = {"image_unreadable": 1, "image_empty": 1, "caption_missing": 1, "camera_non_finite": 1,
                "caption_bad_json": 1, "camera_unparsable": 1, "init_image_missing": 1, "image_too_small": 1,
                "camera_yaw_missing": 1}


def _caption_path(root, index, folder="cap_folder"):
    return root / folder / f"000000/{index:08d}.json"


def _image_path(root, index, folder="local_folder"):
    return root / folder / f"000000/{index:08d}.jpg"


def _break_samples(raw):
    """Main samples 0-6 and cross-view samples 1-2 become bad, one reason each."""
    data = _image_path(raw, 0).read_bytes()
    _image_path(raw, 0).write_bytes(data[: len(data) // 2])  # truncated JPEG
    _image_path(raw, 1).write_bytes(b"")  # zero-byte image
    _caption_path(raw, 2).unlink()  # missing caption
    text = json.loads(_caption_path(raw, 3).read_text())["caption"]
    head = text[: text.index("are:") + 4]
    _caption_path(raw, 3).write_text(json.dumps({"caption": head + " nan, 0.1000, 1.0000."}))  # NaN camera
    _caption_path(raw, 4).write_text('{"caption": "unterminated')  # bad JSON
    _caption_path(raw, 5).write_text(json.dumps({"caption": head + " level, steep, wide."}))  # unparsable camera
    buffer = io.BytesIO()
    Image.new("RGB", (60, 120), "red").save(buffer, format="JPEG")
    _image_path(raw, 6).write_bytes(buffer.getvalue())  # too small (side <= 80)
    _image_path(raw / "cross_view", 1, "local_folder_init").unlink()  # missing initial view
    cross = json.loads(_caption_path(raw / "cross_view", 2).read_text())["caption"]
    without_yaw = cross[: cross.index(" The deviation of the camera yaw angle")]
    _caption_path(raw / "cross_view", 2).write_text(json.dumps({"caption": without_yaw}))  # yaw sentence dropped


def _digest(root, with_times=False):
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
        if with_times:
            digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # the real command, forked from the suite's pre-imported server (helpers.puffin.run_script)
    return run_script(TOOL, *args, cwd=os.getcwd(), env=env, check=False, timeout=120)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw") / "training_data"
    make_synthetic_dataset(SyntheticOptions(root, num_samples=14, image_size=96, seed=2, num_cross_view=5,
                                            num_photography=2, supersample=1))
    _break_samples(root)
    return root


def test_bad_samples_are_counted_per_reason_and_every_good_sample_is_kept(raw, tmp_path):
    before = _digest(raw, with_times=True)
    result = _run("--input", raw, "--output-prefix", tmp_path / "out", "--workers", 2, "--shard-size", 5)
    assert result.returncode == 0, result.stderr
    assert "samples/s" in result.stderr + result.stdout  # progress bar and report show the rate
    report = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert report["bad_samples"] == dict(sorted(EXPECTED_BAD.items()))
    assert report["subsets"]["main"]["samples"] == 14 - 7 and report["subsets"]["cross_view"]["samples"] == 3
    assert report["subsets"]["photography"]["samples"] == 2
    main = PuffinDataset(tmp_path / "out" / "main")
    assert sorted(main[i]["key"] for i in range(len(main))) == [f"main/000000/{i:08d}.json" for i in range(7, 14)]
    assert main.bad_sample_counts() == {k: v for k, v in EXPECTED_BAD.items()
                                        if k not in ("init_image_missing", "camera_yaw_missing")}
    for index in range(len(main)):
        sample = main[index]
        source = json.loads((raw / "cap_folder" / sample["key"][len("main/"):]).read_text())["caption"]
        assert source.startswith(sample["caption"] + " The camera parameters")
        assert sample["image"] == (raw / "local_folder" / sample["key"][len("main/"):].replace(".json", ".jpg")).read_bytes()
        assert sample["reasoning"] and sample["camera"] is not None
    cross = PuffinDataset(tmp_path / "out" / "cross_view")
    assert all(cross[i]["camera"].yaw is not None and cross[i]["image_init"] for i in range(len(cross)))
    assert _digest(raw, with_times=True) == before  # the input is never modified

    # resume: a missing shard is rebuilt identically, finished shards are skipped; shard 0 (records 0-4, all bad)
    # holds no sample, so its records are read again (the input may have been fixed since)
    rebuilt = tmp_path / "out" / "main" / "shard-00001"
    original = _digest(rebuilt)
    shutil.rmtree(rebuilt)
    again = preprocess(PreprocessOptions(raw, tmp_path / "out", workers=1, shard_size=5, progress=False))
    assert again["subsets"]["main"]["shards"] == 2 and again["subsets"]["main"]["shards_skipped"] == 1
    assert again["records_processed"] == 10 and again["bad_samples"] == report["bad_samples"]
    assert _digest(rebuilt) == original
    with pytest.raises(ValueError, match="other flags"):
        preprocess(PreprocessOptions(raw, tmp_path / "out", shard_size=4, progress=False))


def test_a_subset_without_a_good_sample_fails_and_a_changed_summary_is_never_taken_for_done(raw, tmp_path):
    """A summary written on Windows ('000000\\x.json') made every main record a bad sample: the tool said
    "samples 0" and exited 0, and after the summary was fixed the same command kept the empty shard ("already
    done"), as it kept any shard whose summary records had changed."""
    source = tmp_path / "training_data"
    shutil.copytree(raw, source)
    summary = json.loads((source / "summary.json").read_text())
    windows = [{key: value.replace("/", "\\") for key, value in record.items()} for record in summary]
    (source / "summary.json").write_text(json.dumps(windows))
    result = _run("--input", source, "--output-prefix", tmp_path / "out", "--workers", 2)
    assert result.returncode == 1, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: main: none of its 14 summary records gave a sample (14 caption_missing; e.g. ")
    assert "the summary's paths hold '\\': separate folders with '/'" in line and "run the same command again" in line
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["subsets"]["main"]["samples"] == 0

    (source / "summary.json").write_text(json.dumps(summary))  # fixed: the empty shard is made again
    result = _run("--input", source, "--output-prefix", tmp_path / "out", "--workers", 2)
    assert result.returncode == 0, result.stderr
    assert len(PuffinDataset(tmp_path / "out" / "main")) == 14 - 7
    assert "main         records        14  samples         7  shards 1 new + 0 already done" in result.stdout

    summary[9]["image"] = summary[10]["image"]  # a shard with samples, built from records that changed since
    (source / "summary.json").write_text(json.dumps(summary))
    result = _run("--input", source, "--output-prefix", tmp_path / "out")
    assert result.returncode == 2
    assert f"error: {tmp_path / 'out' / 'main' / 'shard-00000'} was built from summary records 0-13 of main as " \
           "they were before: the summary has changed since; delete" in result.stderr


def test_strict_stops_at_the_first_bad_sample_naming_file_and_reason(raw, tmp_path):
    result = _run("--input", raw, "--output-prefix", tmp_path / "out", "--strict")
    assert result.returncode == 1
    assert str(raw / "local_folder" / "000000" / "00000000.jpg") in result.stderr  # main subset comes first
    assert "image_unreadable" in result.stderr and "truncated" in result.stderr


def test_limit_and_max_image_size(raw, tmp_path):
    report = preprocess(PreprocessOptions(raw, tmp_path / "out", limit=9, max_image_size=96, progress=False))
    assert report["subsets"]["main"]["records"] == 9 and report["subsets"]["main"]["samples"] == 2
    big = tmp_path / "big"
    make_synthetic_dataset(SyntheticOptions(big, num_samples=2, image_size=128, seed=0, num_cross_view=0,
                                            num_photography=0, supersample=1))
    preprocess(PreprocessOptions(big, tmp_path / "big_out", max_image_size=100, progress=False))
    image = Image.open(io.BytesIO(PuffinDataset(tmp_path / "big_out")[0]["image"]))
    assert image.size == (100, 100)
    with pytest.raises(ValueError, match="must not lie inside --input"):
        preprocess(PreprocessOptions(raw, raw / "out"))


def test_duplicate_records_and_paths_outside_the_input_are_skipped_and_reported(raw, tmp_path):
    copy = tmp_path / "training_data"
    shutil.copytree(raw, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary += [dict(summary[9]), {"image": "../../outside.jpg", "annotation": "000000/99999999.json"},
                {"image": "000000/00000010.jpg", "annotation": "/etc/hostname"}]
    (copy / "summary.json").write_text(json.dumps(summary))
    report = preprocess(PreprocessOptions(copy, tmp_path / "out", workers=1, shard_size=5, progress=False))
    assert report["subsets"]["main"]["bad_samples"]["duplicate_record"] == 1
    assert report["subsets"]["main"]["bad_samples"]["path_outside_input"] == 2
    assert report["subsets"]["main"]["samples"] == 14 - 7  # the three extra records add no sample
    assert len(PuffinDataset(tmp_path / "out" / "main")) == 7
    # a bad record has no file of its own: the report's example names the record
    assert sorted(report["bad_sample_examples"]["path_outside_input"]) == [
        f"{copy}: annotation '/etc/hostname' leaves the subset folder",
        f"{copy}: image '../../outside.jpg' leaves the subset folder"]


def test_a_second_run_into_the_same_output_prefix_stops_naming_the_first(raw, tmp_path):
    """Two runs into one --output-prefix (a job submitted twice) removed each other's shard staging folders mid-write,
    and one could publish the other's half-written shard. The first run holds a lock in the output prefix (removed
    at its end); this process plays it (a lock is per open file). The real command stops with one line, exit 2,
    writing nothing; once free, it runs and leaves no lock file."""
    from megatron_puffin.data.preprocess import LOCK_NAME
    from megatron_puffin.files import lock_path

    out = tmp_path / "out"
    held = lock_path(out / LOCK_NAME)
    try:
        proc = _run("--input", raw, "--output-prefix", out, "--no-progress")
    finally:
        held.release()
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith(f"error: --output-prefix {out} is being written by another "
                                          f"preprocess_data.py run (pid {os.getpid()} on "), proc.stderr
    assert sorted(path.name for path in out.iterdir()) == [LOCK_NAME]  # the stand-in holder's file only
    (out / LOCK_NAME).unlink()
    assert _run("--input", raw, "--output-prefix", out, "--no-progress").returncode == 0
    assert (out / "dataset.json").is_file() and not (out / LOCK_NAME).exists()


def test_heldout_records_split_off_the_last_records_of_every_subset(raw, tmp_path):
    report = preprocess(PreprocessOptions(raw, tmp_path / "out", shard_size=5, heldout_records=3, progress=False))
    subsets = report["subsets"]
    assert (subsets["main"]["records"], subsets["heldout/main"]["records"]) == (11, 3)
    assert (subsets["cross_view"]["records"], subsets["heldout/cross_view"]["records"]) == (2, 3)
    main, heldout = PuffinDataset(tmp_path / "out" / "main"), PuffinDataset(tmp_path / "out" / "heldout" / "main")
    assert sorted(heldout[i]["key"] for i in range(len(heldout))) == [f"main/000000/{i:08d}.json" for i in (11, 12, 13)]
    assert max(main[i]["key"] for i in range(len(main))) == "main/000000/00000010.json"  # no overlap
    again = preprocess(PreprocessOptions(raw, tmp_path / "out", shard_size=5, heldout_records=3, progress=False))
    # only main's shard 0 (records 0-4, all bad samples, so it holds none) is read again
    assert again["records_processed"] == 5 and again["subsets"]["heldout/main"]["shards_skipped"] == 1
    assert again["subsets"]["main"]["shards_skipped"] == 2
    with pytest.raises(ValueError, match="other flags"):  # another split must not mix with this output
        preprocess(PreprocessOptions(raw, tmp_path / "out", shard_size=5, heldout_records=4, progress=False))
    result = _run("--input", raw, "--output-prefix", tmp_path / "cli", "--heldout-records", "-1")
    assert result.returncode == 2 and "--heldout-records (-1) must be >= 0" in result.stderr
    (tmp_path / "a_file").write_text("")  # shards under a file: one line before any work, not a traceback
    with pytest.raises(ValueError, match="a_file is a file, not a folder"):
        preprocess(PreprocessOptions(raw, tmp_path / "a_file" / "out", progress=False))


def test_a_write_failure_is_one_line_leaves_no_half_shard_and_the_same_command_finishes(raw, tmp_path):
    import subprocess
    import sys

    command = [sys.executable, str(TOOL), "--input", str(raw), "--output-prefix", str(tmp_path / "out"),
               "--no-progress", "--workers", "1", "--shard-size", "4"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                          preexec_fn=file_size_limit_in_child(5_000))  # smaller than a shard's images
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].startswith(f"error: writing under --output-prefix {tmp_path / 'out'} failed "
                                                   "(File too large"), proc.stderr[-3000:]
    assert error[0].endswith("the finished shards are kept: fix that and run the same command again, it redoes "
                             "only the unfinished shards"), error[0]
    assert not list((tmp_path / "out").rglob("*.tmp")), "a half-written shard was left behind"

    subprocess.run(command, check=True, capture_output=True, env=env, timeout=300)
    preprocess(PreprocessOptions(raw, tmp_path / "clean", workers=1, shard_size=4, progress=False))
    for subset in ("main", "cross_view", "photography"):
        finished, clean = PuffinDataset(tmp_path / "out" / subset), PuffinDataset(tmp_path / "clean" / subset)
        assert [finished[i]["key"] for i in range(len(finished))] == [clean[i]["key"] for i in range(len(clean))]


def _start_two_worker_run_and_stop_it_after_the_first_shard(tmp_path):
    """preprocess_data.py with two workers on 160 samples in shards of 4, its process group stopped (SIGSTOP) as
    soon as the first shard is published, so what the caller does next lands while later shards are written.
    Returns the process (continue it with SIGCONT to its group) and its command."""
    import signal
    import subprocess
    import sys

    raw = tmp_path / "raw"
    make_synthetic_dataset(SyntheticOptions(raw, num_samples=160, image_size=96, seed=3, num_cross_view=0,
                                            num_photography=0, supersample=1, workers=1))
    command = [sys.executable, str(TOOL), "--input", str(raw), "--output-prefix", str(tmp_path / "out"),
               "--no-progress", "--workers", "2", "--shard-size", "4"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_TOOL_ENV,
                            start_new_session=True)
    first = tmp_path / "out" / "main" / "shard-00000"
    while not first.is_dir():
        assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGSTOP)
    assert proc.poll() is None, "the run ended before the interrupt"
    return proc, command


def _the_same_command_finishes_the_shards(tmp_path, command):
    import subprocess

    assert not list((tmp_path / "out").rglob("*.tmp")), "a half-written shard was left behind"
    done = sorted(p.name for p in (tmp_path / "out" / "main").iterdir())
    assert 1 <= len(done) < 40, done
    subprocess.run(command, check=True, capture_output=True, env=_TOOL_ENV, timeout=300)
    preprocess(PreprocessOptions(tmp_path / "raw", tmp_path / "clean", workers=1, shard_size=4, progress=False))
    finished, clean = PuffinDataset(tmp_path / "out" / "main"), PuffinDataset(tmp_path / "clean" / "main")
    assert [finished[i]["key"] for i in range(len(finished))] == [clean[i]["key"] for i in range(len(clean))]


_TOOL_ENV = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")


@pytest.mark.parametrize("signal_name, status, said", [
    ("SIGINT", 130, "interrupted (Ctrl-C)"),
    ("SIGTERM", 143, "stopped by SIGTERM"),
])
def test_ctrl_c_with_workers_is_one_line_leaves_no_half_shard_and_the_same_command_finishes(tmp_path, signal_name,
                                                                                          status, said):
    """A terminal's Ctrl-C (SIGINT to the whole process group: the tool and its pool workers), or a scheduler's
    SIGTERM to the job's processes, delivered mid-run: the group is stopped (SIGSTOP) as soon as the first shard
    is published, signalled, and continued, so the signal lands while later shards are being written. Before, the
    tool and every worker printed a KeyboardInterrupt traceback on Ctrl-C, and SIGTERM ended the tool without a
    word; later, a CI run of this case hung while the tool ended its ``multiprocessing`` pool (the deadlock
    tests/unit/test_tool_pool.py reproduces)."""
    import signal

    proc, command = _start_two_worker_run_and_stop_it_after_the_first_shard(tmp_path)
    os.killpg(proc.pid, getattr(signal, signal_name))
    if signal_name == "SIGTERM":  # a second one, as a scheduler's kill-after does: the same one line
        os.killpg(proc.pid, signal.SIGTERM)
    os.killpg(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == status, (out[-2000:], err[-3000:])
    assert err.strip().splitlines() == [
        f"preprocess_data.py: {said}; the finished shards are kept and the half-written one removed: "
        "run the same command again, it writes only the unfinished shards"], err[-3000:]
    _the_same_command_finishes_the_shards(tmp_path, command)


def test_a_killed_worker_is_one_line_leaves_no_half_shard_and_the_same_command_finishes(tmp_path):
    """A worker killed mid-run (the out-of-memory killer, ``kill -9``): before, the pool started a new worker and
    waited forever for the lost chunk's result."""
    import signal
    import subprocess

    proc, command = _start_two_worker_run_and_stop_it_after_the_first_shard(tmp_path)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[0]), signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err, (out[-2000:], err[-3000:])
    assert err.strip().splitlines() == [
        "error: a worker process died while it held work (killed by the out-of-memory killer or a signal); the "
        "finished shards are kept and the half-written one removed: run the same command again (with fewer "
        "--workers if the machine ran out of memory), it writes only the unfinished shards"], err[-3000:]
    _the_same_command_finishes_the_shards(tmp_path, command)


@pytest.mark.parametrize("tool, flags", [
    ("preprocess_data.py", ["--input", "RAW", "--output-prefix", "OUT"]),
    ("make_synthetic_dataset.py", ["--output", "OUT", "--num-samples", "2"]),
])
def test_a_torchrun_launch_of_a_one_process_tool_is_one_line_and_writes_nothing(raw, tmp_path, tool, flags):
    """Two copies would write the same shards, racing on every file: each says so (unless the launcher stops it
    first, on the other's exit) and exits before any work."""
    args = [str(raw) if a == "RAW" else str(tmp_path / "out") if a == "OUT" else a for a in flags]
    proc = run_script(ROOT / "tools" / tool, *args, cwd=tmp_path, nproc=2, check=False,
                      env=dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines and all(f"{tool} runs as one process" in line and "WORLD_SIZE=2" in line
                                   for line in lines), proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
