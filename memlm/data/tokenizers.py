"""Tokenizers: text <-> token ids, saved with every run so eval and generate reuse them.

Four kinds, picked by a spec string (`make_tokenizer(spec, text)`):

* ``byte``      256 ids, one per UTF-8 byte. Needs no file and no fitting, so it is
                the default for the built-in data and for quick experiments.
* ``char``      one id per distinct character of the corpus (fitted on text).
* ``gpt2[:DIR]`` GPT-2's 50,257-id byte-level BPE, run by tiktoken but built from a
                local folder holding ``encoder.json`` + ``vocab.bpe`` so it works offline.
* ``bpe:SIZE``  a byte-level BPE of SIZE ids trained on the user's corpus with HF
                ``tokenizers`` (useful when GPT-2's 50k vocabulary would dwarf a tiny model).
* ``hf:PATH``   a pretrained model's own tokenizer (its ``tokenizer.json``), so ids match
                the embeddings of ``model.backbone: hf:PATH`` (docs/finetune.md).

Common rules (they keep the rest of memlm simple):

* ``encode`` treats every character as ordinary text: the string "<|endoftext|>" in a
  file is tokenised as text, never turned into the end-of-text id. Only memlm inserts
  ``eot_id`` (between documents).
* ``decode`` renders ``eot_id`` as the tokenizer's marker text and any id outside the
  vocabulary as U+FFFD, so a model with a padded (larger) vocabulary can never crash
  generation; invalid UTF-8 byte sequences also become U+FFFD.
* ``to_dict()`` holds everything needed to rebuild the tokenizer offline; ``save`` writes
  it as JSON and ``load_tokenizer`` reads it back.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memlm.errors import CheckpointError, DataError, TokenizerMismatchError, unknown_name
from memlm.registry import TOKENIZERS

EOT_TEXT = "<|endoftext|>"
REPLACEMENT = "\ufffd"
FORMAT_VERSION = 1


class Tokenizer(ABC):
    """What memlm needs from a tokenizer. Subclasses are registered by kind in TOKENIZERS."""

    kind: str = ""

    # ----- the interface --------------------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (every id the tokenizer can produce is < vocab_size)."""

    @property
    @abstractmethod
    def eot_id(self) -> int | None:
        """The end-of-text id put between documents, or None when there is none."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (plain text only, see the module docstring)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; unknown ids become U+FFFD."""

    @abstractmethod
    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """One printable string per id, for inspection plots and tables."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-able description holding everything needed to rebuild it."""

    @classmethod
    @abstractmethod
    def from_spec(cls, arg: str | None, text: str | None) -> Tokenizer:
        """Build from the part of the spec after ':' (fitting on `text` when needed)."""

    @classmethod
    @abstractmethod
    def from_dict(cls, data: dict[str, Any]) -> Tokenizer:
        """Rebuild from `to_dict()`'s output."""

    # ----- shared behaviour -----------------------------------------------------------------
    @property
    def name(self) -> str:
        """Short human name, e.g. 'byte', 'char', 'gpt2', 'bpe:4096'."""
        return self.kind

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an int64 array; subclasses override it with a faster path."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def fingerprint(self) -> str:
        """Identity used in cache keys: equal fingerprints give equal ids for any text."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        """Write `to_dict()` as JSON to `path` (a folder gets `tokenizer.json` inside)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"format_version": FORMAT_VERSION, **self.to_dict()}))
        os.replace(tmp, path)
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def _byte_display(b: int) -> str:
    """A byte shown as text when printable ASCII, else as <0xNN>."""
    return chr(b) if 32 <= b < 127 else f"<0x{b:02X}>"


