"""tools/check_data.py: every sample of a dataset read as training reads it, each damaged one named, before a run."""
import numpy as np
import pytest

from helpers.puffin import ROOT, make_tiny_dataset, run_script
from megatron_puffin.data.format import PuffinDataset

TOOL = ROOT / "tools" / "check_data.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("check_data"))["data"]


def _damage_caption(shard, sample):
    """Flips one bit of ``sample``'s caption: the file keeps its size, the text still decodes (another word)."""
    dataset = PuffinDataset(str(shard))  # kept while its memory-mapped index is read
    offset = int(np.sum(dataset.shards[0].fields()["caption"].sequence_lengths[:sample]))
    del dataset
    data = bytearray((shard / "caption.bin").read_bytes())
    data[offset] ^= 0x02
    (shard / "caption.bin").write_bytes(bytes(data))


def test_a_clean_dataset_exits_0_and_counts_what_it_read(data):
    proc = run_script(TOOL, "--data", data, "--no-progress", check=False)
    samples = len(PuffinDataset(data))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith(f"checked {samples} samples in "), proc.stdout
    assert ": 0 damaged sample(s), 0 unreadable shard(s) or path(s)" in proc.stdout


def test_each_damaged_sample_and_unreadable_shard_is_one_line_and_exit_1(data, tmp_path):
    """A flipped caption bit (same file size, still UTF-8: training would read another word without the checksum),
    a truncated shard, and a path given twice (its shards read once), with two workers through the real command."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    shards = sorted(copy.glob("*/shard-*"))
    damaged, truncated = shards[0], shards[-1]
    _damage_caption(damaged, 2)
    camera = truncated / "camera.bin"
    camera.write_bytes(camera.read_bytes()[:-4])
    proc = run_script(TOOL, "--data", copy, damaged, "--workers", 2, "--no-progress", check=False)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr[-3000:]
    assert f"shard {damaged} index 2: BadSampleError: field caption: its bytes do not match their stored CRC-32 " \
           "(damaged on disk)" in lines, lines
    assert any(line.startswith(f"shard {truncated}: cannot be read (DatasetFormatError:") for line in lines), lines
    assert f"in {len(shards)} shard(s): 1 damaged sample(s), 1 unreadable shard(s)" in lines[-1], lines[-1]
    assert "copy the shards named above again" in lines[-1]


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "error: --workers (0) must be >= 1"),
    (["--data", "/nonexistent/data"], "error: --data /nonexistent/data does not exist"),
])
def test_flag_mistakes_are_one_line_and_exit_2(data, flags, message):
    proc = run_script(TOOL, *(["--data", data] if "--data" not in flags else []), *flags, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == message, (proc.returncode, proc.stderr[-2000:])
