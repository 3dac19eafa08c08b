"""TMT: the TemporalMesh Transformer's five ideas, rebuilt causally.

    h <- h + MeshAttention(LN1(h))   causal top-k keys + local window + anchors, decay bias
    h <- h + FFN(LN2(h))             dual-stream FFN at the dense FFN's FLOPs
    [CALM exit check after exit-eligible layers]
    logits = LN_f(h_exit) E^T        tied head, at each token's own exit layer

What each idea became, and why (details in the memory modules and docs/tmt.md):

* mesh attention (`memlm.memory.mesh_attention`): each query picks its own
  top-k among keys at or before itself, blockwise, so memory is linear in S
  and a KV cache gives generation; the original ranked all positions (future
  included), which is kept only as the fenced `tmt_faithful_leaky` mode.
* temporal decay: a per-head bias that depends on the distance i - j (ALiBi,
  learned slopes) or on gates between j and i (FoX), never on the sequence
  length.
* adaptive depth (`memlm.memory.early_exit`): CALM early exit trained from the
  LM loss; exited tokens really skip their query, attention and FFN, and deeper
  layers still get their keys/values from the frozen state.
* dual-stream FFN (`memlm.nn.mlp`, with the dense and SwiGLU alternatives): two
  GELU MLPs mixed by a sigmoid gate, sized so MACs and parameters equal the dense
  4D FFN (s = 7D/4).
* memory anchors (`memlm.memory.anchors`): learned K/V slots in every softmax;
  optional per-row cross-segment slots (`tmt-xmem`), written after a segment.

The file reads in order: config, FFN choice, block, KV cache, model. TMT has its
own block loop rather than `Decoder.run_blocks`: a block runs only the tokens
that have not exited (a `QuerySet`), takes extra key/value entries and returns
its keys/values for the cross-segment write, and the exit check between blocks
changes which tokens the next block runs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from memlm.config import ModelConfig, NonNegativeInt, PositiveInt, UnitFloat, between
from memlm.errors import ConfigError, SequenceTooLongError
from memlm.memory.anchors import (
    AnchorCrossAttention,
    init_slot_state,
    reset_slot_rows,
    write_slots,
)
from memlm.memory.early_exit import CalmExits, ThresholdExitGate, layer_macs
from memlm.memory.mesh_attention import (
    DecayKind,
    ExtraEntries,
    FaithfulLeakyAttention,
    LeakyModeError,
    LeakyModeWarning,
    MeshAttention,
    QuerySet,
)
from memlm.models.base import ForwardContext, MemLM, ModelOutput
from memlm.nn.attention import RotaryEmbedding
from memlm.nn.mlp import MLP, DualStreamFFN, SwiGLUFFN, dual_stream_width, swiglu_hidden
from memlm.registry import register_arch

LEAKY_MODE = "tmt_faithful_leaky"
#: the original trainer's weight of the exit-gate loss (tmt/training/loss.py: exit_gate_coeff)
FAITHFUL_GATE_WEIGHT = 0.1
#: the demo's tiny TMT (ArchSpec.tiny): windows and tiles scaled to its 16-token window
TINY = dict(mesh_window=4, mesh_k=4, mesh_block_q=8, mesh_block_k=8, n_anchors=4)


@dataclass
class TMTConfig(ModelConfig):
    """TMT fields on top of the shared size vocabulary (design names in brackets: [mesh.k], ...)."""

    arch: str = "tmt"
    #: "none": positions come only from the decay bias; "rope" rotates Q and K
    #: (never the residual stream). "learned" is not offered.
    pos_emb: Literal["none", "rope"] = "none"  # type: ignore[assignment]
    #: "tmt_faithful_leaky" LEAKS the future (demo only): it builds the whole original TMT
    #: (its own positions, exit gate and anchor sublayer; pos_emb, mesh_window, mesh_block_*,
    #: decay, depth_mode, exit_min_layer and exit_sampled_layers are then not used)
    attn_mode: Literal["mesh", "tmt_faithful_leaky"] = "mesh"
    mesh_k: NonNegativeInt = 32  # [mesh.k] neighbours per query and head, among j <= i - window
    mesh_window: NonNegativeInt = 128  # [mesh.window] local band i-w < j <= i (0 disables)
    mesh_block_q: PositiveInt = 128  # [mesh.block_q] query tile of the blockwise selection
    mesh_block_k: PositiveInt = 512  # [mesh.block_k] key tile
    #: how the mesh set is chosen: "exact" top-k of every eligible key (scores all causal
    #: pairs, O(S^2 D) time), or "routed": the query token's cluster-mates among its
    #: cluster's last `mesh_bucket` tokens (online k-means, O(S log S + S r D); mesh_k unused)
    mesh_mode: Literal["exact", "routed"] = "exact"
    mesh_clusters: PositiveInt = 8  # routed: k-means clusters per head and layer
    mesh_bucket: PositiveInt = 64  # routed: r, how far back (in cluster-mates) a query reads
    mesh_centroid_decay: UnitFloat = 0.99  # routed: EMA factor of the centroids per step
    #: full forwards of at most this many tokens (without a trace) run the same mesh rule as
    #: one masked dense attention: same keys and logits, fewer and larger kernels (0: never)
    mesh_dense_below: NonNegativeInt = 512
    decay: DecayKind = "alibi_learned"
    n_anchors: NonNegativeInt = 16  # persistent K/V slots per layer (0 disables)
    #: all three at the dense 4D FFN's MACs
    ffn_type: Literal["dual", "dense", "swiglu"] = "dual"
    #: dual FFN gate: "vector" (D x D) or "scalar" (1 x D)
    ffn_gate: Literal["vector", "scalar"] = "vector"
    ffn_stream_dim: int | None = None  # width of each dual stream; None = FLOP-matched
    depth_mode: Literal["calm", "none"] = "calm"
    exit_min_layer: PositiveInt = 2  # first exit-eligible layer (1-based); eligible: min .. L-1
    #: lambda; None = not calibrated = full depth
    exit_threshold: Annotated[float, between(0, 1)] | None = None
    exit_sampled_layers: NonNegativeInt = 2  # eligible layers scored by the head per training step
    exit_conf_weight: float = 1.0  # weight of the confidence-classifier BCE
    exit_skip: bool = True  # False: compute-all reference (same outputs, nothing saved)
    xmem_mode: Literal["off", "ema_slots"] = "off"  # ema_slots: arch "tmt-xmem"
    xmem_beta: UnitFloat = 0.9  # EMA factor of the slots per segment
    doc_sep_id: int | None = None  # token that ends a document (xmem never crosses it)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mesh_k == 0 and self.mesh_window == 0 and self.attn_mode == "mesh":
            raise ConfigError("mesh_k=0 and mesh_window=0 leave a query nothing to attend to; "
                              "set mesh_k >= 1 or mesh_window >= 1.")
        if self.xmem_mode != "off" and self.n_anchors == 0:
            raise ConfigError("xmem_mode='ema_slots' stores one slot per anchor; set n_anchors >= 1.")
        if self.leaky and (self.ffn_type, self.ffn_gate, self.xmem_mode) != ("dual", "vector", "off"):
            raise ConfigError("attn_mode='tmt_faithful_leaky' is the original TMT: it needs "
                              "ffn_type='dual', ffn_gate='vector' and xmem_mode='off'.")

    @property
    def leaky(self) -> bool:
        return self.attn_mode == LEAKY_MODE


# ----- feed-forward sublayers ------------------------------------------------------------


def make_ffn(cfg: TMTConfig) -> nn.Module:
    """The FFN sublayer `ffn_type` names, at the dense `ffn_mult` x D FFN's MACs per token."""
    d = cfg.d_model
    if cfg.ffn_type == "dense":
        return MLP(d, cfg.ffn_mult * d, cfg.bias, cfg.dropout, cfg.activation)
    if cfg.ffn_type == "swiglu":
        return SwiGLUFFN(d, swiglu_hidden(d, cfg.ffn_mult), cfg.bias, cfg.dropout)
    width = (dual_stream_width(d, cfg.ffn_mult, cfg.ffn_gate) if cfg.ffn_stream_dim is None
             else cfg.ffn_stream_dim)
    return DualStreamFFN(d, width, cfg.ffn_gate, cfg.bias, cfg.dropout)


