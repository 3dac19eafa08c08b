"""RMT (Bulatov et al. 2022): memory tokens that frame each segment.

m learned memory vectors are placed around the segment, `[read | text | write]`; the
backbone's final hidden states at the write positions become the next segment's read
block. Only the embeddings, position ids and final hidden states of the backbone are used,
so any causal LM can be wrapped. The segment loop itself lives in `RecurrentLM`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from memlm.models.backbones import SegmentKV
from memlm.models.recurrent import RecurrentConfig, RecurrentLM, _append_trace
from memlm.registry import register_arch


@dataclass
class RMTConfig(RecurrentConfig):
    arch: str = "rmt"
    #: new memory from the final hidden state after the final norm (reference) or before it
    memory_from: Literal["final_norm", "pre_norm"] = "final_norm"


class RMTState(NamedTuple):
    memory: torch.Tensor  # [B, m, d] float32
    window: SegmentKV | None = None  # sliding_window: the previous segment's text KV


@register_arch(
    "rmt", RMTConfig, "Recurrent Memory Transformer: read/write memory tokens around each segment",
    inspector="memlm.inspect.recurrent:inspect_rmt",
    health="memlm.inspect.health:rmt_health",
    tiny=dict(num_mem_tokens=4, memory_from="final_norm"),
    cost=6.0,  # benchmarks/arch_cost.py
)
class RMT(RecurrentLM):
    """`[read | text | write]` per segment; the write outputs are the next read block."""

    config_class = RMTConfig
    config: RMTConfig

    def __init__(self, config: RMTConfig, backbone: nn.Module | None = None):
        super().__init__(config, backbone)
        m, d = config.num_mem_tokens, self.backbone.input_embeddings().weight.shape[1]
        self.mem_init = nn.Parameter(torch.randn(m, d) * self.embed_std)
        self.set_trainable(config.trainable)

    @staticmethod
    def extra_positions(config: RecurrentConfig) -> int:
        return 2 * config.num_mem_tokens

    def memory_parameters(self) -> list[nn.Parameter]:
        return [self.mem_init]

    def init_state(self, batch_size: int, device=None) -> RMTState:
        mem = self.mem_init.float().to(device or self.mem_init.device)
        return RMTState(mem.unsqueeze(0).expand(batch_size, -1, -1))

    def _segment(self, ids, state, mask, ctx, stats):
        b, n = ids.shape
        m = self.config.num_mem_tokens
        emb = self.backbone.embed(ids)
        mem = state.memory.to(emb.dtype)
        x = torch.cat([mem, emb, mem], dim=1)
        ext = None if mask is None else torch.cat([mask.new_ones(b, m), mask, mask.new_ones(b, m)], 1)
        pre_norm = self.config.memory_from == "pre_norm"
        pre, post, window = self._run_backbone(x, ext, state.window, (m, m + n), ctx, pre_norm)
        logits = self.backbone.logits(post[:, m : m + n])
        new = (pre if pre_norm else post)[:, m + n :].float()
        rows = self._row_mask(mask)
        if rows is not None:
            new = torch.where(rows[:, None, None], new, state.memory)
        with torch.no_grad():
            old = state.memory.float()
            stats.append({
                "rmt_mem_norm": new.norm(dim=-1).mean(),
                "rmt_mem_change": 1.0 - F.cosine_similarity(new, old, dim=-1, eps=1e-6).mean(),
            })
            if ctx.trace_enabled:  # per segment and memory token, for `memlm inspect`
                _append_trace(ctx, "rmt_read_norm", old.norm(dim=-1)[:, None])
                _append_trace(ctx, "rmt_write_norm", new.norm(dim=-1)[:, None])
                _append_trace(ctx, "rmt_write_delta", (new - old).norm(dim=-1)[:, None])
        return logits, RMTState(new, window)

    def _cached_open(self, state, kv, ctx):
        mem = state.memory.to(self.backbone.input_embeddings().weight.dtype)
        self._cached_run(mem, state, kv, ctx)  # the read block: the m slots after any window

    def _cached_step(self, ids, state, kv, ctx):
        _, post = self._cached_run(self.backbone.embed(ids), state, kv, ctx)
        return self.backbone.logits(post)
