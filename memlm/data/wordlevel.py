"""A word-level tokenizer for BABILong: one id per bAbI or filler word, hashed buckets
for every other word.

Why words and not bytes: a qa1 fact ("Mary journeyed to the bathroom.") is 6 word
tokens but 31 bytes, and its answer is one token instead of nine. A 128-token
segment therefore holds five times more story, a 2K-token training sample covers
what byte tokens need 10K for, and the answer is a single classification among
the room names, which a 2-layer model learns in minutes. Word counts are also
close to GPT-2 counts on bAbI text (almost every bAbI word is one GPT-2 token),
so named lengths mean roughly what they mean in the BABILong paper; the
benchmark reports both.

Vocabulary (fixed, so no corpus is needed at construction): the end-of-text id 0,
then every word and punctuation mark of the bAbI v1.2 *train* files of all 20
tasks and of memlm's filler, sorted, then `n_hash` buckets. A word outside the
vocabulary (most of a real background such as WikiText) maps to bucket
crc32(word) mod n_hash, so real text keeps its word statistics at a bounded
vocabulary size; such words decode as "<hN>". The whole vocabulary is stored in
the saved form, so reloading needs no bAbI files.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from memlm.data.tokenizers import EOT_TEXT, REPLACEMENT, Tokenizer
from memlm.errors import DataError
from memlm.registry import TOKENIZERS

#: words, numbers and single punctuation marks; whitespace separates and is dropped
WORD_RE = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")
_NO_SPACE_BEFORE = frozenset(".,;:!?)]}'\"")
_NO_SPACE_AFTER = frozenset("([{")
DEFAULT_BUCKETS = 512
#: how `_piece` prints a hashed bucket's id
_BUCKET_PIECE = re.compile(r"<h(\d+)>")


def _words(text: str) -> list[str]:
    return WORD_RE.findall(text)


def join_words(pieces: Iterable[str]) -> str:
    """Words back into text: one space between words, none before closing punctuation
    or after an opening bracket. The word tokenizer's `decode` and its transformers form
    (memlm/hf/tokenization.py) both use it, so the two decode alike."""
    out: list[str] = []
    for piece in pieces:
        if out and piece not in _NO_SPACE_BEFORE and out[-1] not in _NO_SPACE_AFTER:
            out.append(" ")
        out.append(piece)
    return "".join(out)


def babi_vocabulary(babi_dir: str | Path | None = None) -> list[str]:
    """Every word of the bAbI train files (all 20 tasks) and of the filler, sorted."""
    from memlm.data.babi import default_babi_dir
    from memlm.data.filler import filler_sentence

    root = Path(babi_dir) if babi_dir is not None else default_babi_dir()
    if root is None or not root.is_dir():
        raise DataError("the word tokenizer takes its vocabulary from the bAbI v1.2 train files; "
                        "none found. Set MEMLM_BABI_DIR or write 'word:/path/to/babi'.")
    files = sorted((root / "en-10k").glob("qa*_train.txt")) or sorted(
        (root / "en").glob("qa*_train.txt")) or sorted(root.glob("qa*_train.txt"))
    if not files:
        raise DataError(f"no bAbI train file (qa*_train.txt) under {root}")
    words: set[str] = set()
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            text = line.split(" ", 1)[1] if " " in line else line
            words.update(_words(text.split("\t")[0]))
            if "\t" in text:  # the answer field (qa8: "football,apple")
                words.update(_words(text.split("\t")[1]))
    # the filler cycles 16 templates over fixed word lists: 4,000 sentences per seed cover them
    for seed in (0, 1):
        for k in range(4000):
            words.update(_words(filler_sentence(seed, k)))
    words.update(("GEN",))  # the answer marker
    return sorted(words)


@TOKENIZERS.register("word")
class WordTokenizer(Tokenizer):
    """Word-level ids: bAbI + filler words, then `n_hash` hashed buckets (spec `word`,
    `word:N` for N buckets, `word:N:DIR` to read the vocabulary from another bAbI folder)."""

    kind = "word"

    def __init__(self, vocab: Sequence[str], n_hash: int = DEFAULT_BUCKETS):
        if n_hash < 1:
            raise DataError(f"the word tokenizer needs at least one hash bucket, got {n_hash}")
        self.vocab = list(vocab)
        self.n_hash = int(n_hash)
        self._ids = {w: i + 1 for i, w in enumerate(self.vocab)}
        if len(self._ids) != len(self.vocab):
            raise DataError("the word tokenizer's vocabulary repeats a word")
        self._first_hash = len(self.vocab) + 1

    @property
    def name(self) -> str:
        return f"word:{self.n_hash}"

    @property
    def vocab_size(self) -> int:
        return self._first_hash + self.n_hash

    @property
    def eot_id(self) -> int | None:
        return 0

    @staticmethod
    def split(text: str) -> list[str]:
        """The words `encode` gives one id each."""
        return _words(text)

    def word_id(self, word: str) -> int:
        """A word's id: its place in the vocabulary, else its hashed bucket."""
        i = self._ids.get(word)
        if i is None:
            i = self._first_hash + zlib.crc32(word.encode("utf-8")) % self.n_hash
        return i

    def encode(self, text: str) -> list[int]:
        return [self.word_id(w) for w in _words(text)]

    def piece_id(self, piece: str) -> int:
        """The id whose `token_strings` piece this is: the inverse of `_piece`, so the
        end-of-text text and a bucket's "<hN>" map back to their ids (no word of a text
        contains "<", so neither is ever a word)."""
        if piece == EOT_TEXT:
            return 0
        bucket = _BUCKET_PIECE.fullmatch(piece)
        if bucket and int(bucket[1]) < self.n_hash:
            return self._first_hash + int(bucket[1])
        return self.word_id(piece)

    def _piece(self, i: int) -> str:
        if i == 0:
            return EOT_TEXT
        if 1 <= i < self._first_hash:
            return self.vocab[i - 1]
        if self._first_hash <= i < self.vocab_size:
            return f"<h{i - self._first_hash}>"
        return REPLACEMENT

    def decode(self, ids: Sequence[int]) -> str:
        return join_words(self._piece(int(i)) for i in ids)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self._piece(int(i)) for i in ids]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "word", "n_hash": self.n_hash, "vocab": self.vocab}

    @classmethod
    def from_spec(cls, arg: str | None, text: str | None) -> WordTokenizer:
        n_hash, babi_dir = DEFAULT_BUCKETS, None
        if arg:
            head, _, rest = arg.partition(":")
            try:
                n_hash = int(head) if head else DEFAULT_BUCKETS
            except ValueError:
                raise DataError(f"'word:{arg}': write word, word:BUCKETS or "
                                "word:BUCKETS:/path/to/babi") from None
            babi_dir = rest or None
        return cls(babi_vocabulary(babi_dir), n_hash)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WordTokenizer:
        vocab = data.get("vocab")
        if not isinstance(vocab, list) or not all(isinstance(w, str) for w in vocab):
            raise DataError("a saved word tokenizer needs its 'vocab' list of strings")
        return cls(vocab, int(data.get("n_hash", DEFAULT_BUCKETS)))


__all__ = ["WordTokenizer", "babi_vocabulary"]