# ----- the block ------------------------------------------------------------------------------


class TMTBlock(nn.Module):
    """Pre-LN block; with a `QuerySet`, only the listed tokens run query, attention and FFN."""

    def __init__(self, cfg: TMTConfig, layer_idx: int):
        super().__init__()
        d, h = cfg.d_model, cfg.n_head
        self.ln1 = nn.LayerNorm(d, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = MeshAttention(
            d, h, topk=cfg.mesh_k, window=cfg.mesh_window, block_q=cfg.mesh_block_q,
            block_k=cfg.mesh_block_k, decay=cfg.decay, n_anchors=cfg.n_anchors,
            xmem=cfg.xmem_mode != "off", dropout=cfg.dropout, mode=cfg.mesh_mode,
            n_clusters=cfg.mesh_clusters, bucket=cfg.mesh_bucket,
            centroid_decay=cfg.mesh_centroid_decay, dense_below=cfg.mesh_dense_below)
        self.ln2 = nn.LayerNorm(d, eps=cfg.norm_eps, bias=cfg.bias)
        self.ffn = make_ffn(cfg)

    def forward(self, h: torch.Tensor, *, start: int, queries: QuerySet | None, cache, rope,
                extra: ExtraEntries | None, trace: dict | None):
        y, kv = self.attn(self.ln1(h), start=start, queries=queries, cache=cache, rope=rope,
                          extra=extra, trace=trace, h_in=h)
        if queries is None:
            h = h + y
            return h + self.ffn(self.ln2(h)), kv
        if queries.empty:
            return h, kv
        hq = queries.gather(h) + y
        hq = hq + self.ffn(self.ln2(hq))
        return queries.scatter(h, hq), kv


class FaithfulTMTBlock(nn.Module):
    """LEAKS. One layer of the original TMT (its TMTLayer), for `tmt_faithful_leaky` only.

        h' = h + Attn(LN1(h))         kNN graph from h over all positions (future included)
        h' = h' + FFN(LN2(h'))        dual stream, exact GELU, biases
        exited |= gate(h') > lambda   the original's ExitGate, on the raw stream
        h' = h' + Anchors(LN3(h'))    separate anchor cross-attention (EMA write when training)
        h' = h where exited           this layer's update is undone for exited tokens
    """

    def __init__(self, cfg: TMTConfig):
        super().__init__()
        d, h = cfg.d_model, cfg.n_head
        self.ln1 = nn.LayerNorm(d, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = FaithfulLeakyAttention(d, h, topk=cfg.mesh_k, dropout=cfg.dropout)
        self.ln2 = nn.LayerNorm(d, eps=cfg.norm_eps, bias=cfg.bias)
        self.ffn = make_ffn(cfg)
        self.exit_gate = ThresholdExitGate(d)
        self.ln3 = nn.LayerNorm(d, eps=cfg.norm_eps, bias=cfg.bias)
        self.anchors = AnchorCrossAttention(d, h, cfg.n_anchors, dropout=cfg.dropout) \
            if cfg.n_anchors else None

    def forward(self, h: torch.Tensor, exited: torch.Tensor, threshold: float | None,
                token_decay: torch.Tensor, trace: dict | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (h, exited, confidence (B, S)); threshold None: the gate never fires."""
        x = h + self.attn(self.ln1(h), h, token_decay, trace)
        x = x + self.ffn(self.ln2(x))
        conf = self.exit_gate(x)
        if threshold is not None:
            exited = exited | (conf > threshold)
        if self.anchors is not None:
            x = x + self.anchors(self.ln3(x))
        return torch.where(exited[..., None], h, x), exited, conf


def temporal_positions(x: torch.Tensor, w_decay: torch.Tensor, theta: float = 10000.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The original TMT's TemporalPositionEncoder on embeddings x (B, S, D).

    RoPE over the whole model width (halves rotated, fp32 angles) applied to the
    residual stream itself, then every dimension scaled by sigmoid(-t w_d) with
    t = i / (S - 1): the scale of a position depends on the sequence length.
    Returns the encoded stream and tau (S,), the per-position mean scale that the
    attention layers use for their row decay.
    """
    s, d = x.shape[1], x.shape[2]
    half = d // 2
    inv = 1.0 / (theta ** (torch.arange(0, half, dtype=torch.float32, device=x.device) / half))
    angles = torch.outer(torch.arange(s, dtype=torch.float32, device=x.device), inv)
    angles = torch.cat([angles, angles], dim=-1)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    x = x * angles.cos().to(x.dtype) + rotated * angles.sin().to(x.dtype)
    t = torch.arange(s, device=x.device, dtype=x.dtype) / max(s - 1, 1)
    scale = torch.sigmoid(-t[:, None] * w_decay.to(x.dtype)[None, :])  # (S, D)
    return x * scale, scale.mean(-1)


# ----- KV cache ----------------------------------------------------------------------------------


class TMTLayerCache:
    """Keys, values and (FoX) cumulative log-gates of one layer; doubles when full."""

    def __init__(self, batch: int, n_head: int, head_dim: int, capacity: int, device, dtype,
                 gate: bool):
        self.k = torch.zeros(batch, n_head, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        self.cum = torch.zeros(batch, n_head, capacity, device=device, dtype=acc) if gate else None
        self.route: torch.Tensor | None = None  # routed mesh: cluster of each cached key
        self.length = 0

    def _grow(self, need: int) -> None:
        cap = self.k.shape[2]
        while cap < need:
            cap *= 2
        pad = cap - self.k.shape[2]
        self.k = F.pad(self.k, (0, 0, 0, pad))
        self.v = F.pad(self.v, (0, 0, 0, pad))
        if self.cum is not None:
            self.cum = F.pad(self.cum, (0, pad))

    def append(self, k: torch.Tensor, v: torch.Tensor, logf: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            self._grow(end)
        self.k[:, :, self.length:end] = k.detach().to(self.k.dtype)
        self.v[:, :, self.length:end] = v.detach().to(self.v.dtype)
        cum = None
        if self.cum is not None and logf is not None:
            base = self.cum[:, :, self.length - 1: self.length] if self.length else 0.0
            self.cum[:, :, self.length:end] = base + logf.detach().to(self.cum.dtype).cumsum(-1)
            cum = self.cum[:, :, :end]
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end], cum

    def append_route(self, route: torch.Tensor) -> torch.Tensor:
        """Store the clusters (B, H, n) of the keys just appended; return all of them (B, H, T).

        Centroids do not move at inference, so a cached key keeps its cluster.
        """
        cap = self.k.shape[2]
        if self.route is None or self.route.shape[2] < cap:
            old = self.route
            self.route = torch.full((*self.k.shape[:2], cap), -1, dtype=torch.long,
                                    device=self.k.device)
            if old is not None:
                self.route[:, :, :old.shape[2]] = old
        self.route[:, :, self.length - route.shape[2]:self.length] = route
        return self.route[:, :, :self.length]


class TMTCache:
    """Per-layer caches plus the cross-segment memory snapshot taken at the first call.

    With a cache, every call continues one sequence, so the memory it reads is
    the state passed at the first (prefill) call; the state each call returns is
    that snapshot updated with the whole cached sequence, which is what one
    uncached forward over the same tokens would return.
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, head_dim: int, capacity: int,
                 device, dtype, gate: bool):
        self.layers = [TMTLayerCache(batch, n_head, head_dim, max(capacity, 1), device, dtype,
                                     gate) for _ in range(n_layer)]
        self.max_len = capacity
        self.xmem: dict[str, Any] | None = None

    @property
    def length(self) -> int:
        return self.layers[0].length

    def __getitem__(self, i: int) -> TMTLayerCache:
        return self.layers[i]

    def reset(self) -> None:
        for layer in self.layers:
            layer.length = 0
        self.xmem = None


# ----- the model -----------------------------------------------------------------------------


@dataclass
class _ExitRun:
    """One forward's early-exit bookkeeping."""

    on: bool  # exits happen in this forward (eval, CALM on, calibrated threshold)
    exited: torch.Tensor  # [B, S] bool: the token has left
    layer: torch.Tensor  # [B, S] int16: the layer it left at (n_layer: full depth)
    conf: torch.Tensor | None  # [L, B, S] confidences when tracing (NaN: not scored)
    logits: torch.Tensor | None = None  # [B, S, V], filled in as tokens leave


def _put(buf: torch.Tensor | None, mask: torch.Tensor, values: torch.Tensor, b: int, s: int
         ) -> torch.Tensor:
    """Write per-token logits `values` at `mask` into a (B, S, V) buffer (created on first use)."""
    if buf is None:
        buf = values.new_zeros(b, s, values.shape[-1])
    return buf.index_put(mask.nonzero(as_tuple=True), values)


@register_arch(
    "tmt", TMTConfig, "TemporalMesh ideas, causal: top-k mesh attention, decay bias, "
    "CALM early exit with real skipping, dual FFN, persistent anchors",
    inspector="memlm.inspect.tmt:inspect_tmt",
    tiny=TINY,
    cost=4.0,  # benchmarks/arch_cost.py
    window_only="its mesh attention and anchors work inside the current window; without xmem "
                "no state passes from one window to the next",
)
class TMT(MemLM):
    config_class = TMTConfig

    def __init__(self, config: TMTConfig):
        super().__init__(config)
        if config.xmem_mode != "off" and not type(self).is_stateful:
            raise ConfigError(
                f"xmem_mode={config.xmem_mode!r} carries memory between segments, which needs the "
                "streaming (stateful) data layout; build arch 'tmt-xmem' instead of 'tmt'.")
        if config.leaky:
            warnings.warn(
                "LEAKY: attn_mode='tmt_faithful_leaky' reproduces the original TMT kNN graph, which "
                "reads FUTURE tokens. Its loss and perplexity are not valid language-model numbers; "
                "use it only to demonstrate the leak (attn_mode='mesh' is the causal model).",
                LeakyModeWarning, stacklevel=2)
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        if c.leaky:  # the whole original model (see FaithfulTMTBlock)
            self.rope = None
            self.temporal_decay = nn.Parameter(torch.full((c.d_model,), 0.1))  # pos_encoder.w_decay
            self.blocks = nn.ModuleList(FaithfulTMTBlock(c) for _ in range(c.n_layer))
            self.ln_f = nn.LayerNorm(c.d_model, eps=c.norm_eps, bias=c.bias)
            self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
            if c.tie_embeddings:
                self.lm_head.weight = self.wte.weight
            self.exits = None
            self.init_weights()
            return
        self.rope = RotaryEmbedding(c.head_dim, c.context_len, c.rope_theta) \
            if c.pos_emb == "rope" else None
        self.blocks = nn.ModuleList(TMTBlock(c, i) for i in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.d_model, eps=c.norm_eps, bias=c.bias)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.exits = CalmExits(c.d_model, c.n_layer, c.exit_min_layer, c.exit_sampled_layers,
                               c.norm_eps) if c.depth_mode == "calm" else None
        self.init_weights()  # Linear/Embedding only: anchors, decay and exit biases keep theirs

    # ----- interface ------------------------------------------------------------------------
    @property
    def causal(self) -> bool:
        return not self.config.leaky

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(h))

    def exits_active(self) -> bool:
        """Exits happen only at inference, with CALM on and a calibrated threshold."""
        return (self.exits is not None and not self.training
                and self.config.exit_threshold is not None)

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> TMTCache:
        if self.config.leaky:
            raise LeakyModeError(
                "tmt_faithful_leaky has no KV cache: each token's neighbours include future tokens, "
                "so it cannot decode left to right. Rebuild with attn_mode='mesh'.")
        c = self.config
        p = self.wte.weight
        gate = any(b.attn.decay.uses_gate for b in self.blocks)
        return TMTCache(c.n_layer, batch_size, c.n_head, c.head_dim, max_len, device or p.device,
                        dtype or p.dtype, gate)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        if self.config.leaky:
            raise LeakyModeError(
                "generate() is refused in tmt_faithful_leaky mode: the model was trained to read "
                "the future, which does not exist while generating. Use attn_mode='mesh'.")
        return super().generate(input_ids, max_new_tokens, **kwargs)

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """Routed mesh: move the k-means centroids by the keys of the step just taken.

        Forwards only collect the statistics, so every token of a step was routed
        by the same centroids, none of which had seen that step's (or a future) token.
        """
        reduce = getattr(self, "_reduce", None)
        for block in self.blocks:
            router = getattr(block.attn, "router", None)
            if router is not None:
                router.update(reduce)

    def attach_collectives(self, reduce: Any, broadcast: Any) -> None:
        self._reduce = reduce  # data parallel: sum the centroid statistics over ranks

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> Any:
        if self.config.xmem_mode == "off":
            return None
        c = self.config
        return init_slot_state(c.n_layer, batch_size, c.n_head, c.n_anchors, c.head_dim,
                               device or self.wte.weight.device)

    def reset_state_rows(self, state: Any, mask: torch.Tensor) -> Any:
        if state is None or not bool(mask.any()):
            return state
        return reset_slot_rows(state, mask.to(state["written"].device))

    # ----- forward --------------------------------------------------------------------------
    def _check(self, input_ids: torch.Tensor, cache: TMTCache | None) -> None:
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if self.config.pos_emb == "rope" or self.config.leaky:
            self.check_length(input_ids, cache)
        elif input_ids.shape[1] == 0:
            raise SequenceTooLongError("input_ids is empty; pass at least one token.")

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        state: Any = None,
        trace: bool = False,
        cache: TMTCache | None = None,
    ) -> ModelOutput:
        cfg = self.config
        if cache is not None and cfg.leaky:
            raise LeakyModeError("tmt_faithful_leaky cannot run with a KV cache; use "
                                 "attn_mode='mesh'.")
        self._check(input_ids, cache)
        if cfg.leaky:
            return self._forward_faithful(input_ids, targets, trace)
        b, s = input_ids.shape
        n_layer = cfg.n_layer
        start = cache.length if cache is not None else 0
        ctx = ForwardContext(trace)
        h = self.drop(self.wte(input_ids))

        exits_on = self.exits_active()
        skip = exits_on and cfg.exit_skip
        read_state, allowed = self._xmem_read(input_ids, state, cache)
        sampled = (self.exits.sample_layers()
                   if self.exits is not None and self.training and targets is not None else [])
        early_hidden: dict[int, torch.Tensor] = {}
        run = _ExitRun(
            on=exits_on,
            exited=torch.zeros(b, s, dtype=torch.bool, device=h.device),
            layer=torch.full((b, s), n_layer, dtype=torch.int16, device=h.device),
            conf=torch.full((n_layer, b, s), float("nan"), device=h.device) if trace else None)
        macs = torch.zeros(b, s, device=h.device) if trace else None
        skipped = torch.zeros(n_layer, b, s, dtype=torch.bool, device=h.device) if trace else None
        pos = torch.arange(start, start + s, device=h.device).expand(b, s)
        new_kv: list[tuple[torch.Tensor, torch.Tensor]] = []

        for layer, block in enumerate(self.blocks, start=1):
            exited = run.exited
            queries = QuerySet.from_mask(~exited) if skip and bool(exited.any()) else None
            layer_trace: dict[str, torch.Tensor] | None = {} if trace else None
            h_before = h
            h, kv = block(h, start=start, queries=queries, cache=cache[layer - 1] if cache else None,
                          rope=self.rope, extra=self._xmem_entries(layer, h, read_state, allowed),
                          trace=layer_trace)
            new_kv.append(kv)
            if exits_on and not skip:  # compute-all reference: exited tokens stay frozen
                h = torch.where(exited[..., None], h_before, h)
            if trace:
                skipped[layer - 1] = exited
                self._trace_layer(ctx, layer, layer_trace)
                queried = ~exited if skip else torch.ones_like(exited)
                macs += layer_macs(cfg.d_model, block.ffn.macs_per_token, cfg.n_anchors,
                                   cfg.mesh_window,
                                   cfg.mesh_bucket if cfg.mesh_mode == "routed" else cfg.mesh_k,
                                   cfg.n_anchors if read_state is not None else 0, pos, queried)
                if cfg.mesh_mode == "routed":  # no exact selection: one cluster assignment
                    eligible = (pos - cfg.mesh_window + 1).clamp(min=0).float()
                    macs -= torch.where(queried, (eligible - cfg.mesh_clusters) * cfg.d_model,
                                        0.0)
            if self.exits is None or not self.exits.eligible(layer):
                continue
            if layer in sampled:
                early_hidden[layer] = h
            self._exit_check(layer, h, run, macs)

        if exits_on:
            if bool((~run.exited).any()):
                run.logits = _put(run.logits, ~run.exited, self.head(h[~run.exited]), b, s)
            logits = run.logits
        else:
            logits = self.head(h)
        if trace:
            macs += cfg.vocab_size * cfg.d_model
        new_state = self._xmem_write(input_ids, read_state, new_kv, cache)

        if early_hidden:
            early, bce = self.exits.losses(early_hidden, logits, self.head, targets)
            ctx.add_aux("exit_early_ce", early)
            ctx.add_aux("exit_conf_bce", cfg.exit_conf_weight * bce)
        if exits_on:
            ctx.add_metric("exit_mean_layers", run.layer.float().mean())
            ctx.add_metric("exit_frac_early", (run.layer < n_layer).float().mean())
        if trace:
            self._trace_model(ctx, input_ids, run.layer, run.conf, macs)
            ctx.add_trace("exit_mask", skipped)
        return self.assemble_output(logits, targets, ctx, new_state)

    def _forward_faithful(self, input_ids: torch.Tensor, targets: torch.Tensor | None,
                          trace: bool) -> ModelOutput:
        """LEAKS. The original TMTModel.forward; its trainer's 0.1 x gate loss is the aux loss."""
        cfg = self.config
        b, s = input_ids.shape
        ctx = ForwardContext(trace)
        h = self.wte(input_ids) * math.sqrt(cfg.d_model)  # the original drops nothing here
        h, tau = temporal_positions(h, self.temporal_decay)
        exited = torch.zeros(b, s, dtype=torch.bool, device=h.device)
        exit_layer = torch.full((b, s), cfg.n_layer, dtype=torch.int16, device=h.device)
        confidences = []
        for layer, block in enumerate(self.blocks, start=1):
            layer_trace: dict[str, torch.Tensor] | None = {} if trace else None
            before = exited
            h, exited, conf = block(h, exited, cfg.exit_threshold, tau, layer_trace)
            exit_layer[exited & ~before] = layer
            confidences.append(conf)
            if trace:
                self._trace_layer(ctx, layer, layer_trace)
        logits = self.lm_head(self.ln_f(h))
        if targets is not None:
            ctx.add_aux("exit_gate_decisive",
                        FAITHFUL_GATE_WEIGHT * ThresholdExitGate.decisiveness_loss(confidences))
        ctx.add_metric("LEAKY_exit_frac", exited.float().mean())
        ctx.add_metric("LEAKY_noncausal", 1.0)
        if trace:
            ctx.add_trace("tokens", input_ids.to(torch.int32))
            ctx.add_trace("exit_layer", exit_layer)
            ctx.add_trace("confidence", torch.stack(confidences).detach().float())
            ctx.add_trace("mode", cfg.attn_mode)
            ctx.add_trace("causal", False)
        return self.assemble_output(logits, targets, ctx, None)

    # ----- pieces of forward -------------------------------------------------------------------
    def _exit_check(self, layer: int, h: torch.Tensor, run: _ExitRun,
                    macs: torch.Tensor | None) -> None:
        """CALM at an exit-eligible `layer`: tokens still running whose confidence reaches
        `exit_threshold` leave with this layer's logits. With exits off, only traced."""
        if not run.on:
            if run.conf is not None:
                run.conf[layer - 1] = self.exits.confidence(layer, h)
            return
        b, s = run.exited.shape
        active = ~run.exited
        conf = torch.full((b, s), float("nan"), device=h.device)
        conf[active] = self.exits.confidence(layer, h[active])
        leave = active & (conf >= self.config.exit_threshold)
        if bool(leave.any()):
            run.logits = _put(run.logits, leave, self.head(h[leave]), b, s)
            run.layer[leave] = layer
            run.exited |= leave
        if run.conf is not None:
            run.conf[layer - 1] = conf
            macs += torch.where(active, float(self.config.d_model), 0.0)

    def _xmem_entries(self, layer: int, h: torch.Tensor, read_state: dict[str, Any] | None,
                      allowed: torch.Tensor | None) -> ExtraEntries | None:
        """The cross-segment slots `layer` attends to, next to its anchors (None without xmem)."""
        if read_state is None:
            return None
        attn = self.blocks[layer - 1].attn
        return ExtraEntries(attn.anchors.keys.to(h.dtype).expand(h.shape[0], -1, -1, -1),
                            read_state["slots"][layer - 1].to(h.dtype), attn.xmem_offset, allowed)

    def _trace_layer(self, ctx: ForwardContext, layer: int, tr: dict[str, torch.Tensor]) -> None:
        for name, value in tr.items():
            ctx.add_trace(f"{name}.l{layer}", value)

    def _trace_model(self, ctx: ForwardContext, ids: torch.Tensor, exit_layer: torch.Tensor,
                     conf: torch.Tensor, macs: torch.Tensor) -> None:
        cfg = self.config
        slopes = []
        for block in self.blocks:
            m = block.attn.decay.slopes() if hasattr(block.attn, "decay") else None
            slopes.append(m.detach().float() if m is not None
                          else torch.zeros(cfg.n_head, device=ids.device))
        ctx.add_trace("tokens", ids.to(torch.int32))
        ctx.add_trace("exit_layer", exit_layer)
        ctx.add_trace("confidence", conf)
        ctx.add_trace("decay_slope", torch.stack(slopes))
        ctx.add_trace("macs", macs)
        ctx.add_trace("mode", cfg.attn_mode)
        ctx.add_trace("causal", self.causal)

    def _xmem_read(self, ids: torch.Tensor, state: Any, cache: TMTCache | None
                   ) -> tuple[dict[str, torch.Tensor] | None, torch.Tensor | None]:
        """The slot state this call reads, and which queries may read it (B, S)."""
        if self.config.xmem_mode == "off" or state is None:
            return None, None
        b, _ = ids.shape
        sep = self._separators(ids)
        seen = torch.zeros(b, dtype=torch.bool, device=ids.device)
        if cache is not None:
            if cache.length == 0 or cache.xmem is None:
                cache.xmem = {"state": state, "sep_seen": seen,
                              "last_sep": torch.full((b,), -1, device=ids.device)}
            state, seen = cache.xmem["state"], cache.xmem["sep_seen"]
        # a query reads the memory only while no separator lies before it
        before = (sep.cumsum(1) - sep.long()) > 0
        allowed = state["written"][:, None] & ~before & ~seen[:, None]
        return state, allowed

    def _separators(self, ids: torch.Tensor) -> torch.Tensor:
        if self.config.doc_sep_id is None:
            return torch.zeros_like(ids, dtype=torch.bool)
        return ids == self.config.doc_sep_id

    def _xmem_write(self, ids: torch.Tensor, state: dict[str, torch.Tensor] | None,
                    new_kv: list[tuple[torch.Tensor, torch.Tensor]], cache: TMTCache | None
                    ) -> Any:
        """The state after this segment: slots folded with the open document's keys/values."""
        if state is None:
            return None
        sep = self._separators(ids)
        b, s = ids.shape
        local = torch.arange(s, device=ids.device)
        last = torch.where(sep, local, -1).amax(dim=1)  # last separator in this call, or -1
        if cache is None:
            keys = [k for k, _ in new_kv]
            values = [v for _, v in new_kv]
            current = local[None, :] > last[:, None]
            continues = ~sep.any(dim=1)
        else:
            mem = cache.xmem
            start = cache.length - s
            mem["last_sep"] = torch.where(last >= 0, start + last, mem["last_sep"])
            mem["sep_seen"] = mem["sep_seen"] | sep.any(dim=1)
            keys = [layer.k[:, :, : cache.length] for layer in cache.layers]
            values = [layer.v[:, :, : cache.length] for layer in cache.layers]
            current = torch.arange(cache.length, device=ids.device)[None, :] > mem["last_sep"][:, None]
            continues = ~mem["sep_seen"]
        anchor_keys = [block.attn.anchors.keys for block in self.blocks]
        return write_slots(state, keys, values, anchor_keys, current, continues,
                           self.config.xmem_beta)


@dataclass
class TMTXMemConfig(TMTConfig):
    arch: str = "tmt-xmem"
    xmem_mode: str = "ema_slots"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.xmem_mode == "off":
            raise ConfigError("arch 'tmt-xmem' needs xmem_mode='ema_slots'; use arch 'tmt' "
                              "for a model without cross-segment memory.")


@register_arch(
    "tmt-xmem", TMTXMemConfig, "TMT with per-row cross-segment EMA anchor slots "
    "(stateful: trained on contiguous stream segments)",
    inspector="memlm.inspect.tmt:inspect_tmt",
    # at the demo's size the slots hold the last segment's summary (xmem_beta 0): with the
    # default EMA of 0.9 a fact written one segment back weighs 10% of the slot, and far
    # recall was 0.141 against 0.321 (beta 0.5) and 0.418 (beta 0), seed 0 (docs/demo.md)
    tiny={**TINY, "xmem_beta": 0.0},
    cost=18.0,  # benchmarks/arch_cost.py
)
class TMTXMem(TMT):
    """TMT whose anchors also carry per-row value slots from earlier segments of the stream."""

    config_class = TMTXMemConfig
    is_stateful = True
