"""DNC: a GPT decoder whose hidden state drives a Differentiable Neural Computer memory.

    x -> blocks -> LN_f -> H --(one DNC step per token, in order)--> R read vectors r_t
    logits = W_o(H + W_p r + b_p)

The memory (memlm/memory/dnc.py) is a recurrent state carried from segment to
segment, so a token can use information from far beyond the attention window
(the window is one segment). The model is stateful: the trainer feeds consecutive
segments of contiguous stream rows and passes `out.state` back in, detaching it
every `train.bptt_window` segments (truncated BPTT).

Placement (`mem_layer`):
  * -1 (default, as in the reference): after the final LayerNorm, right before the
    LM head. The no-memory logits then come from the same H with the read removed.
  * k >= 0: after block k; the controller is a LayerNorm of the residual stream and
    the projected reads are added to it, so later blocks can attend over what the
    memory returned.

Design: docs/dnc.md (one token's memory step, losses, metrics, evaluation modes, and how
memlm differs from the original).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from memlm.config import ModelConfig, NonNegativeFloat, PositiveInt
from memlm.errors import ConfigError
from memlm.memory.dnc import (
    DNCMemory,
    DNCState,
    MemoryResult,
    entropy,
    normalised_entropy,
    slot_similarity,
)
from memlm.models.base import ForwardContext, MemLM, ModelOutput
from memlm.models.decoder import Decoder
from memlm.nn.attention import KVCache
from memlm.registry import register_arch
from memlm.types import IGNORE_INDEX, tree_where_rows


@dataclass
class DNCConfig(ModelConfig):
    """Backbone size vocabulary (ModelConfig) plus the memory's own fields."""

    arch: str = "dnc"
    mem_slots: PositiveInt = 64  # N
    mem_width: PositiveInt = 128  # W
    num_reads: PositiveInt = 4  # R
    temporal_links: bool = False  # Graves' forward/backward read modes (O(N^2) per step)
    mem_layer: int = -1  # -1: after the final norm (reference); k: after block k
    faithful: bool = False  # reproduce the reference memory and its flaws (docs/dnc.md)
    lambda_entropy: NonNegativeFloat = 0.05  # weight of the write-address entropy loss
    #: the reference's one-sided routing loss (0.1 when faithful)
    lambda_routing: NonNegativeFloat = 0.0
    mem_init_std: float = 0.5  # std of the learned initial memory (breaks slot symmetry)
    mem_seed: int | None = None  # seed of the memory init; None derives it from torch's seed
    mem_kl: bool = True  # report mem_kl (costs one extra head pass under no_grad)
    compile_step: bool = False  # torch.compile the per-token memory step
    #: tokens per compiled call with compile_step (docs/dnc.md: 8 measured fastest per compile s)
    compile_chunk: PositiveInt = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1 <= self.mem_layer < self.n_layer:
            raise ConfigError(
                f"mem_layer={self.mem_layer} is outside [-1, {self.n_layer - 1}]; use -1 for the "
                "memory after the final norm, or the index of the block it should follow."
            )
        if self.faithful and (self.temporal_links or self.mem_layer != -1):
            raise ConfigError(
                "faithful=True reproduces the reference memory after the final norm only; "
                "set temporal_links=false and mem_layer=-1, or faithful=false."
            )


