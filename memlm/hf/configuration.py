"""`MemlmConfig`: any memlm architecture's config seen as a transformers config.

One config class serves every architecture: `arch` names the memlm config dataclass
whose fields become attributes, so an architecture added to `memlm/models/` needs no
code here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from memlm.config import ModelConfig
from memlm.registry import ARCHITECTURES

MODEL_TYPE = "memlm"


class MemlmConfig(PretrainedConfig):
    """A memlm `ModelConfig` (any architecture) seen as a transformers config.

    Every field of the architecture's config dataclass is an attribute
    (`config.arch`, `config.d_model`, the architecture's own fields); the usual
    transformers names (`hidden_size`, `num_hidden_layers`,
    `num_attention_heads`, `max_position_embeddings`) are aliases, which is
    what tools such as lm-eval read to find the context length. Values are
    checked by the memlm dataclass, so a bad one fails here with memlm's message.
    """

    model_type = MODEL_TYPE
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "context_len",
    }

    def __init__(self, arch: str = "gpt", **kwargs: Any) -> None:
        config_cls = ARCHITECTURES.get(arch).config_cls
        for alias, name in self.attribute_map.items():
            if alias in kwargs:
                kwargs[name] = kwargs.pop(alias)
        fields = {f.name for f in dataclasses.fields(config_cls)} - {"arch"}
        ours = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
        model_config = config_cls.from_dict({**ours, "arch": arch}, where=f"MemlmConfig({arch!r})")
        kwargs.pop("model_type", None)  # a class attribute; config.json repeats it
        super().__init__(**kwargs)
        for key, value in model_config.to_dict().items():
            setattr(self, key, value)

    @classmethod
    def from_memlm(cls, config: ModelConfig) -> MemlmConfig:
        return cls(**config.to_dict())

    def to_memlm(self) -> ModelConfig:
        """The memlm config dataclass these attributes describe (validated again)."""
        config_cls = ARCHITECTURES.get(self.arch).config_cls
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(config_cls)}
        return config_cls.from_dict(values, where="MemlmConfig")
