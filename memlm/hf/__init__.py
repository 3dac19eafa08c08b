"""transformers classes for every memlm architecture (import registers them).

    import memlm                                   # registers model_type "memlm"
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("runs/gpt/checkpoints/step-0001000")
    out = model(ids, labels=ids)                   # CausalLMOutputWithPast (+ memory_state)
    new = model.generate(ids, max_new_tokens=50)   # same tokens as memlm's own generator

The files follow transformers' own split: `configuration.py` (MemlmConfig),
`modeling.py` (MemlmForCausalLM, its cache and output) and `tokenization.py`
(memlm tokenizers as transformers tokenizers, MemlmWordTokenizer). Folders saved by memlm import
`memlm.hf.MemlmConfig` / `memlm.hf.MemlmForCausalLM` from their remote-code
modules (memlm/hf_files.py), so these names stay here.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from memlm.hf.configuration import MODEL_TYPE, MemlmConfig
from memlm.hf.modeling import MemlmCache, MemlmCausalLMOutput, MemlmForCausalLM
from memlm.hf.tokenization import MemlmWordTokenizer, transformers_tokenizer


def register_auto_classes() -> None:
    """Map model_type "memlm" to these classes in AutoConfig / AutoModelForCausalLM."""
    AutoConfig.register(MODEL_TYPE, MemlmConfig, exist_ok=True)
    AutoModelForCausalLM.register(MemlmConfig, MemlmForCausalLM, exist_ok=True)


register_auto_classes()

__all__ = [
    "MODEL_TYPE",
    "MemlmCache",
    "MemlmCausalLMOutput",
    "MemlmConfig",
    "MemlmForCausalLM",
    "MemlmWordTokenizer",
    "register_auto_classes",
    "transformers_tokenizer",
]
