"""Checkpoints are read without running code from them and verified against their integrity manifest.

A tiny megatron-core distributed checkpoint (a tensor, a saved object, a common value) is written through
``checkpointing.save_checkpoint``; crafted files that would create a file when unpickled (``.metadata``, a saved
object, ``common.pt``) are refused with an error naming the file and the file is not created; flipped or
truncated bytes are reported naming the file; a run directory falls back past a damaged newest checkpoint.
"""
import json
import logging
import os
import pickle
import shutil
import warnings

import pytest
import torch

import megatron_puffin.distributed as mpd
from megatron_puffin import checkpoint_safety as safety
from megatron_puffin import checkpointing as ckpt
from megatron_puffin.checkpoint_safety import CheckpointError


class CreatesFile:
    """Unpickling this calls ``open(path, "w")``: the file appears if a reader unpickles unchecked."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def process_group():
    mpd.initialize(seed=0)
    yield
    mpd.destroy()


def _sharded(weight, obj):
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    return {
        "weight": ShardedTensor.from_rank_offsets("weight", weight),
        "obj": ShardedObject("obj", obj, (1,), (0,)),
        "step": 7,
    }


def _write(directory, obj=None, iteration=1):
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4) + iteration
    ckpt.save_checkpoint(_sharded(weight, obj if obj is not None else {"lr": 0.5}), str(directory),
                         metadata={"iteration": iteration})
    return weight


def _load(directory):
    template = _sharded(torch.zeros(3, 4), None)
    return ckpt.load_checkpoint(template, str(directory))


def _forget(directory):
    ckpt._VERIFIED.discard(os.path.realpath(directory))


def test_round_trip_and_manifest(process_group, tmp_path):
    weight = _write(tmp_path / "ck")
    loaded = _load(tmp_path / "ck")
    assert loaded["weight"].equal(weight) and loaded["obj"] == {"lr": 0.5} and loaded["step"] == 7
    manifest = json.loads((tmp_path / "ck" / safety.MANIFEST_FILE).read_text())
    on_disk = sorted(os.listdir(tmp_path / "ck"))
    assert sorted(manifest["files"]) == [n for n in on_disk if n != safety.MANIFEST_FILE]
    assert {".metadata", "common.pt", "metadata.json", ckpt.META_FILE} <= set(manifest["files"])
    assert not (tmp_path / "ck.tmp").exists()


def test_crafted_metadata_is_refused_and_creates_no_file(process_group, tmp_path):
    from megatron.core import dist_checkpointing

    _write(tmp_path / "ck")
    victim = tmp_path / "created_by_metadata"
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(CreatesFile(victim)))
    safety.write_manifest(str(tmp_path / "ck"))  # an attacker can rewrite the manifest too
    with pytest.raises(CheckpointError, match=r"ck/\.metadata asks to create .*open.*refusing"):
        _load(tmp_path / "ck")
    assert ckpt.checkpoint_problems(str(tmp_path / "ck"))[0].endswith(
        "use a checkpoint written by pretrain_puffin.py or tools/convert_checkpoint.py")
    safety.install()  # megatron-core's own entry points read through the same reader
    with pytest.raises(CheckpointError, match="refusing"):
        dist_checkpointing.load_tensors_metadata(str(tmp_path / "ck"))
    assert not victim.exists()


def test_crafted_saved_object_and_common_file_are_refused(process_group, tmp_path):
    victim = tmp_path / "created_by_object"
    _write(tmp_path / "obj", obj=CreatesFile(victim))
    assert not victim.exists()
    with pytest.raises(CheckpointError, match=r"obj \(obj/shard_0_1\): a saved object is not plain data") as refused:
        _load(tmp_path / "obj")
    assert not victim.exists()
    _names_the_refusal_without_torch_advice(str(refused.value))

    _write(tmp_path / "common")
    victim = tmp_path / "created_by_common"
    torch.save({"step": CreatesFile(victim)}, tmp_path / "common" / "common.pt")
    safety.write_manifest(str(tmp_path / "common"))
    with pytest.raises(CheckpointError, match=r"common/common.pt holds objects other than plain data") as refused:
        _load(tmp_path / "common")
    assert not victim.exists()
    _names_the_refusal_without_torch_advice(str(refused.value))


def _names_the_refusal_without_torch_advice(message):
    """The refused global is named; torch's advice to retry with weights_only=False (which would run the code) and
    its links are not passed on."""
    assert "Unsupported global: GLOBAL io.open was not an allowed global by default" in message, message
    assert "weights_only" not in message and "add_safe_globals" not in message, message


def test_weights_only_failure_keeps_the_line_that_says_what_was_refused(tmp_path):
    class RunsCommand:
        def __reduce__(self):
            return os.system, ("true",)

    cases = {"torch_save": None, "plain_pickle": pickle.dumps({"w": RunsCommand()}, protocol=4),
             "random": bytes(range(256))}
    torch.save({"w": RunsCommand()}, tmp_path / "torch_save")
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    found = {}
    for name in cases:
        with pytest.raises(Exception) as caught:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.load(tmp_path / name, weights_only=True)
        found[name] = safety.weights_only_failure(caught.value)
    assert "GLOBAL posix.system" in found["torch_save"] or "Unsupported global" in found["torch_save"], found
    assert found["plain_pickle"] == "WeightsUnpickler error: Unsupported operand 149", found
    assert found["random"] and all("weights_only" not in line and "safe_globals" not in line
                                   for line in found.values()), found


def test_flipped_and_truncated_bytes_name_the_file(process_group, tmp_path):
    _write(tmp_path / "ck")
    shard = sorted(p for p in os.listdir(tmp_path / "ck") if p.endswith(".distcp"))[0]
    path = tmp_path / "ck" / shard
    data = bytearray(path.read_bytes())
    for i in range(8):
        data[len(data) // 2 + i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"ck/{shard} does not match its SHA-256"):
        _load(tmp_path / "ck")
    path.write_bytes(bytes(data[:100]))
    _forget(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=rf"ck/{shard} has 100 bytes, the manifest records {len(data)}"):
        _load(tmp_path / "ck")


def test_an_edited_or_mistyped_sidecar_is_one_checkpoint_error(process_group, tmp_path):
    """puffin_meta.json is read (to rebuild the model's flags) before the weights are verified: it is checked against
    the integrity manifest first, and its entries' types in checkpoints without one (an edited sidecar rebuilt a model
    of other flags, or raised a TypeError from a null flag group)."""
    _write(tmp_path / "ck", iteration=3)
    sidecar = tmp_path / "ck" / ckpt.META_FILE
    assert ckpt.read_metadata(str(tmp_path / "ck")) == {"iteration": 3}
    sidecar.write_text(sidecar.read_text().replace("3", "4"))  # the same size, other bytes
    with pytest.raises(CheckpointError, match=rf"{ckpt.META_FILE} does not match its SHA-256 in "
                                              rf"{safety.MANIFEST_FILE}.*use an earlier checkpoint"):
        ckpt.read_metadata(str(tmp_path / "ck"))
    (tmp_path / "ck" / safety.MANIFEST_FILE).unlink()  # written before integrity manifests: types are checked
    assert ckpt.read_metadata(str(tmp_path / "ck")) == {"iteration": 4}
    for meta, message in (({"iteration": "4"}, 'iteration holds "4", not a JSON whole number'),
                          ({"iteration": True}, "iteration holds true, not a JSON whole number"),
                          ({"args": []}, "args holds [], not a JSON object"),
                          ({"args": {"llm": None}}, "args.llm holds null, not a JSON object"),
                          ({"towers": None}, "towers holds null, not a JSON array")):
        sidecar.write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match="the checkpoint is damaged: use an earlier one") as raised:
            ckpt.read_metadata(str(tmp_path / "ck"))
        assert message in str(raised.value)


def test_a_garbled_integrity_manifest_is_one_checkpoint_error(tmp_path):
    """The manifest is read like the project's other JSON files: not JSON, not an object, or entries without a size
    and hash is one CheckpointError naming it."""
    (tmp_path / "ck").mkdir()
    manifest = tmp_path / "ck" / safety.MANIFEST_FILE
    for content, message in (("{not json", "is not valid JSON"), ("[1]", "holds an array, not a JSON object"),
                             ('{"files": {"a.distcp": 5}}', "is not a valid integrity manifest"),
                             ('{"files": {"a.distcp": {"size": "5", "sha256": "x"}}}', "is not a valid integrity")):
        manifest.write_text(content)
        with pytest.raises(CheckpointError, match=f"{safety.MANIFEST_FILE} {message}.*the checkpoint is damaged"):
            safety.read_manifest(str(tmp_path / "ck"))


def test_run_directory_falls_back_past_damaged_checkpoints(process_group, tmp_path, caplog):
    run = tmp_path / "run"
    for iteration in (2, 4, 6):
        _write(ckpt.iteration_directory(str(run), iteration), iteration=iteration)
    (run / "iter_0000006" / "common.pt").unlink()
    (run / "iter_0000004" / ckpt.META_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_checkpoint(str(run)) == str(run / "iter_0000002")
    assert "iter_0000006/common.pt is missing" in caplog.text
    # the sidecar is checked against the integrity manifest before it is parsed
    assert "iter_0000004/puffin_meta.json has 9 bytes, the manifest records" in caplog.text
    shutil.rmtree(run / "iter_0000002" / ".metadata", ignore_errors=True)
    (run / "iter_0000002" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"no usable checkpoint; the newest, .*iter_0000006, is damaged"):
        ckpt.resolve_checkpoint(str(run))


def test_replace_publishes_the_new_checkpoint_only_when_complete(process_group, tmp_path):
    _write(tmp_path / "ck", iteration=1)
    with pytest.raises(FileExistsError):
        _write(tmp_path / "ck", iteration=2)
    weight = torch.full((3, 4), 5.0)
    ckpt.save_checkpoint(_sharded(weight, {"lr": 1.0}), str(tmp_path / "ck"), metadata={"iteration": 2},
                         replace=True)
    _forget(tmp_path / "ck")
    assert _load(tmp_path / "ck")["weight"].equal(weight)
    assert sorted(os.listdir(tmp_path)) == ["ck"]
