"""tools/convert_checkpoint.py refuses bad inputs with one line naming the input, before any work, and never runs
code from a file: random bytes, a pickle that would create a file, an empty HF directory, an existing output
directory, TP=2 in one process, and a crafted ``.metadata`` in a distributed checkpoint (mcore-to-hf)."""
import functools
import importlib.util
import pickle
from pathlib import Path

import pytest

from helpers.faults import file_size_limit
from helpers.llm import hf_qwen2, tiny_llm_config

ROOT = Path(__file__).resolve().parents[2]
TOOL = str(ROOT / "tools" / "convert_checkpoint.py")
TINY = ROOT / "examples" / "tiny"


@functools.lru_cache(maxsize=None)
def _tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_inputs_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CreatesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _main(capsys, *argv):
    """(exit code, stderr) of convert_checkpoint's main(); a UsageError (SystemExit) counts as exit 1."""
    try:
        code = _tool().main([str(a) for a in argv])
    except SystemExit as error:
        return 1, str(error.code)
    return code, capsys.readouterr().err


def _one_line(text):
    lines = [line for line in text.strip().splitlines() if line]
    assert len(lines) == 1, text
    # torch's own advice on a refused file is to load it again with weights_only=False: never passed on
    assert "weights_only=False" not in text and "set to `False`" not in text and "Traceback" not in text
    return lines[0]


