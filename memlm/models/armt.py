"""ARMT (Rodkin et al. 2024): a delta-rule associative memory in every layer.

Every backbone layer gets an associative memory (`memlm/memory/associative.py`); m memory
tokens are appended after the text, `[text | mem]`, and their per-layer outputs are written
into the layer's memory (A, z). The segment loop itself lives in `RecurrentLM`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

from memlm.config import PositiveFloat, PositiveInt
from memlm.errors import ConfigError
from memlm.memory.associative import (
    AssociativeMemory,
    LayerMemory,
    MemoryCall,
    can_write_together,
    empty_states,
    memory_call,
    new_group,
    wrap_layers,
    write_layers,
)
from memlm.models.backbones import SegmentKV
from memlm.models.base import ForwardContext, ModelOutput
from memlm.models.recurrent import RecurrentConfig, RecurrentLM, _append_trace
from memlm.registry import register_arch


@dataclass
class ARMTConfig(RecurrentConfig):
    arch: str = "armt"
    d_mem: PositiveInt = 64
    dpfp_order: PositiveInt = 3
    mem_heads: PositiveInt = 1
    use_denom: bool = True
    correction: bool = True
    #: the paper code's first write: gamma = 1 for every key while z is still empty. Off by
    #: default: on memlm's 2,000-segment stability test it made a briefly trained tiny ARMT
    #: degenerate (top-token share 0.59 -> 0.91); the importers turn it on for parity
    first_write_whole: bool = False
    #: "l2" as in the ARMT code's later versions; "none" as in the paper's July 2024 code,
    #: whose memory blew up in memlm's BABILong recipe (docs/recurrent.md, measured)
    key_norm: Literal["l2", "none"] = "l2"
    #: bound on the memory: (A, z) are rescaled together once z's mass exceeds this many
    #: segments' worth of key mass (reads are invariant to the rescale); null: unbounded
    mem_capacity: PositiveFloat | None = 64.0
    #: initial bias of the write gate's logit, so beta starts at sigmoid(bias); null keeps
    #: PyTorch's default init (beta ~0.5). A positive bias keeps the memory open early,
    #: against runs that switch it off (docs/recurrent.md, "Keeping the memory in use")
    write_gate_bias: float | None = None
    #: cap on each position's read: at most read_cap x the norm of its hidden state; null:
    #: no cap. Bounds the read far beyond the training length (docs/recurrent.md)
    read_cap: PositiveFloat | None = None
    #: "float32" (default; F4 in docs/recurrent.md) or "model": keep A and z in the
    #: parameters' dtype
    state_dtype: Literal["float32", "model"] = "float32"


class ARMTState(NamedTuple):
    layers: tuple[LayerMemory, ...]  # one (A, z) per wrapped layer, float32
    window: SegmentKV | None = None  # sliding_window: the previous segment's text KV


@register_arch(
    "armt", ARMTConfig,
    "Associative Recurrent Memory Transformer: per-layer delta-rule associative memory",
    inspector="memlm.inspect.recurrent:inspect_armt",
    health="memlm.inspect.health:armt_output_health",
    # every field the demo relies on is pinned, so a library default cannot move its result
    tiny=dict(num_mem_tokens=4, d_mem=16, dpfp_order=3, mem_heads=1, use_denom=True,
              correction=True, key_norm="l2", state_dtype="float32", mem_capacity=None,
              first_write_whole=False),
    cost=12.0,  # benchmarks/arch_cost.py
)
class ARMT(RecurrentLM):
    """`[text | mem]` per segment; every layer reads from and writes to its own (A, z)."""

    config_class = ARMTConfig
    config: ARMTConfig

    def __init__(self, config: ARMTConfig, backbone: nn.Module | None = None):
        super().__init__(config, backbone)
        d = self.backbone.input_embeddings().weight.shape[1]
        self._group = new_group()

        def make_memory() -> AssociativeMemory:
            return AssociativeMemory(d, config.d_mem, config.dpfp_order, config.mem_heads,
                                     config.use_denom, config.correction, config.key_norm,
                                     config.mem_capacity, config.first_write_whole,
                                     write_gate_bias=config.write_gate_bias,
                                     read_cap=config.read_cap)

        wrap_layers(self.backbone.layers(), make_memory, self._group)
        #: write all layers' memories in one stacked op after the backbone call (the same
        #: maths as writing each inside its layer; False keeps the per-layer reference path)
        self.write_together = True
        #: skip the reads of all-zero states (a fresh stream's first segment): they return
        #: exactly zero (False keeps the reference path)
        self.skip_empty_reads = True
        self.mem_tokens = nn.Parameter(torch.randn(config.num_mem_tokens, d) * self.embed_std)
        self.set_trainable(config.trainable)

    @staticmethod
    def extra_positions(config: RecurrentConfig) -> int:
        return config.num_mem_tokens

    def memory_parameters(self) -> list[nn.Parameter]:
        params = [self.mem_tokens]
        for layer in self.backbone.layers():
            params += list(layer.memory.parameters())
        return params

    def init_state(self, batch_size: int, device=None) -> ARMTState:
        device = device or self.mem_tokens.device
        dtype = torch.float32 if self.config.state_dtype == "float32" else self.mem_tokens.dtype
        return ARMTState(tuple(layer.memory.init_state(batch_size, device, dtype)
                               for layer in self.backbone.layers()))

    def _check_runtime(self) -> None:
        # HF's gradient_checkpointing_enable flags the layers (and older versions the base
        # model); looking there instead of at every module keeps this check cheap
        model = self.backbone.model
        watched = [model, getattr(model, "base_model", model)]
        watched += [layer.layer for layer in self.backbone.layers()]
        for module in watched:
            if getattr(module, "gradient_checkpointing", False) is True:
                raise ConfigError(
                    "gradient checkpointing is enabled on the backbone, but ARMT layers produce "
                    "their new memory as a side output that a recompute cannot carry; call "
                    "model.backbone.model.gradient_checkpointing_disable()."
                )

    def _call(self, state: ARMTState, write: bool, mem_start: int, rows) -> MemoryCall:
        layers = tuple(state.layers)
        return MemoryCall(self._group, layers, write, mem_start, rows,
                          empty=empty_states(layers) if self.skip_empty_reads else [])

    def _segment(self, ids, state, mask, ctx, stats):
        b, n = ids.shape
        m = self.config.num_mem_tokens
        emb = self.backbone.embed(ids)
        x = torch.cat([emb, self.mem_tokens.to(emb.dtype).unsqueeze(0).expand(b, m, -1)], dim=1)
        ext = None if mask is None else torch.cat([mask, mask.new_ones(b, m)], dim=1)
        call = self._call(state, True, n, self._row_mask(mask))
        memories = [layer.memory for layer in self.backbone.layers()]
        call.defer_write = self.write_together and can_write_together(memories)
        with memory_call(call):
            _, post, window = self._run_backbone(x, ext, state.window, (0, n), ctx)
        if call.defer_write:
            write_layers(memories, call)
        logits = self.backbone.logits(post[:, :n])
        new = ARMTState(tuple(call.state_out), window)
        self._record(call, new, ctx, stats, n)
        return logits, new

    def read_diagonal(self, ids: torch.Tensor, state: ARMTState | None = None) -> ModelOutput:
        """Read `ids` [B, T] with diagonal batching (memlm/models/armt_diagonal.py): the
        same logits and final state as `forward` in eval mode, with layer l of segment s
        run in one batched pass alongside layer l - 1 of segment s + 1."""
        from memlm.models.armt_diagonal import read_diagonal

        logits, state = read_diagonal(self, ids, state)
        return ModelOutput(logits=logits, state=state)

    def _cached_step(self, ids, state, kv, ctx):
        call = self._call(state, False, ids.shape[1], None)
        with memory_call(call):
            _, post = self._cached_run(self.backbone.embed(ids), state, kv, ctx)
        return self.backbone.logits(post)

    @torch.no_grad()
    def _record(self, call: MemoryCall, new: ARMTState, ctx: ForwardContext, stats, n: int):
        """Per-segment diagnostics (docs/recurrent.md#diagnostics), averaged over layers."""
        per_layer = call.stats
        seg = {
            "armt_a_norm": torch.stack([s.A.float().flatten(1).norm(dim=1).mean()
                                        for s in new.layers]).mean(),
            "armt_z_sum": torch.stack([s.z.float().flatten(1).sum(1).mean()
                                       for s in new.layers]).mean(),
        }
        for key in ("beta_mean", "gamma_mean", "read_share"):
            if all(key in s for s in per_layer):
                seg[f"armt_{key}"] = torch.stack([s[key] for s in per_layer]).mean()
        stats.append(seg)
        if ctx.trace_enabled and all(r is not None for r in call.read_norms):
            norms = torch.stack([r[:, :n] for r in call.read_norms], dim=-1)  # [B, n, N_L]
            prev = ctx.trace.get("armt_read_norm")
            ctx.add_trace("armt_read_norm", norms if prev is None else torch.cat([prev, norms], 1))
        if ctx.trace_enabled:  # per segment and layer, for `memlm inspect`
            pairs = list(zip(call.state_in, new.layers))
            for key, delta in (("armt_write_norm", lambda o, s: s.A.float() - o.A.float()),
                               ("armt_z_write", lambda o, s: s.z.float() - o.z.float()),
                               ("armt_memory_norm", lambda o, s: s.A.float())):
                norms = torch.stack([delta(o, s).flatten(1).norm(dim=1) for o, s in pairs], -1)
                _append_trace(ctx, key, norms[:, None])  # [B, segments, N_L]
            for key in ("beta_mean", "gamma_mean"):
                if all(key in s for s in per_layer):  # batch means: [segments, N_L]
                    means = torch.stack([s[key].float() for s in per_layer])[None]
                    _append_trace(ctx, f"armt_{key.removesuffix('_mean')}", means, dim=0)
