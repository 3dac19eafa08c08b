"""memlm tokenizer -> the transformers tokenizer files (`tokenizer.json` + its config).

So that `AutoTokenizer.from_pretrained(folder)` and pipelines read a memlm folder
with ids equal to memlm's own tokenizer (see memlm/hf_files.py for the other files
of a folder). Only the `tokenizers` package is used, never transformers.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from memlm.data.tokenizers import EOT_TEXT, _gpt2_byte_alphabet
from memlm.errors import ConfigError
from memlm.hf_files import (
    HF_TOKENIZER,
    HF_TOKENIZER_CONFIG,
    MEMLM_TOKENIZER,
    TOKENIZER_MODULE,
    WORD_TOKENIZER_AUTO_MAP,
    WORD_TOKENIZER_CLASS,
    tokenizer_remote_code,
)
from memlm.io import atomic_write_text


def tokenizers_backend(tokenizer: Any) -> tuple[Any, str, bool]:
    """(a `tokenizers.Tokenizer` giving memlm's ids, its eot text, split_special_tokens).

    Per memlm kind:
    * byte: a 256-id byte-level BPE without merges (one id per UTF-8 byte); the
      end-of-text token is byte 0 (memlm's eot), spelled with GPT-2's byte alphabet.
    * gpt2: GPT-2's vocabulary and merges, from the tokenizer's folder
      (`gpt2:DIR`) or, for tiktoken's download, rebuilt from tiktoken's ranks.
    * bpe: memlm's trained HF tokenizer as is.
    * hf: the pretrained model's tokenizer.json as is (its eos token is the eot).
    * char: one id per character; a character outside the fitted vocabulary
      raises, as memlm's char tokenizer does.

    The text "<|endoftext|>" is ordinary text for byte, char and gpt2 (memlm's
    rule, so split_special_tokens is True); memlm's bpe tokenizer itself maps it
    to its eot id, and so does the converted one.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers



    kind = getattr(tokenizer, "kind", None)
    split_special = True
    if kind == "byte":
        spelling = {b: c for c, b in _gpt2_byte_alphabet().items()}
        tok = Tokenizer(models.BPE(vocab={spelling[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        eot = spelling[tokenizer.eot_id]
    elif kind == "gpt2":
        vocab, merges = _gpt2_vocab_and_merges(tokenizer)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        eot = EOT_TEXT
    elif kind == "bpe":
        tok, eot, split_special = Tokenizer.from_str(tokenizer.hf_json), EOT_TEXT, False
    elif kind == "hf" and tokenizer.eot:  # a pretrained model's own tokenizer.json
        tok, eot = Tokenizer.from_str(tokenizer.hf_json), tokenizer.eot
    elif kind == "char":
        vocab = {ch: i for i, ch in enumerate(tokenizer.chars)}
        vocab[EOT_TEXT] = tokenizer.eot_id
        tok = Tokenizer(models.WordLevel(vocab))
        tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        tok.decoder = decoders.Fuse()
        eot = EOT_TEXT
    else:
        raise ConfigError(
            f"cannot convert a {type(tokenizer).__name__} (kind {kind!r}) to a transformers "
            "tokenizer; memlm converts its byte, char, gpt2 and bpe tokenizers."
        )
    if tok.token_to_id(eot) is None or not any(t.content == eot for t in
                                              tok.get_added_tokens_decoder().values()):
        tok.add_special_tokens([AddedToken(eot, special=True, normalized=False)])
    return tok, eot, split_special


def _gpt2_vocab_and_merges(tokenizer: Any) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's vocabulary (byte-alphabet spelling -> id) and its ordered merges."""
    if tokenizer.folder is not None:
        folder = Path(tokenizer.folder)
        vocab = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
        lines = (folder / "vocab.bpe").read_text(encoding="utf-8").splitlines()
        # only the first line is a header ("#version: 0.2"): merges such as "# #" start with
        # "#" too, and dropping them would split "##" differently from GPT-2
        merges = [tuple(line.split()) for line in lines[1:] if line]
        return vocab, merges
    ranks = tokenizer._enc._mergeable_ranks  # tiktoken's own table: bytes -> id
    spell = {b: c for c, b in _gpt2_byte_alphabet().items()}

    def spelled(raw: bytes) -> str:
        return "".join(spell[b] for b in raw)

    vocab = {spelled(raw): rank for raw, rank in ranks.items()}
    vocab.update(tokenizer._enc._special_tokens)
    merges = [(spelled(a), spelled(b)) for a, b in merges_from_ranks(ranks)]
    return vocab, merges


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The ordered BPE merges behind a tiktoken rank table.

    tiktoken stores only token -> rank; a rank is also the merge priority. The
    merge that made a token is found by running BPE on the token's bytes with
    only lower-ranked tokens allowed: it stops at exactly two parts, and those
    are the pair merged. Sorting by the token's rank gives the merge order.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, where = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best):
                    best, where = r, i
            if best is None:
                break
            parts[where : where + 2] = [parts[where] + parts[where + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def transformers_tokenizer_files(tokenizer: Any, model_max_length: int | None = None
                                 ) -> dict[str, str]:
    """File name -> text of the transformers tokenizer files for a memlm tokenizer.

    tokenizer_config.json names `PreTrainedTokenizerFast` (transformers' generic
    fast tokenizer, which reads tokenizer.json) and memlm's end-of-text token as
    eos and bos: lm-eval uses it as the prefix of an empty context, as memlm's
    adapter does. `model_max_length` is the model's context length.
    """
    if getattr(tokenizer, "kind", None) == "word":
        return _word_tokenizer_files(model_max_length)
    tok, eot, split_special = tokenizers_backend(tokenizer)
    config = _tokenizer_config("PreTrainedTokenizerFast", eot, split_special, model_max_length)
    return {HF_TOKENIZER: tok.to_str(), HF_TOKENIZER_CONFIG: config}


def _tokenizer_config(tokenizer_class: str, eot: str, split_special: bool,
                      model_max_length: int | None, **extra: Any) -> str:
    """tokenizer_config.json's text: the class, memlm's end-of-text token as eos and bos."""
    config: dict[str, Any] = {
        "tokenizer_class": tokenizer_class,
        **extra,
        "bos_token": eot,
        "eos_token": eot,
        "split_special_tokens": split_special,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


def write_tokenizer_files(tokenizer: Any, folder: str | Path,
                          model_max_length: int | None = None) -> None:
    """memlm's tokenizer file plus the transformers pair, into a model folder.

    What the trainer and `memlm calibrate --out` call for every folder they
    write, so `AutoTokenizer.from_pretrained(folder)` and pipelines work on it.
    """

    folder = Path(folder)
    tokenizer.save(folder / MEMLM_TOKENIZER)
    try:
        files = transformers_tokenizer_files(tokenizer, model_max_length)
    except ConfigError as e:  # e.g. an hf tokenizer without an end-of-text token
        warnings.warn(f"{e} The folder keeps memlm's own tokenizer only: "
                      "AutoTokenizer cannot load it.", stacklevel=2)
        return
    for fname, text in files.items():
        atomic_write_text(folder / fname, text)


def _word_tokenizer_files(model_max_length: int | None) -> dict[str, str]:
    """The word tokenizer's config and remote-code module: `AutoTokenizer` with
    `trust_remote_code=True` builds memlm's `MemlmWordTokenizer` from the folder's
    memlm_tokenizer.json (no tokenizer.json: no `tokenizers` model hashes words)."""
    config = _tokenizer_config(WORD_TOKENIZER_CLASS, EOT_TEXT, True, model_max_length,
                               auto_map=WORD_TOKENIZER_AUTO_MAP)
    return {HF_TOKENIZER_CONFIG: config, TOKENIZER_MODULE: tokenizer_remote_code()}
