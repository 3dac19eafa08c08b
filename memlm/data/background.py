"""Background text for long-context tasks: sentences from a corpus, or generated filler.

BABILong (memlm/data/babilong.py) hides bAbI facts in long background text. This
module turns a corpus into that background: paragraphs (plain text, or WikiText with
its headings and tokenisation artefacts undone) are split into sentences, the
sentences are tokenised once into a pool (the first 90% train, the last 10%
evaluate, or a separate evaluation corpus), and the pools are cached on disk keyed
by the files' content and the tokenizer. With no corpus, a generated filler free of
bAbI words is the background.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memlm.data.filler import filler_sentence
from memlm.data.sources import resolve_files
from memlm.errors import ConfigError, DataError

#: bump when the pool cache's content changes (it is part of the cache key)
FORMAT_VERSION = 1
_WHERE = "the background source (or use 'filler' for the built-in background)"


# ----------------------------------------------------------------------------------------
# background corpora: paragraphs -> sentences

_ABBREVIATIONS = frozenset("""
Mr Mrs Ms Dr Prof St Jr Sr Mt Gen Col Capt Lt Sgt Rev vs etc e.g i.e No Vol Fig
Jan Feb Mar Apr May Jun Jul Aug Sep Sept Oct Nov Dec
""".split())
# a terminator run, optional closing quotes/brackets, then whitespace and a sentence start
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s+[A-Z0-9\"'\u201c\u2018(\[])")
_OPENERS = "\"'\u201c\u2018(["


def split_sentences(paragraph: str) -> list[str]:
    """memlm's sentence splitter (no NLTK): split after . ! ? before a capital, digit or
    opening quote, except after an initial ("H.") or a known abbreviation ("Mr.")."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(paragraph):
        if paragraph[m.start()] == ".":
            before = paragraph[start:m.start()].rsplit(None, 1)
            word = before[-1].lstrip(_OPENERS) if before else ""
            if (len(word) == 1 and word.isupper()) or word in _ABBREVIATIONS:
                continue
        sentence = paragraph[start:m.end()].strip()
        if sentence:
            out.append(sentence)
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        out.append(tail)
    return out


_HEADING = re.compile(r"^\s*=+ .* =+\s*$")
_WIKI_ARTEFACTS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_SPACE_BEFORE = re.compile(r" (?=[,.;:!?)]|'s\b|n't\b)")


def detect_format(path: Path) -> str:
    """'wikitext' for WikiText files (wiki.*.tokens/raw or a folder named wikitext*), else
    'plain'."""
    parts = [p.lower() for p in path.parts]
    if path.name.lower().startswith("wiki.") or any(p.startswith("wikitext") for p in parts):
        return "wikitext"
    return "plain"


def wikitext_paragraphs(text: str) -> list[str]:
    """One paragraph per line; headings dropped; WikiText tokenisation artefacts undone."""
    out = []
    for line in text.split("\n"):
        if not line.strip() or _HEADING.match(line):
            continue
        s = line.strip()
        for old, new in _WIKI_ARTEFACTS:
            s = s.replace(old, new)
        s = _SPACE_BEFORE.sub("", s).replace("( ", "(")
        out.append(" ".join(s.split()))
    return out


def plain_paragraphs(text: str) -> list[str]:
    """Paragraphs separated by blank lines; lines joined; whitespace collapsed."""
    return [" ".join(block.split()) for block in re.split(r"\n\s*\n", text) if block.strip()]


def corpus_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Text files of a background source: files, folders (their .txt files) or globs, sorted."""
    items = [source] if isinstance(source, (str, Path)) else list(source)
    files = [f for item in items for f in resolve_files(item, where=_WHERE, what="background")]
    if not files:
        raise DataError(f"background {source!r} holds no .txt files")
    return sorted(files)


def corpus_sentences(files: Sequence[Path], fmt: str | None = None) -> list[str]:
    """All sentences of the files, in corpus order."""
    out: list[str] = []
    for path in files:
        kind = fmt or detect_format(path)
        text = path.read_text(encoding="utf-8", errors="replace")  # a stray byte is no reason to stop
        if kind == "wikitext":
            for para in wikitext_paragraphs(text):
                out.extend(s for s in split_sentences(para) if "<unk>" not in s)
        elif kind == "plain":
            for para in plain_paragraphs(text):
                out.extend(split_sentences(para))
        else:
            raise ConfigError(f"background format {kind!r} is unknown; use 'plain' or 'wikitext'.")
    return out


# ----------------------------------------------------------------------------------------
# sentence pools


class SentencePool:
    """Pre-tokenised background sentences (`tok(" " + sentence)`), in corpus order."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, name: str):
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.name = name
        if len(self.offsets) < 2:
            raise DataError(f"background {name} has no sentence of at least the minimum length; "
                            "give a larger corpus or lower min_sentence_tokens.")

    @property
    def n(self) -> int:
        return len(self.offsets) - 1

    def sentence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def random_start(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.n))

    @classmethod
    def from_sentences(cls, sentences: Sequence[str], tokenizer, name: str,
                       min_tokens: int = 10, max_tokens: int | None = None) -> SentencePool:
        pieces = []
        for s in sentences:
            ids = np.asarray(tokenizer.encode(" " + s), dtype=np.int32)
            if len(ids) >= min_tokens and (max_tokens is None or len(ids) <= max_tokens):
                pieces.append(ids)
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        if pieces:
            offsets[1:] = np.cumsum([len(p) for p in pieces])
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
        return cls(tokens, offsets, name)