def _bytes_display(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(_byte_display(b) for b in raw)


# ----- byte -----------------------------------------------------------------------------------


@TOKENIZERS.register("byte")
class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes of the text.

    The end-of-text id is 0, the NUL byte: `prepare_data` rejects text containing NUL as
    binary, so id 0 never occurs inside a document and is free to separate documents.
    """

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def eot_id(self) -> int:
        return 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
            else:
                out.append(run.decode("utf-8", errors="replace") + REPLACEMENT)
                run = bytearray()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [_byte_display(int(i)) if 0 <= int(i) < 256 else REPLACEMENT for i in ids]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "byte"}

    @classmethod
    def from_spec(cls, arg: str | None, text: str | None) -> ByteTokenizer:
        if arg:
            raise DataError(f"the byte tokenizer takes no argument, got 'byte:{arg}'; use 'byte'.")
        return cls()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ByteTokenizer:
        return cls()


# ----- char -----------------------------------------------------------------------------------


@TOKENIZERS.register("char")
class CharTokenizer(Tokenizer):
    """One id per distinct character of the text it was fitted on, in sorted order.

    The end-of-text id comes last (id = number of characters). A character the
    vocabulary lacks raises DataError naming it, rather than mapping to an <unk> id:
    silently training or evaluating on <unk> hides a data problem, and the fix
    (fit on text that contains it, or use `byte`) is easy.
    """

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        chars = sorted(set(chars))
        if not chars:
            raise DataError("the char tokenizer needs non-empty text to fit its vocabulary.")
        self.chars = chars
        self._codes = np.array([ord(c) for c in chars], dtype=np.int64)
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def fit(cls, text: str) -> CharTokenizer:
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    @property
    def eot_id(self) -> int:
        return len(self.chars)

    def _unknown(self, ch: str) -> DataError:
        return DataError(
            f"character {ch!r} (U+{ord(ch):04X}) is not in the char tokenizer's vocabulary of "
            f"{len(self.chars)} characters; fit the char tokenizer on text that contains it, "
            "or use the 'byte' tokenizer, which covers any text."
        )

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        # UTF-32 gives one code point per character; searchsorted maps it to its id
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.searchsorted(self._codes, codes)
        ids_clipped = np.minimum(ids, len(self._codes) - 1)
        bad = self._codes[ids_clipped] != codes
        if bad.any():
            raise self._unknown(chr(int(codes[int(np.argmax(bad))])))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        n = len(self.chars)
        return "".join(
            self.chars[i] if 0 <= i < n else EOT_TEXT if i == n else REPLACEMENT
            for i in map(int, ids)
        )

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self.decode([i]) for i in ids]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_spec(cls, arg: str | None, text: str | None) -> CharTokenizer:
        if arg:
            raise DataError(f"the char tokenizer takes no argument, got 'char:{arg}'; use 'char'.")
        if text is None:
            raise DataError(
                "the char tokenizer is fitted on the corpus: call make_tokenizer('char', text=...) "
                "or let prepare_data fit it on the training text."
            )
        return cls.fit(text)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        return cls(list(data["chars"]))


# ----- gpt2 -----------------------------------------------------------------------------------

# GPT-2's pre-tokenisation pattern (contractions, letters, digits, punctuation, spaces);
# it is part of the tokenizer's definition, so ids match OpenAI's only with this pattern.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = 50256
GPT2_VOCAB = 50257
# sha256 of OpenAI's published files: a folder with these files is exactly tiktoken's "gpt2"
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def _gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's files spell every byte as one printable character; invert that spelling.

    Printable Latin-1 bytes (except space) stand for themselves; the remaining 68 bytes
    are spelled with the code points 256, 257, ... in increasing byte order.
    """
    visible = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    hidden = [b for b in range(256) if b not in set(visible)]
    alphabet = {chr(b): b for b in visible}
    alphabet.update({chr(256 + k): b for k, b in enumerate(hidden)})
    return alphabet


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_gpt2_ranks(folder: str | Path) -> dict[bytes, int]:
    """Mergeable ranks for tiktoken from a folder with GPT-2's encoder.json + vocab.bpe.

    encoder.json maps every token (in GPT-2's byte spelling) to its id; GPT-2's ids are
    also its merge priorities, so they serve directly as tiktoken ranks. vocab.bpe lists
    the merges in priority order: merge k must produce the token whose id is 256 + k.
    Checking that catches a mismatched or truncated pair of files, which would otherwise
    give silently wrong ids.
    """
    folder = Path(folder)
    for fname in ("encoder.json", "vocab.bpe"):
        if not (folder / fname).is_file():
            raise DataError(
                f"GPT-2 BPE folder {str(folder)!r} lacks {fname}; it must hold encoder.json "
                "and vocab.bpe (OpenAI's GPT-2 files)."
            )
    alphabet = _gpt2_byte_alphabet()

    def to_bytes(spelled: str) -> bytes:
        try:
            return bytes(alphabet[c] for c in spelled)
        except KeyError as e:
            raise DataError(
                f"{folder}/encoder.json holds a token {spelled!r} outside GPT-2's byte "
                "spelling; the folder does not hold GPT-2 BPE files."
            ) from e

    try:
        encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{folder}/encoder.json is not valid JSON ({e}).") from e
    ranks = {to_bytes(tok): int(i) for tok, i in encoder.items() if tok != EOT_TEXT}

    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges = [ln.split(" ") for ln in lines if ln and not ln.startswith("#version")]
    if len(ranks) != 256 + len(merges):
        raise DataError(
            f"{folder}: encoder.json has {len(ranks)} tokens but vocab.bpe has {len(merges)} "
            "merges (expected 256 + merges); the two files do not belong together."
        )
    for k, pair in enumerate(merges):
        merged = to_bytes("".join(pair))
        if len(pair) != 2 or ranks.get(merged) != 256 + k:
            raise DataError(
                f"{folder}: merge {k + 1} of vocab.bpe ({' '.join(pair)!r}) does not match "
                "encoder.json; the two files do not belong together."
            )
    return ranks


@functools.lru_cache(maxsize=4)
def _cached_ranks(folder: str, stamp: tuple) -> dict[bytes, int]:
    """load_gpt2_ranks once per folder and file version (it takes about a second)."""
    return load_gpt2_ranks(folder)


@TOKENIZERS.register("gpt2")
class GPT2Tokenizer(Tokenizer):
    """GPT-2's BPE (ids identical to OpenAI's), run by tiktoken.

    Where the files come from, in order: the folder in the spec (`gpt2:/path`), the
    folder in $MEMLM_GPT2_BPE_DIR, else tiktoken's own `get_encoding("gpt2")`, which
    downloads the files once and caches them (so it fails offline on a fresh machine).
    The saved form records the folder and the files' sha256, so a run can be reloaded
    only with the very same vocabulary.
    """

    kind = "gpt2"

    def __init__(self, folder: str | Path | None = None):
        import tiktoken

        self.folder = str(Path(folder).resolve()) if folder is not None else None
        if self.folder is not None:
            files = [Path(self.folder) / f for f in GPT2_SHA256]
            stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists())
            ranks = _cached_ranks(self.folder, stamp)
            self.sha256 = {p.name: _sha256(p) for p in files}
            self._enc = tiktoken.Encoding(
                name="gpt2-memlm",
                pat_str=GPT2_PATTERN,
                mergeable_ranks=ranks,
                special_tokens={EOT_TEXT: GPT2_EOT},
            )
        else:
            try:
                self._enc = tiktoken.get_encoding("gpt2")
            except Exception as e:  # network, cache or plugin failure: all need the same fix
                raise DataError(
                    f"could not load tiktoken's 'gpt2' encoding ({type(e).__name__}: {e}); "
                    "it downloads OpenAI's files on first use. Offline, pass a local folder "
                    "holding encoder.json and vocab.bpe: tokenizer 'gpt2:/path/to/dir' or "
                    "set MEMLM_GPT2_BPE_DIR=/path/to/dir."
                ) from e
            self.sha256 = dict(GPT2_SHA256)
        if self._enc.n_vocab != GPT2_VOCAB:
            raise DataError(
                f"the GPT-2 BPE files give {self._enc.n_vocab} ids, expected {GPT2_VOCAB}; "
                "pass a folder holding OpenAI's GPT-2 encoder.json and vocab.bpe."
            )

    @property
    def vocab_size(self) -> int:
        return GPT2_VOCAB

    @property
    def eot_id(self) -> int:
        return GPT2_EOT

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return _decode_bytes_ids(ids, self.vocab_size, self._enc.decode_single_token_bytes)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [
            _bytes_display(self._enc.decode_single_token_bytes(int(i)))
            if 0 <= int(i) < self.vocab_size
            else REPLACEMENT
            for i in ids
        ]

    def fingerprint(self) -> str:
        # the path does not change the ids; the files' content does
        return hashlib.sha256(json.dumps(self.sha256, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "gpt2", "folder": self.folder, "sha256": self.sha256}

    @classmethod
    def from_spec(cls, arg: str | None, text: str | None) -> GPT2Tokenizer:
        folder = arg or os.environ.get("MEMLM_GPT2_BPE_DIR") or None
        if folder is not None and not Path(folder).is_dir():
            raise DataError(
                f"GPT-2 BPE folder {folder!r} does not exist; pass a folder holding "
                "encoder.json and vocab.bpe (tokenizer 'gpt2:/path/to/dir')."
            )
        return cls(folder)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPT2Tokenizer:
        want = data.get("sha256") or GPT2_SHA256
        candidates = [data.get("folder"), os.environ.get("MEMLM_GPT2_BPE_DIR")]
        for folder in candidates:
            if folder and Path(folder).is_dir():
                tok = cls(folder)
                if tok.sha256 != want:
                    raise TokenizerMismatchError(
                        f"the GPT-2 BPE files in {folder!r} differ from those this run was "
                        f"trained with (sha256 {want}); point MEMLM_GPT2_BPE_DIR at the "
                        "original encoder.json + vocab.bpe."
                    )
                return tok
        if want != GPT2_SHA256:
            raise TokenizerMismatchError(
                f"this run used non-standard GPT-2 BPE files from {data.get('folder')!r}, "
                "which is gone; restore that folder or set MEMLM_GPT2_BPE_DIR to a copy."
            )
        return cls(None)


def _decode_bytes_ids(ids: Sequence[int], vocab_size: int, token_bytes) -> str:
    """Join the bytes of each id and decode once, so multi-byte characters split across
    tokens come out whole; out-of-vocabulary ids become U+FFFD."""
    out, run = [], b""
    for i in map(int, ids):
        if 0 <= i < vocab_size:
            run += token_bytes(i)
        else:
            out.append(run.decode("utf-8", errors="replace") + REPLACEMENT)
            run = b""
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)


