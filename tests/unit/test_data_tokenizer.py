"""Tokenizers behind one interface (HF directory, SentencePiece) and the verbatim chat template / prompts."""
import json
import pickle

import pytest

from megatron_puffin.data import templates
from megatron_puffin.data.tokenizer import (
    PuffinTokenizer,
    TokenizerError,
    build_byte_level_bpe_tokenizer,
    train_sentencepiece_tokenizer,
)

CORPUS = [
    "A red sphere on the left stands on a grey and white checkered ground under a clear blue sky.",
    "The camera parameters (roll, pitch, and field-of-view) are: 0.1234, -0.5678, 1.4800.",
    "<think>The horizon rises towards the right.</think> <answer>0.1000, 0.2000, 0.3000</answer>",
] * 20 + list(templates.all_prompt_texts())
CHAT = "<|im_start|>user\nGenerate an image: a sphere.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    path = train_sentencepiece_tokenizer(CORPUS, tmp_path_factory.mktemp("sp") / "synthetic.model", vocab_size=400)
    return PuffinTokenizer(path)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return PuffinTokenizer(build_byte_level_bpe_tokenizer(CORPUS, tmp_path_factory.mktemp("hf"), vocab_size=350))


@pytest.mark.parametrize("kind", ["sentencepiece_tokenizer", "hf_tokenizer"])
def test_special_tokens_are_single_ids_and_text_round_trips(kind, request):
    tokenizer = request.getfixturevalue(kind)
    special = tokenizer.special_token_ids
    assert set(special) == set(templates.SPECIAL_TOKENS) and len(set(special.values())) == 6
    ids = tokenizer.encode(CHAT)
    assert ids[0] == tokenizer.im_start_id  # no BOS is added
    assert ids[-1] == tokenizer.newline_id and ids.count(tokenizer.im_end_id) == 1
    assert tokenizer.decode(ids) == CHAT
    text = "  Odd   spacing\tand ünïcode 中文\n\nend "
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nGenerate an image: a sphere.\nassistant\n"
    assert tokenizer.decode(ids + [-200, -400, -100]) == CHAT  # placeholders are dropped
    assert tokenizer.pad_id == tokenizer.endoftext_id and tokenizer.eos_id == tokenizer.im_end_id
    assert tokenizer.vocab_size > max(special.values())
    assert pickle.loads(pickle.dumps(tokenizer)).encode(CHAT) == ids


def test_hf_directory_special_ids_are_resolved_from_the_directory(tmp_path, hf_tokenizer):
    table = json.loads((hf_tokenizer.path / "tokenizer.json").read_text())
    added = {token["content"]: token["id"] for token in table["added_tokens"]}
    assert hf_tokenizer.im_start_id == added["<|im_start|>"]
    assert hf_tokenizer.image_pad_id == added["<|image_pad|>"]
    assert hf_tokenizer.encode("<|vision_start|><|image_pad|><|image_pad|><|vision_end|>") == [
        added["<|vision_start|>"], added["<|image_pad|>"], added["<|image_pad|>"], added["<|vision_end|>"]]


def test_unusable_paths_and_missing_special_tokens_fail_clearly(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        PuffinTokenizer(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        PuffinTokenizer(tmp_path)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel()
    plain.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="lacks the chat special tokens"):
        PuffinTokenizer(tmp_path)


def test_templates_are_the_spec_strings():
    assert templates.INSTRUCTION_TEMPLATE == "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
    assert (templates.INPUT_IMAGE_TOKEN_INDEX, templates.QUERY_TOKEN_INDEX, templates.IGNORE_INDEX) == (-200, -400, -100)
    assert len(templates.CAPTION_PROMPT_HEADS) == len(templates.CROSS_VIEW_PROMPT_TAILS) == 13
    assert templates.caption_prompt(0) == (
        "Describe the image in detail. Then reason its spatial distribution and estimate its camera parameters "
        "(roll, pitch, and field-of-view).")
    assert templates.CAPTION_PROMPT_HEADS[5] == (
        "Imagine you are giving a detailed tour of the image's scene. How would you describe it?")
    assert templates.cross_view_prompt(12, "CAM") == (
        "Given the initial view and the camera parameters of the target view with the deviation yaw angle, catalog "
        "all visible elements in the target image and describe their significance to the overall scene. CAM")
    assert templates.GENERATION_CROSS_TEMPLATE.format(input="x") == (
        "Generate a target image given an initial view: x")


def test_retraining_into_the_same_file_keeps_a_different_previous_tokenizer(tmp_path, caplog):
    """A re-run with the same texts writes the same bytes (no copy kept); other texts keep the previous model
    beside the new one, which still loads, with a warning naming it."""
    path = tmp_path / "tok" / "synthetic.model"
    first = train_sentencepiece_tokenizer(CORPUS, path, vocab_size=400).read_bytes()
    train_sentencepiece_tokenizer(CORPUS, path, vocab_size=400)
    assert path.read_bytes() == first and sorted(p.name for p in path.parent.iterdir()) == ["synthetic.model"]
    with caplog.at_level("WARNING"):
        train_sentencepiece_tokenizer(CORPUS, path, vocab_size=360)
    kept = [p for p in path.parent.iterdir() if p != path]
    assert len(kept) == 1 and kept[0].name.startswith("synthetic.previous-") and kept[0].suffix == ".model"
    assert kept[0].read_bytes() == first and path.read_bytes() != first
    assert PuffinTokenizer(kept[0]).vocab_size != PuffinTokenizer(path).vocab_size
    assert f"the previous one is kept as {kept[0]}" in caplog.text
