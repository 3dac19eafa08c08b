"""Plain building blocks shared by every architecture."""

from memlm.nn.attention import CausalSelfAttention, KVCache, LayerKVCache, RotaryEmbedding
from memlm.nn.mlp import MLP

__all__ = ["MLP", "CausalSelfAttention", "KVCache", "LayerKVCache", "RotaryEmbedding"]