# ----- bpe (trained) --------------------------------------------------------------------------


@TOKENIZERS.register("bpe")
class BPETokenizer(Tokenizer):
    """A byte-level BPE trained on the corpus with HF `tokenizers` (spec `bpe:SIZE`).

    Byte level means any text encodes (no unknown characters). Id 0 is the end-of-text
    token `<|endoftext|>`. The whole trained tokenizer (HF JSON) is stored in the saved
    form, so reloading needs neither the corpus nor a network.
    """

    kind = "bpe"

    def __init__(self, hf_json: str):
        from tokenizers import Tokenizer as HFTokenizer

        self.hf_json = hf_json
        self._tok = HFTokenizer.from_str(hf_json)
        self._eot = self._tok.token_to_id(EOT_TEXT)
        self._size = self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, text: str, vocab_size: int, chunk_chars: int = 1 << 16) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 258:
            raise DataError(
                f"bpe:{vocab_size} is too small: a byte-level BPE needs 256 byte ids plus "
                "the end-of-text id; use bpe:SIZE with SIZE >= 258 (e.g. bpe:4096)."
            )
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TEXT],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        chunks = (text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars))
        tok.train_from_iterator(chunks, trainer=trainer, length=len(text) // chunk_chars + 1)
        return cls(tok.to_str())

    @property
    def name(self) -> str:
        return f"bpe:{self._size}"

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def eot_id(self) -> int | None:
        return self._eot

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def _token_bytes(self, i: int) -> bytes:
        if i == self._eot:
            return EOT_TEXT.encode()
        piece = self._tok.id_to_token(i)
        return bytes(_BYTE_LEVEL[c] for c in piece)

    def decode(self, ids: Sequence[int]) -> str:
        return _decode_bytes_ids(ids, self._size, self._token_bytes)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [
            _bytes_display(self._token_bytes(int(i))) if 0 <= int(i) < self._size else REPLACEMENT
            for i in ids
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "bpe", "vocab_size": self._size, "hf_json": self.hf_json}

    @classmethod
    def from_spec(cls, arg: str | None, text: str | None) -> BPETokenizer:
        try:
            size = int(arg) if arg else 0
        except ValueError:
            size = 0
        if size <= 0:
            raise DataError(
                f"the bpe tokenizer needs a vocabulary size, got 'bpe:{arg or ''}'; "
                "write e.g. 'bpe:4096'."
            )
        if text is None:
            raise DataError(
                f"'bpe:{size}' is trained on the corpus: call make_tokenizer('bpe:{size}', "
                "text=...) or let prepare_data train it on the training text."
            )
        return cls.train(text, size)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BPETokenizer:
        return cls(data["hf_json"])


def _special_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


@TOKENIZERS.register("hf")
class HFTokenizer(Tokenizer):
    """A pretrained transformers model's tokenizer, read from its folder (spec `hf:PATH`).

    Only `tokenizer.json` (the fast-tokenizer file, pure data) and the JSON configs
    beside it are read: no transformers import, no remote code, no pickles. The whole
    tokenizer.json is kept in the saved form, so a run's eval and generate need neither
    the folder nor a network. As for every memlm kind, encode treats special-token text
    such as "<|endoftext|>" in the input as ordinary text and adds no BOS/EOS; the
    end-of-text id is the model's eos token (tokenizer_config.json, else config.json).
    """

    kind = "hf"

    def __init__(self, hf_json: str, eot: str | None = None, source: str | None = None):
        from tokenizers import Tokenizer as FastTokenizer

        self.hf_json, self.eot, self.source = hf_json, eot, source
        self._tok = FastTokenizer.from_str(hf_json)
        self._tok.encode_special_tokens = True  # special-token text in the input is text
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._size = max(vocab.values()) + 1 if vocab else 0
        self._eot = self._tok.token_to_id(eot) if eot else None

    @property
    def name(self) -> str:
        return f"hf:{self.source}" if self.source else "hf"

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def eot_id(self) -> int | None:
        return self._eot

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        # runs of known ids decode together (multi-byte characters across tokens stay
        # whole); an id outside the vocabulary becomes U+FFFD
        out: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if 0 <= i < self._size and self._tok.id_to_token(i) is not None:
                run.append(i)
                continue
            if run:
                out.append(self._tok.decode(run, skip_special_tokens=False))
                run = []
            out.append(REPLACEMENT)
        if run:
            out.append(self._tok.decode(run, skip_special_tokens=False))
        return "".join(out)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self.decode([int(i)]) for i in ids]

    def fingerprint(self) -> str:
        # the folder's path does not change the ids; the tokenizer's content does
        blob = json.dumps({"hf_json": self.hf_json, "eot": self.eot}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "hf", "source": self.source, "eot": self.eot, "hf_json": self.hf_json}

    @classmethod
    def from_spec(cls, arg: str | None, text: str | None) -> HFTokenizer:
        if not arg:
            raise DataError("the hf tokenizer needs the model folder: write 'hf:/path/to/model' "
                            "(the folder that holds tokenizer.json).")
        folder = Path(arg).expanduser()
        if not folder.is_dir() and _hub_id(arg):
            folder = _hub_tokenizer_folder(arg)
        if not folder.is_dir():
            raise DataError(f"tokenizer hf:{arg}: no such folder; give the pretrained model's "
                            "folder (it holds tokenizer.json) or a hub name such as gpt2.")
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise DataError(f"tokenizer hf:{arg}: the folder holds no tokenizer.json (the fast "
                            "tokenizer file); save it with tokenizer.save_pretrained(folder).")
        try:
            hf_json = file.read_text(encoding="utf-8")
            json.loads(hf_json)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"tokenizer hf:{arg}: {file} is not valid JSON ({e}).") from e
        try:
            local = Path(arg).expanduser().is_dir()
            tok = cls(hf_json, _hf_eos(folder), str(folder.resolve()) if local else arg)
        except Exception as e:  # the tokenizers library's parse errors have no common type
            raise DataError(f"tokenizer hf:{arg}: {file} is not a tokenizer the `tokenizers` "
                            f"library reads ({type(e).__name__}: {e}).") from e
        return tok

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HFTokenizer:
        return cls(data["hf_json"], data.get("eot"), data.get("source"))