@contextlib.contextmanager
def _own_rng(seed: int):
    """Draw the memory init from its own seed, leaving torch's global RNG untouched.

    This keeps the backbone init bit-identical to a dense GPT built with the same
    seed, whatever memory options are chosen.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@register_arch(
    "dnc", DNCConfig, "GPT + Differentiable Neural Computer memory carried across segments",
    inspector="memlm.inspect.dnc:inspect_dnc",
    health="memlm.inspect.health:dnc_output_health",
    tiny=dict(mem_slots=16, mem_width=16, num_reads=1, mem_kl=False),
    cost=14.0,  # benchmarks/arch_cost.py
)
class DNC(MemLM):
    """GPT backbone + DNC memory driven by the hidden state (see module docstring)."""

    config_class = DNCConfig
    is_stateful = True

    def __init__(self, config: DNCConfig):
        super().__init__(config)
        self.decoder = Decoder(config)
        self.init_weights()  # only the backbone exists yet: same draws as the dense GPT
        seed = config.mem_seed if config.mem_seed is not None else torch.initial_seed() + 1
        with _own_rng(seed % (2**63)):
            self.mem_norm = (
                nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
                if config.mem_layer >= 0 else None
            )
            self.memory = DNCMemory(
                config.d_model, config.mem_slots, config.mem_width, config.num_reads,
                temporal_links=config.temporal_links, faithful=config.faithful,
                mem_init_std=config.mem_init_std,
                compile_step=config.compile_step, compile_chunk=config.compile_chunk,
            )
        if config.faithful:
            # the reference wipes memory every batch: the trainer must not carry it
            self.is_stateful = False
        elif config.lambda_routing > 0:
            warnings.warn(
                f"lambda_routing={config.lambda_routing}: the routing loss -g*sg(KL) is one-sided, "
                "it can only raise the write gate (docs/dnc.md, D5); memlm's default is 0.",
                stacklevel=2,
            )

    # ----- state -------------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> DNCState:
        """Memory at the start of a stream. A function of M_init, so M_init learns."""
        return self.memory.init_state(batch_size, device)

    def reset_state_rows(self, state: DNCState, mask: torch.Tensor) -> DNCState:
        """Re-initialise the rows where `mask` [B] is True (their stream restarts)."""
        if state is None:
            return state
        return tree_where_rows(mask, self.init_state(mask.shape[0], mask.device), state)

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        return self.decoder.make_cache(batch_size, max_len, device, dtype)

    # ----- forward -----------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        state: DNCState | None = None,
        trace: bool = False,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        nomem: bool = False,
    ) -> ModelOutput:
        """One segment. `attention_mask` [B, T] (True = real) freezes the memory at padding;
        `nomem=True` returns the logits with the memory read removed (ppl_nomem)."""
        self.check_length(input_ids, cache)
        if nomem and cache is not None and self.config.mem_layer >= 0:
            raise ConfigError(
                "nomem=True with a KV cache needs mem_layer=-1 (the middle placement re-runs "
                "the upper blocks without the read); call it without cache."
            )
        ctx = ForwardContext(trace)
        b, t = input_ids.shape
        if state is None:
            state = self.init_state(b, input_ids.device)
        else:
            self.memory.check_state(state, b)
        if attention_mask is not None and targets is not None:
            targets = targets.masked_fill(~attention_mask.to(torch.bool), IGNORE_INDEX)

        # skip the no-memory head when nothing needs it (it costs a full vocab matmul);
        # with a KV cache the middle placement cannot re-run the upper blocks.
        want_nomem = nomem or (
            (self.config.mem_kl or self.config.lambda_routing > 0)
            and (cache is None or self.config.mem_layer < 0)
        )
        logits, logits_nomem, mem = self._logits(input_ids, state, ctx, cache, attention_mask,
                                                 trace, want_nomem)
        valid = self._valid(targets, attention_mask, input_ids)
        self._losses_and_metrics(ctx, mem, logits, logits_nomem, valid, targets is not None)
        if trace:
            self._trace(ctx, mem)
        return self.assemble_output(logits_nomem if nomem else logits, targets, ctx, mem.state)

    def _logits(self, input_ids, state, ctx, cache, attention_mask, trace, want_nomem):
        dec = self.decoder
        k = self.config.mem_layer
        if k < 0:
            h = dec.ln_f(dec.hidden(input_ids, ctx, cache))
            mem = self.memory(h, state, attention_mask, keep_usage=trace)
            logits = dec.lm_head(h + mem.out.to(h.dtype))
            nomem = None
            if want_nomem:
                with torch.no_grad():
                    nomem = dec.lm_head(h)
            return logits, nomem, mem
        lower, upper = slice(0, k + 1), slice(k + 1, None)
        x = dec.embed(input_ids, cache.length if cache is not None else 0)
        x = dec.run_blocks(x, ctx, cache, layers=lower)
        mem = self.memory(self.mem_norm(x), state, attention_mask, keep_usage=trace)
        base, x = x, x + mem.out.to(x.dtype)
        logits = dec.head(dec.run_blocks(x, ctx, cache, layers=upper))
        nomem = None
        if want_nomem:
            with torch.no_grad():  # the upper blocks again, without the read
                nomem = dec.head(dec.run_blocks(base, ForwardContext(False), layers=upper))
        return logits, nomem, mem

    @staticmethod
    def _valid(targets, attention_mask, input_ids) -> torch.Tensor:
        """Scored positions [B, T] as float: non-ignored targets (all tokens without targets)."""
        if targets is not None:
            valid = targets != IGNORE_INDEX
        elif attention_mask is not None:
            valid = attention_mask.to(torch.bool)
        else:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        return valid.float()

    def _losses_and_metrics(self, ctx: ForwardContext, mem: MemoryResult, logits, logits_nomem,
                            valid: torch.Tensor, has_targets: bool) -> None:
        """Losses and memory metrics, token-weighted over scored positions.

        What each one is: docs/dnc.md#losses-metrics-and-evaluation-modes.
        """
        cfg = self.config
        n = valid.sum().clamp_min(1.0)

        def mean(x: torch.Tensor) -> torch.Tensor:
            return (x * valid).sum() / n

        write_entropy = entropy(mem.address)  # [B, T]
        kl = None
        if logits_nomem is not None:
            with torch.no_grad():
                logp = torch.log_softmax(logits.detach().float(), -1)
                logq = torch.log_softmax(logits_nomem.float(), -1)
                kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)  # [B, T]
        if has_targets:
            if cfg.lambda_entropy > 0:
                ctx.add_aux("dnc_entropy", cfg.lambda_entropy * mean(write_entropy))
            if cfg.lambda_routing > 0 and kl is not None:
                ctx.add_aux("dnc_routing", -cfg.lambda_routing * mean(mem.write_gate * kl))

        with torch.no_grad():
            gate = mem.write_gate.detach()
            avg = mean(gate)
            ctx.add_metric("dnc_avg_gate", avg)
            ctx.add_metric("dnc_gate_std", mean((gate - avg) ** 2).sqrt())
            ctx.add_metric("dnc_write_rate", mean((gate > 0.7).float()))
            h_write = mean(normalised_entropy(mem.address.detach()))
            ctx.add_metric("dnc_write_sparsity", 1.0 - h_write.clamp(0.0, 1.0))
            ctx.add_metric("dnc_alloc_share", mean(mem.alloc_gate.detach()))
            h_read = mean(normalised_entropy(mem.read_weights.detach()).mean(-1))
            ctx.add_metric("dnc_read_sparsity", 1.0 - h_read.clamp(0.0, 1.0))
            if kl is not None:
                ctx.add_metric("dnc_mem_kl", mean(kl))
            ctx.add_metric("dnc_usage_mean", mem.state.usage.detach().mean())
            ctx.add_metric("dnc_slot_diversity", slot_similarity(mem.state.memory.detach()).mean())

    def _trace(self, ctx: ForwardContext, mem: MemoryResult) -> None:
        """Per-token inspection tensors (see memlm/inspect/dnc.py)."""
        ctx.add_trace("write_gate", mem.write_gate)
        ctx.add_trace("alloc_gate", mem.alloc_gate)
        ctx.add_trace("free_gate", mem.free_gate)
        ctx.add_trace("write_address", mem.address)
        ctx.add_trace("write_slot", mem.address.argmax(-1))
        ctx.add_trace("read_weights", mem.read_weights)
        ctx.add_trace("read_vectors", mem.reads)
        ctx.add_trace("usage", mem.usage)

    def memory_param_count(self) -> int:
        """Parameters the memory adds to the backbone."""
        mods = [self.memory] + ([self.mem_norm] if self.mem_norm is not None else [])
        return sum(p.numel() for m in mods for p in m.parameters())
