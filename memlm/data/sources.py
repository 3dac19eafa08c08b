"""Reading text and token files safely: which files a source names, their text, cut points.

Every reader of user files goes through here: training corpora (data/corpus.py), the
BABILong background (data/background.py) and the stream evaluator (eval/stream.py).
The rules:

* **Files.** A source item is a file, a folder (every ``*.txt`` below it, sorted) or a
  glob (sorted matches); `resolve_files`.
* **Text.** UTF-8 only; an empty file, a NUL byte or invalid UTF-8 is refused with the
  offset, never decoded into garbage (`read_file`, `iter_file_pieces`).
* **Chunks.** A long text is tokenised in pieces cut where the cut cannot change the ids.
  Two cut rules exist on purpose: the corpus cache cuts only after a lone newline
  ("x\\ny") with a hard cut as a last resort (`_safe_cuts`, `iter_file_pieces`); the
  stream reader (`iter_text_chunks`) also accepts "\\n y" and never hard-cuts, keeping
  the whole text in memory only until such a point appears.
* **Token files.** ``.bin`` holds raw ids as uint16 while the vocabulary fits in it, else
  uint32 (`token_dtype`); ``.npy`` is memory-mapped as saved (`open_tokens`).
"""

from __future__ import annotations

import codecs
import glob as globlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memlm.errors import DataError

#: characters tokenised per call (and read per block); also the progress bar's step
CHUNK_CHARS = 1 << 20
_GLOB_CHARS = set("*?[")
# stream cut points (we cut right after the newline): "x\ny" or "\n y" (x, y non-space).
# GPT-2's pre-tokeniser then ends a whitespace run at the newline in the whole text as in
# the chunk
_CUT = re.compile(r"\S\n(?=\S)|\n(?= \S)")