def _hub_id(name: str) -> bool:
    """'gpt2' or 'org/name' (a hub id), not something spelled like a path."""
    return not name.startswith(("/", ".", "~")) and name.count("/") <= 1 and "\\" not in name


def _hub_tokenizer_folder(name: str) -> Path:
    """The local (cached) folder of a hub model's tokenizer files, fetched when missing."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # comes with transformers
        raise DataError(f"tokenizer hf:{name}: fetching from the hub needs huggingface_hub "
                        "(pip install transformers); or pass a local folder.") from e
    try:
        file = Path(hf_hub_download(name, "tokenizer.json"))
    except Exception as e:  # offline, unknown repo, gated model: all need the same fix
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"tokenizer hf:{name}: not a local folder, and the hub gave no "
                        f"tokenizer.json ({first}); download the model and pass its folder.") from e
    for extra in ("tokenizer_config.json", "config.json"):  # where the eos token is named
        try:
            hf_hub_download(name, extra)
        except Exception:
            pass
    return file.parent


def _hf_eos(folder: Path) -> str | None:
    """The eos token's text: tokenizer_config.json's eos_token, else config.json's id."""
    def read(name: str) -> dict[str, Any]:
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    eos = _special_text(read("tokenizer_config.json").get("eos_token"))
    if eos:
        return eos
    for name in ("generation_config.json", "config.json"):
        eos_id = read(name).get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        if isinstance(eos_id, int):
            from tokenizers import Tokenizer as FastTokenizer

            try:
                return FastTokenizer.from_file(str(folder / "tokenizer.json")).id_to_token(eos_id)
            except Exception:
                return None
    return None


