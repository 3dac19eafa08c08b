"""Plain building blocks shared by every architecture."""

from memlm.nn.attention import CausalSelfAttention, KVCache, LayerKVCache, RotaryEmbedding
from memlm.nn.mlp import MLP, DualStreamFFN, SwiGLUFFN

__all__ = ["MLP", "DualStreamFFN", "SwiGLUFFN", "CausalSelfAttention", "KVCache", "LayerKVCache", "RotaryEmbedding"]
