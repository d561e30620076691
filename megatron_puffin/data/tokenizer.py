"""One tokenizer interface over an HF tokenizer directory (Qwen2.5's) or a SentencePiece model.

Puffin never adds a BOS token (docs/puffin.md §1.2): :meth:`PuffinTokenizer.encode` returns the plain token ids of a text,
with the chat special tokens (``<|im_start|>`` ...) recognised as single tokens wherever they appear. The
generation pad token is ``<|endoftext|>``; understanding batches pad with 0 (see :mod:`.templates`).

Two helpers build tokenizers locally so that nothing is downloaded: :func:`train_sentencepiece_tokenizer` (the
synthetic dataset's tokenizer) and :func:`build_byte_level_bpe_tokenizer` (a tiny HF tokenizer directory with the
Qwen special tokens, used by tests of the HF path).
"""
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from megatron_puffin.data import templates

logger = logging.getLogger(__name__)

SENTENCEPIECE_EXTRA_SYMBOLS = ("\n", "<think>", "</think>", "<answer>", "</answer>")
"""Single-token symbols added to synthetic SentencePiece models besides :data:`templates.SPECIAL_TOKENS`."""


class TokenizerError(ValueError):
    """A tokenizer path is unusable (missing file, unknown format, missing special token)."""


class _HFBackend:
    """An HF ``tokenizers`` tokenizer loaded from ``<dir>/tokenizer.json`` (what ``*TokenizerFast`` wraps)."""

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer

        self.path = directory
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.special_ids = {
            token.content: index
            for index, token in self.tokenizer.get_added_tokens_decoder().items()
            if token.special
        }

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tokenizer.token_to_id(token)

    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def pieces(self) -> List[Tuple[int, str]]:
        return sorted((index, piece) for piece, index in self.tokenizer.get_vocab(with_added_tokens=True).items())

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


class _SentencePieceBackend:
    """A SentencePiece model whose chat special tokens are user-defined symbols."""

    def __init__(self, model_file: Path):
        import sentencepiece

        self.path = model_file
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.special_ids = {
            token: self.processor.piece_to_id(token)
            for token in templates.SPECIAL_TOKENS
            if self.processor.is_unknown(self.processor.piece_to_id(token)) is False
        }

    def encode(self, text: str) -> List[int]:
        return self.processor.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            special = set(self.special_ids.values())
            ids = [index for index in ids if index not in special]
        return self.processor.decode(list(ids))

    def token_to_id(self, token: str) -> Optional[int]:
        index = self.processor.piece_to_id(token)
        return None if self.processor.is_unknown(index) else index

    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def pieces(self) -> List[Tuple[int, str]]:
        return [(index, self.processor.id_to_piece(index)) for index in range(self.processor.get_piece_size())]

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def _load(backend, source: Path):
    """``backend(source)``, with whatever the tokenizer library raises for a broken file (``tokenizers``: a bare
    ``Exception``; SentencePiece: ``RuntimeError`` / ``OSError``) as one :class:`TokenizerError` naming it."""
    try:
        return backend(source)
    except Exception as error:  # noqa: BLE001 - the libraries' types for a broken file vary (see above)
        reason = " ".join(str(error).split())[:200]
        raise TokenizerError(f"{source} cannot be loaded as a tokenizer ({type(error).__name__}: {reason}); give an "
                             "HF tokenizer directory or a SentencePiece .model") from None


def _open_backend(path: Path):
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _load(_HFBackend, path)
        models = sorted(path.glob("*.model"))
        if len(models) == 1:
            return _load(_SentencePieceBackend, models[0])
        raise TokenizerError(
            f"tokenizer directory {path} has no tokenizer.json (HF fast tokenizer) and no single *.model "
            "(SentencePiece); pass the Qwen2.5 tokenizer directory or a SentencePiece .model file"
        )
    if path.is_file() and path.suffix == ".model":
        return _load(_SentencePieceBackend, path)
    if not path.exists():
        raise TokenizerError(f"tokenizer path {path} does not exist")
    raise TokenizerError(f"tokenizer path {path} is neither an HF tokenizer directory nor a SentencePiece .model")


