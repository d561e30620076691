"""The tokenizer and generation config that mcore-to-hf puts beside the exported LLM: an HF tokenizer directory is
copied so that transformers' AutoTokenizer encodes exactly as training did; a missing tokenizer is a clear error."""
import json
import os

import pytest

from megatron_puffin.convert.export import ExportError, copy_tokenizer, generation_config
from megatron_puffin.data.tokenizer import PuffinTokenizer, build_byte_level_bpe_tokenizer

CORPUS = ["A red cube on a checkered ground.", "The camera parameters (roll, pitch, and field-of-view) are: 0.1."] * 20


def test_hf_tokenizer_is_copied_and_loads_in_transformers_with_puffins_decoding(tmp_path):
    from transformers import AutoTokenizer

    source = build_byte_level_bpe_tokenizer(CORPUS, tmp_path / "tokenizer", vocab_size=300)
    output = tmp_path / "hf"
    output.mkdir()
    assert copy_tokenizer(str(source), str(output)) == ["tokenizer.json", "tokenizer_config.json"]
    ours = PuffinTokenizer(source)
    text = "<|im_start|>user\nA red cube.<|im_end|>\n"
    assert AutoTokenizer.from_pretrained(output)(text, add_special_tokens=False)["input_ids"] == ours.encode(text)

    config = generation_config(str(source))
    assert config == {"do_sample": False, "bos_token_id": None, "eos_token_id": [ours.eos_id, ours.pad_id],
                      "pad_token_id": ours.pad_id}
    json.dumps(config)  # written as generation_config.json


def test_a_missing_tokenizer_names_the_fix(tmp_path):
    with pytest.raises(ExportError, match="give --tokenizer PATH"):
        copy_tokenizer(str(tmp_path / "tiny" / "tokenizer.model"), str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="holds no tokenizer files"):
        copy_tokenizer(str(tmp_path / "empty"), str(tmp_path))


def test_the_identity_follows_the_vocabulary_not_the_file(tmp_path):
    """What checkpoints record of their tokenizer: a copy (another path, the same pieces) is the same tokenizer,
    another vocabulary is not, for both backends."""
    import shutil

    from megatron_puffin.data.tokenizer import identity_difference, train_sentencepiece_tokenizer

    hf = build_byte_level_bpe_tokenizer(CORPUS, tmp_path / "hf", vocab_size=300)
    shutil.copytree(hf, tmp_path / "hf_copy")
    other_hf = build_byte_level_bpe_tokenizer(CORPUS[:2], tmp_path / "hf_other", vocab_size=280)
    sp = train_sentencepiece_tokenizer(CORPUS, tmp_path / "sp.model", vocab_size=300)
    identities = {name: PuffinTokenizer(path).identity()
                  for name, path in (("hf", hf), ("hf_copy", tmp_path / "hf_copy"), ("other", other_hf), ("sp", sp))}
    assert identity_difference(identities["hf"], identities["hf_copy"]) is None
    assert identity_difference(identities["hf"], identities["other"]).endswith("its token ids would mean other words")
    assert identity_difference(identities["sp"], identities["hf"]) is not None
    assert identity_difference(None, identities["hf"]) is None  # a checkpoint older than the record: not checked


def test_an_export_with_another_tokenizer_than_the_training_one_is_refused(tmp_path):
    """mcore-to-hf would put another vocabulary beside the trained weights (a --tokenizer override, or the stored
    path holding another file since): one error naming both, nothing written."""
    import importlib.util

    from helpers.puffin import ROOT, tiny_run
    from megatron_puffin.data.tokenizer import train_sentencepiece_tokenizer

    other = train_sentencepiece_tokenizer(CORPUS, tmp_path / "other.model", vocab_size=300)
    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "tools" / "convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cwd = os.getcwd()
    os.chdir(tiny_run())  # the training flags' paths are relative to where training ran
    try:
        with pytest.raises(SystemExit, match=r"mcore-to-hf: --input run/iter_0000004: it was trained with the "
                                             r"tokenizer tiny/tokenizer.model \(1024 tokens, .*\), not .*other.model "
                                             r"\(\d+ tokens, .*its token ids would mean other words"):
            tool.main(["mcore-to-hf", "--input", "run", "--output", str(tmp_path / "hf"), "--tokenizer", str(other)])
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "hf").exists()
