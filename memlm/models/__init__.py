"""Architectures. Importing this package registers every one of them."""

from memlm.models.base import IGNORE_INDEX, ForwardContext, MemLM, ModelOutput
from memlm.models.decoder import GPT, Block, Decoder, GPTConfig

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
