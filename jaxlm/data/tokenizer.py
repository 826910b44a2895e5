"""Tokenizers: byte-level BPE (trained with the `tokenizers` library) and raw bytes.

Both map any UTF-8 text to ids and back exactly (English, Chinese, emoji).
`decode` never fails: ids that end inside a multi-byte character decode with
U+FFFD. Byte input that is not valid UTF-8 is exact with `ByteTokenizer`; the
BPE tokenizer replaces invalid sequences with U+FFFD first.

`token_bytes` gives the UTF-8 length of every token, so losses can be reported
in bits per byte, a figure that does not depend on the tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jaxlm.errors import DataError

EOS = "<|endoftext|>"
MASK = "[MASK]"  # masked-language-model input token (BERT)


def _as_bytes(text: str | bytes) -> bytes:
    """Exact bytes; `str` from argv or file names may carry invalid bytes as surrogate escapes."""
    return bytes(text) if isinstance(text, (bytes, bytearray)) else text.encode("utf-8", errors="surrogateescape")


def _as_text(text: str | bytes) -> str:
    return _as_bytes(text).decode("utf-8", errors="replace")


class ByteTokenizer:
    """ids 0..255 are the bytes, 256 is end-of-text, 257 the mask token when `mask`."""

    kind = "byte"

    def __init__(self, mask: bool = False):
        self.eos_id = 256
        self.mask_id = 257 if mask else None
        self.vocab_size = 258 if mask else 257
        self.token_bytes = np.array([1] * 256 + [0] * (self.vocab_size - 256), np.int32)

    def encode(self, text: str | bytes) -> list[int]:
        return list(_as_bytes(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids and the (start, end) character span of each."""
        ids, offsets = [], []
        for i, ch in enumerate(_as_text(text)):
            b = ch.encode("utf-8")
            ids += list(b)
            offsets += [(i, i + 1)] * len(b)
        return ids, offsets

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return bytes(i for i in ids if 0 <= i < 256)

    def piece(self, i: int) -> str:
        """The vocabulary entry of id i (a special token's name)."""
        return {256: EOS, 257: MASK}.get(i, f"<0x{i:02X}>")

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        marker = {"jaxlm_tokenizer": "byte", "mask": self.mask_id is not None}
        Path(path).write_text(json.dumps(marker), encoding="utf-8")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) backed by a `tokenizers.Tokenizer`."""

    kind = "bpe"

    def __init__(self, tokenizer, eos_id: int | None = None, *, chat_template: str | None = None, special_tokens=None):
        """`eos_id`: end-of-text id, for tokenizers (e.g. from Hugging Face) without `<|endoftext|>`.

        chat_template: Jinja chat template (Hugging Face `tokenizer_config.json`), or None.
        special_tokens: the template's variables: {"bos_token": "<s>", "eos_token": "</s>", ...}.
        """
        self._tok = tokenizer
        self.chat_template = chat_template
        self.vocab_size = tokenizer.get_vocab_size()
        eos = tokenizer.token_to_id(EOS) if eos_id is None else eos_id
        if eos is None:
            raise DataError(f"BPE tokenizer has no {EOS} token and no end-of-text id was given")
        self.eos_id = eos
        self.special_tokens = dict(special_tokens or {"eos_token": tokenizer.id_to_token(eos)})
        self.mask_id = tokenizer.token_to_id(MASK)
        added = tokenizer.get_added_tokens_decoder().values()
        special = {t.content for t in added if t.special}  # decode to nothing
        literal = {t.content for t in added if not t.special}  # user-defined tokens (`<think>`) are their text
        sentencepiece = bool(getattr(tokenizer.model, "byte_fallback", False))
        self._id_bytes: list[bytes] = []
        for i in range(self.vocab_size):
            piece = tokenizer.id_to_token(i)
            if piece is None or piece in special:
                self._id_bytes.append(b"")
            else:
                self._id_bytes.append(piece.encode() if piece in literal else _piece_bytes(piece, sentencepiece))
        self.token_bytes = np.array([len(b) for b in self._id_bytes], np.int32)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, mask: bool = False) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS, MASK] if mask else [EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path, eos_id: int | None = None) -> BPETokenizer:
        from tokenizers import Tokenizer

        side = _eos_file(path)
        if eos_id is None and side.is_file():
            eos_id = int(json.loads(side.read_text())["eos_id"])
        chat = {}
        if _chat_file(path).is_file():
            chat = json.loads(_chat_file(path).read_text(encoding="utf-8"))
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise DataError(f"cannot read tokenizer file {path}: {e}") from None
        return cls(tok, eos_id, chat_template=chat.get("chat_template"), special_tokens=chat.get("special_tokens"))

    def encode(self, text: str | bytes) -> list[int]:
        return self._tok.encode(_as_text(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch([_as_text(t) for t in texts], add_special_tokens=False)]

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids and the (start, end) character span of each (special tokens in the text are matched)."""
        e = self._tok.encode(_as_text(text), add_special_tokens=False)
        return e.ids, e.offsets

    def add_special_tokens(self, tokens) -> list[int]:
        """Adds special tokens the vocabulary lacks (a chat template's); returns their ids."""
        from tokenizers import AddedToken

        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        self.vocab_size = self._tok.get_vocab_size()
        self._id_bytes += [b""] * (self.vocab_size - len(self._id_bytes))
        self.token_bytes = np.array([len(b) for b in self._id_bytes], np.int32)
        return [self._tok.token_to_id(t) for t in tokens]

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def piece(self, i: int) -> str:
        """The vocabulary entry of id i (a special token's name)."""
        return self._tok.id_to_token(i) or f"<{i}>"

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self._id_bytes[i] for i in ids if 0 <= i < self.vocab_size)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))
        if self._tok.token_to_id(EOS) != self.eos_id:  # keep an end-of-text id the file cannot name
            _eos_file(path).write_text(json.dumps({"eos_id": self.eos_id}))
        if self.chat_template:  # what tokenizer.json cannot hold (Hugging Face keeps it in tokenizer_config.json)
            chat = {"chat_template": self.chat_template, "special_tokens": self.special_tokens}
            _chat_file(path).write_text(json.dumps(chat, ensure_ascii=False), encoding="utf-8")


