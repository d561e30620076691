"""The tokenizer and generation config that mcore-to-hf puts beside the exported LLM: an HF tokenizer directory is
copied so that transformers' AutoTokenizer encodes exactly as training did; a missing tokenizer is a clear error."""
import json

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
