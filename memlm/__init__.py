"""memlm: memory-augmented transformer language models, measured against a dense baseline.

    import memlm
    model = memlm.build("gmt", vocab_size=256, n_layer=4, d_model=256)
    out = model(ids, targets=ids, state=None, trace=True)
    model = memlm.load("runs/gmt")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def build(name: str, **overrides: Any):
    """Build architecture `name` with config overrides (the shared size vocabulary)."""
    from memlm.registry import build as _build

    return _build(name, **overrides)


def build_from_config(config):
    """Build a model from a `ModelConfig` (or subclass) instance."""
    from memlm.registry import build_from_config as _build_from_config

    return _build_from_config(config)


def load(path: str | Path, map_location: str = "cpu"):
    """Load a model from a run folder (its best/last checkpoint) or a saved model folder."""
    from memlm.models.base import MemLM
    from memlm.train.run import resolve_model_dir

    return MemLM.from_pretrained(resolve_model_dir(path), map_location=map_location)


def wrap(kind: str, hf_model: Any, **memory_config: Any):
    """Wrap a Hugging Face causal LM as an "rmt" or "armt" memory model (in place).

    `memory_config` takes RMTConfig/ARMTConfig fields (segment_len, num_mem_tokens, d_mem,
    trainable, ...); see memlm/models/rmt.py and armt.py.
    """
    from memlm.models.backbones import wrap as _wrap

    return _wrap(kind, hf_model, **memory_config)


def architectures() -> list[str]:
    from memlm.registry import ARCHITECTURES

    return ARCHITECTURES.names()


# transformers' AutoConfig / AutoModelForCausalLM learn model_type "memlm" (memlm/hf/)
# once transformers is imported; without transformers installed this does nothing.
from memlm._transformers_hook import install as _install_transformers_hook  # noqa: E402

_install_transformers_hook()

__all__ = ["__version__", "architectures", "build", "build_from_config", "load", "wrap"]
