"""memlm tokenizers as transformers tokenizers.

Most memlm tokenizers (byte, char, gpt2, bpe, hf) convert to a `tokenizers` pipeline and
load as transformers' generic `PreTrainedTokenizerFast`. The word tokenizer cannot: a word
outside its vocabulary goes to a crc32-hashed bucket, which no `tokenizers` model does.
`MemlmWordTokenizer` is its transformers form, a Python (slow) tokenizer that calls memlm's
own word tokenizer, so the ids are memlm's by construction; a saved folder names it in
tokenizer_config.json's `auto_map` (remote code that imports the installed memlm, as the
model classes do; memlm/hf_files.py).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizer

from memlm.data.tokenizers import EOT_TEXT, load_tokenizer
from memlm.data.wordlevel import WordTokenizer, join_words
from memlm.hf_files import (
    HF_TOKENIZER_CONFIG,
    MEMLM_TOKENIZER,
    TOKENIZER_MODULE,
    WORD_TOKENIZER_AUTO_MAP,
    tokenizer_remote_code,
)
from memlm.io import atomic_write_text

#: how a hashed bucket's id prints (WordTokenizer.token_strings); never a word of a text,
#: whose words have no "<"
_BUCKET = re.compile(r"<h(\d+)>")


def transformers_tokenizer(tokenizer: Any) -> Any:
    """A transformers tokenizer giving the ids of a memlm tokenizer.

    Tools built on transformers (lm-eval's HFLM, pipelines) take only
    transformers tokenizers. The converted tokenizer encodes every text to the
    ids memlm's encodes it to (`encode(text, add_special_tokens=False)`), and its
    `eos_token_id` (also its bos) is memlm's `eot_id`, which lm-eval uses as the
    prefix of an empty context just as memlm's adapter does. The conversion per
    tokenizer kind (byte, char, gpt2, bpe, hf) is `memlm.data.tokenizer_export.tokenizers_backend`;
    the word tokenizer becomes a `MemlmWordTokenizer`. The same tokenizer is saved with
    every checkpoint, so `AutoTokenizer.from_pretrained(folder)` gives it too
    (`trust_remote_code=True` for the word tokenizer).
    """
    from transformers import PreTrainedTokenizerFast

    from memlm.data.tokenizer_export import tokenizers_backend

    if isinstance(tokenizer, WordTokenizer):
        return MemlmWordTokenizer(word_tokenizer=tokenizer)
    tok, eot, split_special = tokenizers_backend(tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eot, bos_token=eot,
                                   split_special_tokens=split_special)


class MemlmWordTokenizer(PreTrainedTokenizer):
    """memlm's word tokenizer (BABILong) behind transformers' tokenizer API.

    Reads the folder's `memlm_tokenizer.json` (plain JSON: the word list and the bucket
    count). The end-of-text token is id 0, as in memlm; "<|endoftext|>" written in a text is
    ordinary text (split_special_tokens), as memlm encodes it.
    """

    vocab_files_names = {"vocab_file": MEMLM_TOKENIZER}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | None = None, *,
                 word_tokenizer: WordTokenizer | None = None, **kwargs: Any):
        if word_tokenizer is None:
            if vocab_file is None:
                raise ValueError("MemlmWordTokenizer needs the folder's memlm_tokenizer.json "
                                 "(vocab_file) or a memlm WordTokenizer (word_tokenizer=...).")
            word_tokenizer = load_tokenizer(vocab_file)
            if not isinstance(word_tokenizer, WordTokenizer):
                raise ValueError(f"{vocab_file} holds a memlm {word_tokenizer.name} tokenizer, "
                                 "not the word tokenizer MemlmWordTokenizer reads.")
        self.word_tokenizer = word_tokenizer  # set first: the base class asks for the vocab
        for key in ("eos_token", "bos_token"):
            kwargs.setdefault(key, EOT_TEXT)
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.word_tokenizer.vocab_size

    def get_vocab(self) -> dict[str, int]:
        pieces = self.word_tokenizer.token_strings(range(self.vocab_size))
        return {piece: i for i, piece in enumerate(pieces)}

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.word_tokenizer.split(text)

    def _convert_token_to_id(self, token: str) -> int:
        if token == EOT_TEXT:  # how transformers finds eos_token_id
            return self.word_tokenizer.eot_id
        bucket = _BUCKET.fullmatch(token)  # "<h5>", as ids of hashed words print
        if bucket and int(bucket[1]) < self.word_tokenizer.n_hash:
            return self.vocab_size - self.word_tokenizer.n_hash + int(bucket[1])
        return self.word_tokenizer.word_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.word_tokenizer.token_strings([index])[0]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return join_words(tokens)

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoTokenizer") -> None:
        """Does nothing. transformers calls it when `AutoTokenizer` loads the class from a
        folder's remote code; registered, `save_pretrained` would copy this file of memlm
        into the folder, where `save_pretrained` below writes the module importing memlm."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any,
                        **kwargs: Any) -> tuple[str, ...]:
        """transformers' save, then the `auto_map` and the module that import memlm."""
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        for name in saved:
            if Path(name).name.endswith(HF_TOKENIZER_CONFIG):
                config = json.loads(Path(name).read_text(encoding="utf-8"))
                config["auto_map"] = WORD_TOKENIZER_AUTO_MAP
                atomic_write_text(name, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(folder / TOKENIZER_MODULE, tokenizer_remote_code())
        return (*saved, str(folder / TOKENIZER_MODULE))

    def save_vocabulary(self, save_directory: str,
                        filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + MEMLM_TOKENIZER
        path = self.word_tokenizer.save(os.path.join(save_directory, name))
        return (str(path),)