def resolve_files(item: str | Path, where: str = "data.source", what: str = "data file"
                  ) -> list[Path]:
    """The files one source item names: a file, a folder's *.txt (recursive, sorted), or a
    glob's matches (sorted). `where` and `what` say in errors which setting named it."""
    item = str(item)
    expanded = os.path.expanduser(item)
    if _GLOB_CHARS & set(item):
        matches = sorted(Path(p) for p in globlib.glob(expanded, recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise DataError(f"the pattern {item!r} matches no file; check the glob in {where}.")
        return files
    path = Path(expanded)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"folder {item!r} holds no *.txt file; put text files in it.")
        return files
    if not path.exists():
        raise DataError(f"{what} {item!r} does not exist; check the path in {where}.")
    return [path]


def read_file(path: str | Path) -> str:
    """A UTF-8 text file's content; DataError when missing, empty or binary."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist; check the path in data.source.")
    if path.is_dir():
        raise DataError(f"{str(path)!r} is a folder; read it as a source (read_text) instead.")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"data file {str(path)!r} is empty; give a file with text in it.")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(
            f"data file {str(path)!r} looks binary (a NUL byte at offset {nul}); memlm reads "
            "UTF-8 text files. Convert it to plain text first."
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(
            f"data file {str(path)!r} looks binary: it is not valid UTF-8 (byte {e.start}); "
            "memlm reads UTF-8 text files. Re-encode it (e.g. iconv -t UTF-8)."
        ) from e


def _safe_cuts(text: str, chunk: int) -> Iterator[tuple[int, int]]:
    """Chunk boundaries where tokenising the pieces equals tokenising the whole.

    A cut goes right after a lone newline (non-space on both sides): GPT-2 style
    pre-tokenisation (gpt2, bpe) makes such a newline a piece of its own whether or not
    text follows, whereas a run like "\n\n" is split differently at the end of a string.
    Byte and char tokenisation are per character anyway. A window without a lone
    newline is cut at the chunk size (the only place where ids may differ slightly).
    """
    pos, n = 0, len(text)
    while pos < n:
        end = pos + chunk
        if end >= n:
            yield pos, n
            return
        floor = pos + chunk // 2
        j = text.rfind("\n", floor, end)
        while j != -1 and (text[j + 1].isspace() or text[j - 1].isspace()):
            j = text.rfind("\n", floor, j)
        cut = j + 1 if j != -1 else end
        yield pos, cut
        pos = cut


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in it (half the disk and RAM), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _last_safe_cut(text: str) -> int | None:
    """Index just after the last lone newline ("x\ny", x and y non-space), else None."""
    j = text.rfind("\n", 0, len(text) - 1)
    while j > 0:
        if not text[j - 1].isspace() and not text[j + 1].isspace():
            return j + 1
        j = text.rfind("\n", 0, j)
    return None


def iter_file_pieces(path: str | Path, block: int = CHUNK_CHARS) -> Iterator[str]:
    """A UTF-8 text file's text in pieces cut at lone newlines, read a block at a time.

    Checks what `read_file` checks (exists, not empty, no NUL byte, valid UTF-8; a BOM
    is dropped) without holding the file in memory. The cuts follow `_safe_cuts`, so the
    pieces tokenise to the same ids as the whole text.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist or is not a file.")
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    buf, offset, seen_text = "", 0, False
    with open(path, "rb") as f:
        while True:
            raw = f.read(block)
            nul = raw.find(b"\0")
            if nul >= 0:
                raise DataError(
                    f"data file {str(path)!r} looks binary (a NUL byte at offset {offset + nul});"
                    " memlm reads UTF-8 text files. Convert it to plain text first."
                )
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"data file {str(path)!r} looks binary: it is not valid UTF-8 (near byte "
                    f"{offset + e.start}); memlm reads UTF-8 text files. Re-encode it "
                    "(e.g. iconv -t UTF-8)."
                ) from e
            offset += len(raw)
            seen_text = seen_text or bool(text.strip())
            buf += text
            if not raw:
                break
            if len(buf) >= block:
                cut = _last_safe_cut(buf[block // 2 :])
                cut = block // 2 + cut if cut is not None else (len(buf) if len(buf) >= 4 * block
                                                                 else None)
                if cut is not None:
                    yield buf[:cut]
                    buf = buf[cut:]
    if not seen_text:
        raise DataError(f"data file {str(path)!r} is empty; give a file with text in it.")
    if buf:
        yield buf


def iter_text_chunks(path: str | Path, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Read a UTF-8 text file lazily, yielding pieces cut only at safe newlines."""
    buf = ""
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            block = f.read(chunk_chars)
            if not block:
                break
            buf += block
            cut = None
            for match in _CUT.finditer(buf, max(0, len(buf) - chunk_chars - 2)):
                cut = match.end()
            if cut is not None:
                yield buf[:cut]
                buf = buf[cut:]
    if buf:
        yield buf


def _encode(tokenizer: Any, text: str) -> np.ndarray:
    if hasattr(tokenizer, "encode_array"):
        return np.asarray(tokenizer.encode_array(text), dtype=np.int64)
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def open_tokens(path_or_ids: Any, tokenizer: Any = None, dtype: str | None = None) -> Any:
    """A sized array (memmap / array) or an iterator of id chunks for `path_or_ids`."""
    if isinstance(path_or_ids, torch.Tensor):
        return path_or_ids.detach().cpu().reshape(-1).numpy()
    if isinstance(path_or_ids, np.ndarray):
        return path_or_ids.reshape(-1)
    if isinstance(path_or_ids, (str, Path)):
        path = Path(path_or_ids)
        if not path.is_file():
            raise DataError(f"stream source {str(path)!r} is not a file; give a text file, "
                            "a .bin/.npy token file or an id array.")
        if path.suffix == ".npy":
            return np.load(path, mmap_mode="r").reshape(-1)
        if path.suffix == ".bin":
            vocab = getattr(tokenizer, "vocab_size", None)
            dt = dtype or (np.dtype(np.uint16) if vocab is None else token_dtype(vocab))
            return np.memmap(path, dtype=dt, mode="r")
        if tokenizer is None:
            raise DataError(f"{path} is a text file; pass the tokenizer that encodes it.")
        return (_encode(tokenizer, piece) for piece in iter_text_chunks(path))
    if isinstance(path_or_ids, Iterable):
        return (np.asarray(c, dtype=np.int64).reshape(-1) for c in path_or_ids)
    raise DataError(f"cannot stream a {type(path_or_ids).__name__}; give ids, a file or chunks.")