def _eos_file(path: str | Path) -> Path:
    return Path(str(path) + ".eos.json")


def _chat_file(path: str | Path) -> Path:
    return Path(str(path) + ".chat.json")


def _piece_bytes(piece: str, sentencepiece: bool = False) -> bytes:
    """The bytes a vocabulary piece stands for: byte-level BPE (GPT-2 alphabet), SentencePiece byte
    fallback (`<0x0A>`), or SentencePiece text (`▁` is a space). A byte-fallback vocabulary (`sentencepiece`)
    is never read in the GPT-2 alphabet, whose characters include `<0x0A>`'s."""
    if not sentencepiece and all(c in _UNICODE_TO_BYTE for c in piece):
        return bytes(_UNICODE_TO_BYTE[c] for c in piece)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace("\u2581", " ").encode("utf-8")


Tokenizer = ByteTokenizer | BPETokenizer


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map the same ids to the same tokens (a draft or reward model reads the ids)."""

    def vocab(t):
        raw = getattr(t, "_tok", None)
        return (t.kind, raw.get_vocab(with_added_tokens=True) if raw is not None else t.vocab_size)

    return vocab(a) == vocab(b)


def build_tokenizer(kind: str, train_texts: list[str], vocab_size: int, mask: bool = False) -> Tokenizer:
    """`mask`: include a mask token (masked-language-model training)."""
    if kind == "byte":
        return ByteTokenizer(mask)
    return BPETokenizer.train(train_texts, vocab_size, mask)


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"tokenizer file {path} is corrupt: {e}") from None
    if head.get("jaxlm_tokenizer") == "byte":
        return ByteTokenizer(bool(head.get("mask")))
    return BPETokenizer.load(path)