class PuffinTokenizer:
    """Text <-> ids with the chat special tokens of docs/puffin.md §1.2, for either backend.

    Attributes:
        path: Where the tokenizer was loaded from.
        endoftext_id, im_start_id, im_end_id, vision_start_id, vision_end_id, image_pad_id: Ids of the special
            tokens (151643, 151644, 151645, 151652, 151653, 151655 for Qwen2.5).
        newline_id: Id of "\\n" when it is a single token (198 for Qwen2.5); the SEP after every answer.
        pad_id: Generation-prompt padding id (``<|endoftext|>``).
        eos_id: ``<|im_end|>`` (answer terminator, greedy decoding stops on it).
    """

    def __init__(self, path: "str | os.PathLike"):
        """Loads a tokenizer.

        Args:
            path: An HF tokenizer directory (with ``tokenizer.json``), a SentencePiece ``.model`` file, or a
                directory holding exactly one ``.model`` file.

        Raises:
            TokenizerError: If the path is unusable or a chat special token is not a single token.
        """
        self.path = Path(path)
        self._backend = _open_backend(self.path)
        ids = {token: self._backend.token_to_id(token) for token in templates.SPECIAL_TOKENS}
        missing = [token for token, index in ids.items() if index is None]
        if missing:
            raise TokenizerError(
                f"tokenizer {self.path} lacks the chat special tokens {missing}; Puffin needs "
                f"{list(templates.SPECIAL_TOKENS)} as single tokens (user-defined symbols for SentencePiece)"
            )
        self.endoftext_id = ids[templates.ENDOFTEXT_TOKEN]
        self.im_start_id = ids[templates.IM_START_TOKEN]
        self.im_end_id = ids[templates.IM_END_TOKEN]
        self.vision_start_id = ids[templates.VISION_START_TOKEN]
        self.vision_end_id = ids[templates.VISION_END_TOKEN]
        self.image_pad_id = ids[templates.IMAGE_PAD_TOKEN]
        self.pad_id = self.endoftext_id
        self.eos_id = self.im_end_id
        newline = self._backend.encode("\n")
        self.newline_id = newline[0] if len(newline) == 1 else None
        logger.info("loaded tokenizer %s (%d tokens)", self.path, self.vocab_size)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (added tokens included)."""
        return self._backend.vocab_size()

    @property
    def special_token_ids(self) -> Dict[str, int]:
        """Chat special token string -> id."""
        return {token: self._backend.token_to_id(token) for token in templates.SPECIAL_TOKENS}

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text``; no BOS/EOS added, special token strings become their single ids."""
        return self._backend.encode(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; negative placeholder ids (-100, -200, -400 ...) are dropped."""
        return self._backend.decode([int(i) for i in ids if int(i) >= 0], skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a single token string, or None when it is not one token."""
        return self._backend.token_to_id(token)

    def identity(self) -> Dict[str, Any]:
        """What a checkpoint records of the tokenizer it was trained with: ``{"path", "vocab_size", "sha256"}``, the
        hash over every (id, piece) pair. Two tokenizers with the same hash give every id the same piece, whatever
        their file format; a resume or stage hand-off with another one would give the trained embedding rows other
        words (:func:`identity_difference`)."""
        digest = hashlib.sha256(json.dumps(self._backend.pieces(), ensure_ascii=False).encode("utf-8"))
        return {"path": str(self.path), "vocab_size": self.vocab_size, "sha256": digest.hexdigest()}

    def __repr__(self) -> str:
        return f"PuffinTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def identity_difference(stored: Any, current: Dict[str, Any]) -> Optional[str]:
    """How a checkpoint's recorded tokenizer (:meth:`PuffinTokenizer.identity`; None in checkpoints older than the
    record) differs from ``current``, or None."""
    if not isinstance(stored, dict) or "sha256" not in stored or stored["sha256"] == current["sha256"]:
        return None
    return (f"it was trained with the tokenizer {stored.get('path')} ({stored.get('vocab_size')} tokens, vocabulary "
            f"sha256 {str(stored['sha256'])[:12]}), not {current['path']} ({current['vocab_size']} tokens, "
            f"sha256 {current['sha256'][:12]}): its token ids would mean other words")


def train_sentencepiece_tokenizer(texts: Iterable[str], output_file: "str | os.PathLike", vocab_size: int = 1024) -> Path:
    """Trains a byte-fallback BPE SentencePiece model whose chat special tokens are single symbols.

    Text is kept verbatim (identity normalisation, no dummy prefix, whitespace preserved), so
    ``decode(encode(text)) == text`` for any text and chunks can be tokenised separately and concatenated as the
    chat template requires.

    Args:
        texts: Training sentences (captions and prompts).
        output_file: Path of the ``.model`` file to write (parent directories are created).
        vocab_size: Target vocabulary size (a soft limit: smaller when the corpus is tiny).

    Returns:
        The written model path.

    A different model already at ``output_file`` (a re-run with other captions or another vocabulary size) is kept
    beside it as ``<stem>.previous-<sha256 prefix>.model``, with a warning: checkpoints trained with it refuse the
    new one (their tokenizer record), and with the kept file they still load. A byte-identical model (the same
    texts and size: training is deterministic) is simply written again.
    """
    import sentencepiece

    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            user_defined_symbols=list(templates.SPECIAL_TOKENS) + list(SENTENCEPIECE_EXTRA_SYMBOLS),
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            split_digits=True,
            hard_vocab_limit=False,
            max_sentence_length=1 << 16,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as error:  # e.g. a vocabulary smaller than the corpus' characters + the special pieces
        raise ValueError(f"the SentencePiece tokenizer cannot be trained with vocab_size {vocab_size}: "
                         f"{' '.join(str(error).split())}") from None
    trained = model.getvalue()
    tmp_file = output_file.with_suffix(".model.tmp")
    tmp_file.write_bytes(trained)
    previous = output_file.read_bytes() if output_file.is_file() else None
    if previous is not None and previous != trained:
        kept = output_file.with_name(f"{output_file.stem}.previous-{hashlib.sha256(previous).hexdigest()[:12]}"
                                     f"{output_file.suffix}")
        os.replace(output_file, kept)
        logger.warning("replaced the tokenizer %s: the texts train another vocabulary; the previous one is kept as %s "
                       "(checkpoints trained with it need --tokenizer %s)", output_file, kept, kept)
    os.replace(tmp_file, output_file)
    return output_file


QWEN_SPECIAL_TOKEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
}
"""Ids of the chat special tokens in the Qwen2.5 tokenizer (docs/puffin.md §1.2)."""


def build_byte_level_bpe_tokenizer(texts: Iterable[str], output_dir: "str | os.PathLike", vocab_size: int = 400) -> Path:
    """Trains a small Qwen-style byte-level BPE and saves it as an HF tokenizer directory.

    The special tokens are added as special added tokens in the order Qwen2.5 has them; their ids therefore
    follow the trained vocabulary (not Qwen's ids), which is what a loader must resolve from the directory.

    Args:
        texts: Training strings.
        output_dir: Directory to write ``tokenizer.json`` and ``tokenizer_config.json`` into.
        vocab_size: BPE vocabulary size before the special tokens.

    Returns:
        The directory.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    tokenizer.add_special_tokens(list(QWEN_SPECIAL_TOKEN_IDS))
    tokenizer.save(str(output_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": templates.IM_END_TOKEN,
        "pad_token": templates.ENDOFTEXT_TOKEN,
        "bos_token": None,
        "model_max_length": 32768,
    }
    (output_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return output_dir
