"""Architectures. Importing this package registers every one of them."""

from memlm.models.base import ForwardContext, MemLM, ModelOutput
from memlm.models.decoder import GPT, Block, Decoder, GPTConfig
from memlm.types import IGNORE_INDEX

__all__ = [
    "GPT",
    "IGNORE_INDEX",
    "Block",
    "Decoder",
    "ForwardContext",
    "GPTConfig",
    "MemLM",
    "ModelOutput",
]