# HF's byte-level BPE spells bytes with the same printable alphabet as GPT-2's files
_BYTE_LEVEL = _gpt2_byte_alphabet()


# ----- construction, loading, checks ----------------------------------------------------------


def make_tokenizer(spec: str, text: str | None = None) -> Tokenizer:
    """Build a tokenizer from a spec: 'byte', 'char', 'gpt2', 'gpt2:DIR', 'bpe:SIZE', 'hf:DIR'.

    `text` is the corpus for the kinds that are fitted on it (char, bpe); the others
    ignore it.
    """
    name, _, arg = spec.strip().partition(":")
    cls = TOKENIZERS.get(name)
    return cls.from_spec(arg or None, text)


def tokenizer_from_dict(data: dict[str, Any]) -> Tokenizer:
    kind = data.get("kind")
    if kind not in TOKENIZERS:
        raise unknown_name("tokenizer", str(kind), TOKENIZERS.names())
    return TOKENIZERS.get(kind).from_dict(data)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved by `Tokenizer.save`: the JSON file, or a folder holding one.

    A run or checkpoint folder holds it as `memlm_tokenizer.json` (so that it never
    collides with a Hugging Face `tokenizer.json` next to it); a folder written by
    `Tokenizer.save` holds `tokenizer.json`. Both are found.
    """
    path = Path(path)
    file = path
    if path.is_dir():
        names = ("memlm_tokenizer.json", "tokenizer.json")
        file = next((path / n for n in names if (path / n).is_file()), path / names[0])
    if not file.is_file():
        raise CheckpointError(
            f"no tokenizer at {file}; pass a run or checkpoint folder (which holds "
            "memlm_tokenizer.json), a folder written by Tokenizer.save, or the JSON file itself."
        )
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not a valid tokenizer file ({e}); it is damaged.") from e
    if not isinstance(data, dict) or "kind" not in data:
        raise CheckpointError(f"{file} lacks the tokenizer 'kind'; it is not a memlm tokenizer.")
    return tokenizer_from_dict(data)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int, where: str | None = None) -> None:
    """Raise TokenizerMismatchError when the tokenizer can produce ids the model lacks.

    A model may have more ids than its tokenizer (a padded vocabulary); fewer is an error,
    because an id >= vocab_size would index past the embedding table.
    """
    if tokenizer.vocab_size > model_vocab_size:
        run = f" {where}" if where else ""
        saved = f"{where}/tokenizer.json" if where else "the run's tokenizer.json"
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids but the model{run} has "
            f"vocab_size {model_vocab_size}, so some ids would index past its embeddings. Use "
            f"the tokenizer saved with the model ({saved}, read by load_tokenizer), or train a "
            f"model with model.vocab_size >= {tokenizer.vocab_size} for this tokenizer."
        )
