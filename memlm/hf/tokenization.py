"""`transformers_tokenizer`: a memlm tokenizer as a transformers fast tokenizer."""

from __future__ import annotations

from typing import Any


def transformers_tokenizer(tokenizer: Any) -> Any:
    """A transformers `PreTrainedTokenizerFast` giving the ids of a memlm tokenizer.

    Tools built on transformers (lm-eval's HFLM, pipelines) take only
    transformers tokenizers. The converted tokenizer encodes every text to the
    ids memlm's encodes it to (`encode(text, add_special_tokens=False)`), and its
    `eos_token_id` (also its bos) is memlm's `eot_id`, which lm-eval uses as the
    prefix of an empty context just as memlm's adapter does. The conversion per
    tokenizer kind (byte, char, gpt2, bpe, hf) is `memlm.data.tokenizer_export.tokenizers_backend`;
    the same tokenizer is saved as tokenizer.json + tokenizer_config.json with
    every checkpoint, so `AutoTokenizer.from_pretrained(folder)` gives it too.
    """
    from transformers import PreTrainedTokenizerFast

    from memlm.data.tokenizer_export import tokenizers_backend

    tok, eot, split_special = tokenizers_backend(tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eot, bos_token=eot,
                                   split_special_tokens=split_special)