def test_bad_weight_files(tmp_path, capsys):
    (tmp_path / "random.pth").write_bytes(bytes(range(256)) * 7)
    code, err = _main(capsys, "radio-to-mcore", "--radio-checkpoint", tmp_path / "random.pth", "--output",
                      tmp_path / "out", "--", f"@{TINY / 'model.args'}")
    assert code == 1 and "random.pth is not a torch checkpoint of plain tensors" in _one_line(err)

    victim = tmp_path / "created_by_pth"
    import torch

    torch.save({"weight": CreatesFile(victim)}, tmp_path / "code.pth")
    code, err = _main(capsys, "puffin-to-mcore", "--puffin-checkpoint", tmp_path / "code.pth", "--output",
                      tmp_path / "out", "--", f"@{TINY / 'model.args'}")
    assert code == 1
    assert "code.pth is not a torch checkpoint of plain tensors (WeightsUnpickler error: Unsupported global" in \
        _one_line(err)
    assert not victim.exists() and not (tmp_path / "out").exists()
    # The same object as a plain pickle (protocol 4, not torch.save's format): refused on its opcode, in one line
    (tmp_path / "pickled.pth").write_bytes(pickle.dumps({"weight": CreatesFile(victim)}, protocol=4))
    code, err = _main(capsys, "puffin-to-mcore", "--puffin-checkpoint", tmp_path / "pickled.pth", "--output",
                      tmp_path / "out", "--", f"@{TINY / 'model.args'}")
    assert code == 1 and "(WeightsUnpickler error: Unsupported operand 149)" in _one_line(err)
    assert not victim.exists() and not (tmp_path / "out").exists()

    # Text and empty files reach torch's legacy reader (was "(101)", the KeyError of the byte 'e'), and a garbled
    # .safetensors file was reported as a failure to write --output, with the free space of its file system
    (tmp_path / "text.pth").write_text("hello\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "random.safetensors").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "model-00001.safetensors").write_bytes(b"\x08" + bytes(15))
    for name, message in (("text.pth", "text.pth is not a torch checkpoint of plain tensors (not a file torch.save "
                                       "wrote: KeyError 101)"),
                          ("empty.pth", "empty.pth is not a torch checkpoint of plain tensors (not a file torch.save "
                                        "wrote: EOFError at the end of the file)"),
                          ("random.safetensors", "random.safetensors is not a readable safetensors file ("),
                          ("shards", "model-00001.safetensors is not a readable safetensors file (")):
        code, err = _main(capsys, "radio-to-mcore", "--radio-checkpoint", tmp_path / name, "--output",
                          tmp_path / "out", "--", f"@{TINY / 'model.args'}")
        assert code == 1 and message in _one_line(err) and "was not published" not in err, err
    assert not (tmp_path / "out").exists()


def test_bad_directories_and_layouts(tmp_path, capsys):
    import torch

    (tmp_path / "empty").mkdir()
    code, err = _main(capsys, "hf-to-mcore", "--hf-dir", tmp_path / "empty", "--output", tmp_path / "out")
    assert code == 1 and _one_line(err).endswith("empty has no config.json; pass a Hugging Face model directory")
    (tmp_path / "empty" / "config.json").write_text("{}")
    code, err = _main(capsys, "hf-to-mcore", "--hf-dir", tmp_path / "empty", "--output", tmp_path / "out")
    assert code == 1 and "has no *.safetensors or *pytorch_model*.bin weights" in _one_line(err)

    # was a traceback (ValueError / KeyError from the config), or a list of missing q/k/v biases for a Llama folder
    import json

    for config, message in (({"model_type": "llama"}, "config.json says model_type 'llama': not a Qwen2 / Qwen2.5"),
                            ({"model_type": "qwen2", "rope_scaling": {"type": "yarn"}},
                             "unsupported Qwen2 config options: rope_scaling="),
                            ({"model_type": "qwen2"}, "config.json lacks 'num_attention_heads'")):
        (tmp_path / "other").mkdir(exist_ok=True)
        (tmp_path / "other" / "config.json").write_text(json.dumps(config))
        torch.save({"w": torch.zeros(1)}, tmp_path / "other" / "pytorch_model.bin")
        code, err = _main(capsys, "hf-to-mcore", "--hf-dir", tmp_path / "other", "--output", tmp_path / "out")
        assert code == 1 and message in _one_line(err), err
    # the same for sd3-to-mcore; diffusers names its .bin files diffusion_pytorch_model*.bin (were not looked for)
    (tmp_path / "other" / "pytorch_model.bin").rename(tmp_path / "other" / "diffusion_pytorch_model.bin")
    for config, message in (({"_class_name": "UNet2DModel"}, "config.json describes a UNet2DModel, not an SD3"),
                            ({"_class_name": "SD3Transformer2DModel", "num_layers": 2},
                             "its weights do not fit its config.json: diffusers -> mcore: 1 unmatched tensor(s): w;")):
        (tmp_path / "other" / "config.json").write_text(json.dumps(config))
        code, err = _main(capsys, "sd3-to-mcore", "--transformer-dir", tmp_path / "other", "--output", tmp_path / "out")
        assert code == 1 and message in _one_line(err), err

    (tmp_path / "exists").mkdir()
    code, err = _main(capsys, "mcore-to-hf", "--input", tmp_path / "empty", "--output", tmp_path / "exists")
    assert code == 2 and "--output" in err and "already exists" in _one_line(err)
    (tmp_path / "a_file").write_text("")
    code, err = _main(capsys, "mcore-to-hf", "--input", tmp_path / "empty", "--output", tmp_path / "a_file" / "x" / "y")
    assert code == 2 and _one_line(err).endswith(
        "a_file is a file, not a folder; choose a path under a folder this job can write")
    code, err = _main(capsys, "sd3-to-mcore", "--transformer-dir", tmp_path / "empty", "--output", tmp_path / "o2",
                      "--tensor-model-parallel-size", "2")
    assert code == 2 and "needs 2 processes" in _one_line(err) and "torchrun --nproc-per-node 2" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o2").exists()


def test_crafted_metadata_in_a_converted_checkpoint_is_refused(tmp_path, capsys):
    from megatron_puffin.checkpoint_safety import write_manifest

    hf_qwen2(tiny_llm_config(tied=True), seed=1).save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert _main(capsys, "hf-to-mcore", "--hf-dir", tmp_path / "hf", "--output", tmp_path / "ckpt")[0] == 0
    victim = tmp_path / "created_by_metadata"
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(CreatesFile(victim)))
    write_manifest(str(tmp_path / "ckpt"))
    code, err = _main(capsys, "mcore-to-hf", "--input", tmp_path / "ckpt", "--output", tmp_path / "hf_out")
    assert code == 1 and "ckpt/.metadata asks to create" in _one_line(err)
    assert not victim.exists() and not (tmp_path / "hf_out").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_converted_checkpoint_names_the_file(tmp_path, capsys, damage):
    hf_qwen2(tiny_llm_config(tied=True), seed=1).save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert _main(capsys, "hf-to-mcore", "--hf-dir", tmp_path / "hf", "--output", tmp_path / "ckpt")[0] == 0
    shard = sorted((tmp_path / "ckpt").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data if damage == "flip" else data[: len(data) // 2]))
    code, err = _main(capsys, "mcore-to-hf", "--input", tmp_path / "ckpt", "--output", tmp_path / "hf_out")
    line = _one_line(err)
    assert code == 1 and shard.name in line
    assert ("SHA-256" if damage == "flip" else "the manifest records") in line


@pytest.mark.parametrize("command", ["hf-to-mcore", "mcore-to-hf"])
def test_a_write_failure_is_one_line_and_publishes_nothing(tmp_path, capsys, command):
    hf_qwen2(tiny_llm_config(tied=True), seed=1).save_pretrained(tmp_path / "hf", safe_serialization=True)
    if command == "hf-to-mcore":
        argv = ["hf-to-mcore", "--hf-dir", tmp_path / "hf", "--output", tmp_path / "out"]
    else:
        assert _main(capsys, "hf-to-mcore", "--hf-dir", tmp_path / "hf", "--output", tmp_path / "ckpt")[0] == 0
        argv = ["mcore-to-hf", "--input", tmp_path / "ckpt", "--output", tmp_path / "out"]
    with file_size_limit(200_000):  # below the 1.2 MB of weights
        code, err = _main(capsys, *argv)
    line = _one_line(err)
    assert code == 1 and line.endswith(f"--output {tmp_path / 'out'} was not published (outputs appear whole or not "
                                       "at all): fix that and run the same command again"), line
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if ".partial" in p.name] == []
    assert _main(capsys, *argv)[0] == 0  # the same command, without the limit


def test_weights_of_another_size_than_config_json_are_one_line(tmp_path, capsys):
    """A folder mixing two models (config.json of one size, weights of another): was megatron-core's multi-line
    size-mismatch traceback, or a reshape error inside the conversion."""
    import json

    hf_qwen2(tiny_llm_config(tied=True), seed=1).save_pretrained(tmp_path / "hf", safe_serialization=True)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "hidden_size": config["hidden_size"] * 2,
                                                              "intermediate_size": config["intermediate_size"]}))
    code, err = _main(capsys, "hf-to-mcore", "--hf-dir", tmp_path / "hf", "--output", tmp_path / "out")
    line = _one_line(err)
    assert code == 1 and "hf: its weights do not fit its config.json: " in line, line
    assert "tensor(s) of the weights do not fit the model their config describes" in line
    assert "embedding.word_embeddings.weight" in line and not (tmp_path / "out").exists()
