"""The decoder backbone with slots, and the dense GPT baseline built from it.

A `Block` is pre-LayerNorm: x + attn(ln1(x)), then x + ffn(ln2(x)). Both
sublayers are slots filled by factories, so GMT swaps the FFN for a graph-memory
cell and keeps everything else. Sublayers receive the `ForwardContext` and
report aux losses, metrics and traces through it.

The pieces, in order: `embed()` (token embeddings; `add_positions()` alone when
the caller already has embeddings, as RMT/ARMT do around their memory tokens),
`run_blocks()` (the one block loop: a slice of the layers, and an optional
`after_block` observer), `head()` (final norm and LM head); `hidden()` is embed
plus every block. A model that adds memory between the pieces (DNC after a
block or before the head, GMT's per-block write-back, the recurrent backbone
adapter) calls them rather than copying the loop.
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
    return MLP(config.d_model, config.ffn_mult * config.d_model, config.bias, config.dropout,
               config.activation)


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
        """Token embeddings of `input_ids` [B, T] at positions start.. -> [B, T, d]."""
        return self.add_positions(self.wte(input_ids), start)

    def add_positions(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Add learned positions (if any) to embeddings [B, T, d], then embedding dropout."""
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + x.shape[1], device=x.device))
        return self.drop(x)

    def run_blocks(
        self,
        x: torch.Tensor,
        ctx: ForwardContext,
        cache: KVCache | None = None,
        layers: slice = slice(None),
        after_block: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Run the blocks selected by `layers` on the residual stream x [B, T, d].

        `cache` is the whole model's KV cache (block i uses `cache[i]`), so a caller
        that splits the stack into slices passes the same cache to each slice.
        `after_block(i, x)` sees each block's output (GMT's faithful write-back);
        it must not change x.
        """
        for i in range(len(self.blocks))[layers]:
            x = self.blocks[i](x, ctx, self.rope, cache[i] if cache is not None else None)
            if after_block is not None:
                after_block(i, x)
        return x

    def hidden(
        self,
        input_ids: torch.Tensor,
        ctx: ForwardContext,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-block hidden states [B, T, d] (before `ln_f`)."""
        x = self.embed(input_ids, cache.length if cache is not None else 0)
        return self.run_blocks(x, ctx, cache)

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