class FillerPool:
    """The built-in filler as an unbounded, index-addressable pool (no wrap-around)."""

    n = None

    def __init__(self, tokenizer, seed: int):
        self.tokenizer = tokenizer
        self.seed = seed
        self.name = f"filler:{seed}"

    def text(self, k: int) -> str:
        return filler_sentence(self.seed, k)

    def sentence(self, k: int) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(" " + self.text(k)), dtype=np.int32)

    def random_start(self, rng: np.random.Generator) -> int:
        return int(rng.integers(2**40))


Pool = SentencePool | FillerPool


@dataclass
class Background:
    """The train and evaluation pools of one background source."""

    name: str  # what results record: 'filler' or the corpus files
    fingerprint: str
    train: Pool
    eval: Pool

    def pool(self, split: str) -> Pool:
        return self.train if split == "train" else self.eval


def _file_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def _tokenizer_fingerprint(tokenizer) -> str:
    fp = getattr(tokenizer, "fingerprint", None)
    if callable(fp):
        return str(fp())
    if fp is not None:
        return str(fp)
    return f"{type(tokenizer).__name__}-{tokenizer.vocab_size}"


_POOL_MEMO: dict[str, tuple[SentencePool, SentencePool]] = {}


def load_background(source: str | Path | Sequence[str | Path] | None, tokenizer, *,
                    seed: int = 0, eval_source: str | Path | Sequence | None = None,
                    fmt: str | None = None, min_sentence_tokens: int = 10,
                    max_sentence_tokens: int | None = None,
                    cache_dir: str | Path | None = None) -> Background:
    """Build (or load from cache) the sentence pools of a background source.

    `source` None or "filler" gives the generated filler: train and evaluation use
    different filler seeds (2*seed and 2*seed+1), so they never share a stream.
    With one corpus, its first 90% of sentences train and the last 10% evaluate,
    minus any sentence whose text also occurs in the train part. With
    `eval_source`, each corpus has its own pool.
    """
    if source is None or str(source) == "filler":
        return Background("filler", f"filler:{seed}", FillerPool(tokenizer, 2 * seed),
                          FillerPool(tokenizer, 2 * seed + 1))
    files = corpus_files(source)
    eval_files = corpus_files(eval_source) if eval_source is not None else []
    key_parts = [
        f"v{FORMAT_VERSION}", _file_digest(files), _file_digest(eval_files) if eval_files else "-",
        str(fmt), str(min_sentence_tokens), str(max_sentence_tokens),
        _tokenizer_fingerprint(tokenizer),
    ]
    key = hashlib.sha256("|".join(key_parts).encode()).hexdigest()[:20]
    name = ",".join(str(p) for p in files) + (f" | eval: {','.join(map(str, eval_files))}"
                                               if eval_files else "")
    if key not in _POOL_MEMO:
        cached = _read_pool_cache(cache_dir, key, name)
        if cached is None:
            cached = _build_pools(files, eval_files, tokenizer, fmt, min_sentence_tokens,
                                  max_sentence_tokens, name)
            _write_pool_cache(cache_dir, key, cached)
        _POOL_MEMO[key] = cached
    train, evl = _POOL_MEMO[key]
    return Background(name, key, train, evl)


def _build_pools(files, eval_files, tokenizer, fmt, min_tok, max_tok, name
                 ) -> tuple[SentencePool, SentencePool]:
    sentences = corpus_sentences(files, fmt)
    if eval_files:
        train_s, eval_s = sentences, corpus_sentences(eval_files, fmt)
    else:
        # filter by length first so that the 90/10 cut is over pool sentences
        kept = [s for s in sentences
                if min_tok <= len(tokenizer.encode(" " + s)) <= (max_tok or 1 << 62)]
        cut = int(0.9 * len(kept))
        train_s, eval_s = kept[:cut], kept[cut:]
        seen = set(train_s)
        eval_s = [s for s in eval_s if s not in seen]
    return (SentencePool.from_sentences(train_s, tokenizer, name + " [train]", min_tok, max_tok),
            SentencePool.from_sentences(eval_s, tokenizer, name + " [eval]", min_tok, max_tok))


def _pool_cache_path(cache_dir, key: str) -> Path | None:
    return None if cache_dir is None else Path(cache_dir) / f"babilong-pool-{key}.npz"


def _read_pool_cache(cache_dir, key: str, name: str):
    path = _pool_cache_path(cache_dir, key)
    if path is None or not path.exists():
        return None
    with np.load(path) as z:
        return (SentencePool(z["train_tokens"], z["train_offsets"], name + " [train]"),
                SentencePool(z["eval_tokens"], z["eval_offsets"], name + " [eval]"))


def _write_pool_cache(cache_dir, key: str, pools) -> None:
    path = _pool_cache_path(cache_dir, key)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    train, evl = pools
    np.savez(tmp, train_tokens=train.tokens, train_offsets=train.offsets,
             eval_tokens=evl.tokens, eval_offsets=evl.offsets)
    tmp.replace(path)
