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

import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizer

from memlm.data.tokenizers import EOT_TEXT, load_tokenizer
from memlm.data.wordlevel import WordTokenizer, join_words
from memlm.hf_files import (
    MEMLM_TOKENIZER,
    TOKENIZER_MODULE,
    WORD_TOKENIZER_AUTO_MAP,
    tokenizer_remote_code,
)
from memlm.io import atomic_write_text


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
    #: what transformers' save_pretrained writes as tokenizer_config.json's auto_map
    _auto_map = WORD_TOKENIZER_AUTO_MAP
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
        return self.word_tokenizer.piece_id(token)  # EOT_TEXT -> 0: how eos_token_id is found

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
        """transformers' save (its tokenizer_config.json takes `_auto_map`), then the
        module that `auto_map` names."""
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        module = Path(save_directory) / TOKENIZER_MODULE
        atomic_write_text(module, tokenizer_remote_code())
        return (*saved, str(module))

    def save_vocabulary(self, save_directory: str,
                        filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + MEMLM_TOKENIZER
        path = self.word_tokenizer.save(os.path.join(save_directory, name))
        return (str(path),)
