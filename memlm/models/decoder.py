"""The decoder backbone with slots, and the dense GPT baseline built from it.

A `Block` is pre-LayerNorm: x + attn(ln1(x)), then x + ffn(ln2(x)). Both
sublayers are slots filled by factories, so GMT swaps the FFN for a graph-memory
cell and keeps everything else. Sublayers receive the `ForwardContext` and
report aux losses, metrics and traces through it.

`Decoder.hidden()` returns the final-layer states before the output norm, and
`Decoder.head()` turns them into logits; memory modules that sit between the
two (DNC) or wrap the block list (RMT/ARMT) use these pieces directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memlm.config import ModelConfig
from memlm.models.base import ForwardContext, MemLM, ModelOutput
from memlm.nn.attention import CausalSelfAttention, KVCache, RotaryEmbedding
from memlm.nn.mlp import MLP
from memlm.registry import register_arch

SublayerFactory = Callable[[ModelConfig, int], nn.Module]


def dense_ffn(config: ModelConfig, layer_idx: int) -> nn.Module:
    return MLP(config.d_model, config.ffn_mult * config.d_model, config.bias, config.dropout)


def causal_attention(config: ModelConfig, layer_idx: int) -> nn.Module:
    return CausalSelfAttention(config.d_model, config.n_head, config.bias, config.dropout)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, attn: nn.Module, ffn: nn.Module):
        super().__init__()
        self.layer_idx = layer_idx
        self.ln1 = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.attn = attn
        self.ln2 = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.ffn = ffn

    def forward(
        self,
        x: torch.Tensor,
        ctx: ForwardContext,
        rope: RotaryEmbedding | None = None,
        cache=None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), rope=rope, cache=cache, ctx=ctx)
        return x + self.ffn(self.ln2(x), ctx=ctx)


class Decoder(nn.Module):
    """Embeddings -> blocks -> final norm -> tied LM head."""

    def __init__(
        self,
        config: ModelConfig,
        make_attn: SublayerFactory = causal_attention,
        make_ffn: SublayerFactory = dense_ffn,
    ):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = (
            nn.Embedding(config.context_len, config.d_model)
            if config.pos_emb == "learned" else None
        )
        self.rope = (
            RotaryEmbedding(config.head_dim, config.context_len, config.rope_theta)
            if config.pos_emb == "rope" else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config, i, make_attn(config, i), make_ffn(config, i))
            for i in range(config.n_layer)
        )
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def embed(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = self.wte(input_ids)
        if self.wpe is not None:
            pos = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
            x = x + self.wpe(pos)
        return self.drop(x)

    def hidden(
        self,
        input_ids: torch.Tensor,
        ctx: ForwardContext,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-block hidden states [B, T, d] (before `ln_f`)."""
        x = self.embed(input_ids, cache.length if cache is not None else 0)
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, self.rope, cache[i] if cache is not None else None)
        return x

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(h))

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        c = self.config
        device = device or self.wte.weight.device
        return KVCache(c.n_layer, batch_size, c.n_head, c.head_dim, max_len, device,
                       dtype or torch.float32)


@dataclass
class GPTConfig(ModelConfig):
    arch: str = "gpt"


@register_arch("gpt", GPTConfig, "dense GPT baseline (pre-LN, SDPA, RoPE or learned positions)")
class GPT(MemLM):
    """The dense baseline every memory model is measured against."""

    config_class = GPTConfig

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.decoder = Decoder(config)
        self.init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        state: Any = None,
        trace: bool = False,
        cache: KVCache | None = None,
    ) -> ModelOutput:
        self.check_length(input_ids, cache)
        ctx = ForwardContext(trace)
        logits = self.decoder.head(self.decoder.hidden(input_ids, ctx, cache))
        return self.assemble_output(logits, targets, ctx)

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        return self.decoder.make_cache(batch_size, max_len, device, dtype)
