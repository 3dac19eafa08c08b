"""The files that let stock transformers tools read a memlm folder without `import memlm`.

A folder written by `save_pretrained` (and every training checkpoint) is read
by tools that know nothing about memlm: `AutoConfig`, `AutoModelForCausalLM`,
`AutoTokenizer`, `pipeline("text-generation")` and lm-eval's `--model hf`.
They need three things beside the weights, and this module writes them:

- **remote code**: `configuration_memlm.py` and `modeling_memlm.py`, two tiny
  modules that import the *installed* memlm and re-export its classes, named
  in config.json's `auto_map`. With `trust_remote_code=True` transformers
  imports them, so the model code that runs is memlm's own package, never
  code copied into the folder; without memlm installed they raise an
  ImportError that says what to install.
- **a transformers tokenizer**: `tokenizer.json` + `tokenizer_config.json` (a
  `PreTrainedTokenizerFast`) whose ids equal memlm's tokenizer's ids; for the word
  tokenizer, whose hashed buckets no `tokenizers` model has, `tokenizer_config.json`
  names memlm's `MemlmWordTokenizer` through `tokenization_memlm.py` (remote code
  like the model's) and the ids come from `memlm_tokenizer.json`.
- memlm's own `memlm_tokenizer.json`, which memlm itself reads.

This module names the files and writes the remote code; it sits at the bottom of
the package (models' `save_pretrained` calls it). Converting a memlm tokenizer
into the transformers pair needs the tokenizer classes, so that half lives in
memlm/data/tokenizer_export.py. Nothing here imports transformers (it costs
seconds, and the trainer writes these files with every checkpoint).
"""

from __future__ import annotations

from pathlib import Path

CONFIG_MODULE = "configuration_memlm.py"
MODEL_MODULE = "modeling_memlm.py"
#: the word tokenizer's transformers class (tokenizer_config.json's `auto_map` names it)
TOKENIZER_MODULE = "tokenization_memlm.py"
WORD_TOKENIZER_CLASS = "MemlmWordTokenizer"
WORD_TOKENIZER_AUTO_MAP = {"AutoTokenizer": [f"tokenization_memlm.{WORD_TOKENIZER_CLASS}", None]}
AUTO_MAP = {
    "AutoConfig": "configuration_memlm.MemlmConfig",
    "AutoModelForCausalLM": "modeling_memlm.MemlmForCausalLM",
}
#: memlm's own tokenizer file in a run or model folder (memlm.data.tokenizers reads it)
MEMLM_TOKENIZER = "memlm_tokenizer.json"
HF_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"

_MISSING = (
    "This folder holds a memlm model; loading it needs the memlm package installed in this "
    "environment (pip install memlm, or pip install -e . in a memlm checkout)."
)
# The import sits in a try block: transformers' import scan skips those, so the clear
# message below is what a user without memlm sees, not a list of missing packages.
_REMOTE_TEMPLATE = '''"""Written by memlm: re-exports {names} from the installed memlm package.

transformers imports this file for `trust_remote_code=True`; the model code that runs
is the memlm package installed in this environment, not code stored in this folder.
"""

try:
    from memlm.hf import {names}
except ImportError as e:
    raise ImportError({message!r}) from e

__all__ = {all_names!r}
'''


def remote_code_sources() -> dict[str, str]:
    """File name -> text of the two modules that `AUTO_MAP` points at."""
    out = {}
    for fname, names in ((CONFIG_MODULE, ["MemlmConfig"]),
                         (MODEL_MODULE, ["MemlmConfig", "MemlmForCausalLM"])):
        out[fname] = _REMOTE_TEMPLATE.format(names=", ".join(names), message=_MISSING,
                                             all_names=names)
    return out


def tokenizer_remote_code() -> str:
    """Text of `TOKENIZER_MODULE`, which re-exports memlm's word tokenizer class."""
    return _REMOTE_TEMPLATE.format(names=WORD_TOKENIZER_CLASS, message=_MISSING,
                                   all_names=[WORD_TOKENIZER_CLASS])


def write_remote_code(folder: str | Path) -> None:
    """Write the `auto_map` modules into `folder` (config.json names them)."""
    from memlm.io import atomic_write_text

    for fname, text in remote_code_sources().items():
        atomic_write_text(Path(folder) / fname, text)
