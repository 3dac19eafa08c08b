"""The graph-memory cell of the Graph Memory Transformer (GMT).

GMT replaces every feed-forward sublayer of a pre-LN GPT with this cell. Each
cell owns K learned centroids C (points in the residual space), a directed
K x K edge-logit matrix E, query/key projections into a small navigation space,
a scalar output gate g and two LayerNorms. For a token x (the block's LN2
output), with C^ = LN_C(C):

1. source routing, "gravitational": P_src = softmax(1 / (max(1 - cos(x, C^), eps) * tau));
2. one-hop traversal along the row-softmaxed edges (no self-loops): pi = P_src A;
3. target selection: P_tgt = softmax(log pi + q(x) . k(C^) / sqrt(d_n))   ("prob": pi + ...);
4. gated displacement readout: Delta = sigmoid(g) * LN_D(P_tgt C^ - P_src C^).

The cell mixes nothing across positions, so GMT is exactly as causal as its
attention. What makes it a *memory* is that the centroids are also maintained
online (EMA write-back toward the inputs that chose them, a usage EMA, dead-slot
re-seeding and duplicate merging). In memlm's default mode the forward pass is
side-effect free apart from accumulating write-back statistics (in buffers)
during gradient-enabled training forwards; the statistics are applied by
`apply_writeback()` after the optimizer step, which the model calls from the
trainer's `on_train_step_end` hook. `faithful=True` reproduces the reference
implementation instead: the write-back overwrites C inside every forward (eval
included), toward the raw block output. The equations, write-back, maintenance and
losses are written out in docs/gmt.md ("The cell in detail"), the reference's flaws
and memlm's fixes (G1-G16) in docs/gmt.md#how-memlm-differs-from-the-reference-and-why.

The equations are implemented literally; the functions at the top of the
file are the auxiliary losses, kept pure so that tests can probe them directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: lower clamp of the target-graph probabilities before the log (docs/gmt.md#routing, step 8)
GRAPH_LOG_FLOOR = 1e-9
#: epsilon of the entropy-style logs inside the auxiliary losses (docs/gmt.md#losses)
AUX_LOG_EPS = 1e-8


# ----- schedules and auxiliary losses (pure functions) --------------------------------------
def routing_temperature(progress: float, temp_max: float = 1.0, temp_min: float = 0.1) -> float:
    """tau(p) = tau_max * (tau_min / tau_max) ** ln(1 + p (e - 1)): fast early, slow late."""
    p = min(max(float(progress), 0.0), 1.0)
    return temp_max * (temp_min / temp_max) ** math.log(1.0 + p * (math.e - 1.0))


def orthogonality_loss(C: torch.Tensor) -> torch.Tensor:
    """mean over i != j of cos(C_i, C_j)^2, on the raw centroids."""
    k = C.shape[0]
    cn = F.normalize(C.float(), dim=-1)
    gram = cn @ cn.T
    off = gram.pow(2).sum() - gram.diagonal().pow(2).sum()
    return off / (k * (k - 1))


def cluster_loss(mean_routing: torch.Tensor, target: float) -> torch.Tensor:
    """Hinge max(0, target / max(N_eff, 1) - 1) on the effective number of used slots.

    `mean_routing` is the token mean of P_src over the micro-batch; N_eff is the
    exponential of its entropy. Zero once N_eff >= target.
    """
    u = mean_routing.float()
    u = u / (u.sum() + AUX_LOG_EPS)
    n_eff = torch.exp(-(u * torch.log(u + AUX_LOG_EPS)).sum())
    return F.relu(target / n_eff.clamp_min(1.0) - 1.0)


def edge_entropy_loss(A: torch.Tensor, target: float) -> torch.Tensor:
    """mean_i max(0, target - H(A_i)): keeps every edge row at least `target` nats broad."""
    h = -(A * torch.log(A + AUX_LOG_EPS)).sum(-1)
    return F.relu(target - h).mean()


def edge_contrast_loss(A: torch.Tensor) -> torch.Tensor:
    """mean over i != j of cos(A_i, A_j): distinct slots should have distinct successors."""
    k = A.shape[0]
    an = F.normalize(A.float(), dim=-1)
    sim = an @ an.T
    return (sim.sum() - sim.diagonal().sum()) / (k * (k - 1))


def masked_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` [N] over tokens with weight 1 (all tokens when `weights` is None)."""
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """-sum p log max(p, 1e-12) over the last dimension."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


# ----- configuration and per-forward options --------------------------------------------------
@dataclass
class GraphCellConfig:
    """Hyper-parameters of one cell (the model builds it from its GMTConfig)."""

    d_model: int
    n_slots: int = 128
    nav_dim: int = 128
    grav_eps: float = 0.01
    temp_init: float = 1.0
    graph_logits: str = "log"  # "log" (memlm) or "prob" (reference)
    routing_fp32: bool = True  # routing steps 2-4 in float32 under autocast
    faithful: bool = False
    norm_eps: float = 1e-5
    lambda_track: float = 1.0
    lambda_ortho: float = 0.05
    lambda_cluster: float = 0.3
    lambda_edge: float = 0.1
    lambda_contrast: float = 0.5
    edge_entropy_target: float = 4.0
    cluster_target: float = 32.0
    write_momentum: float = 0.99
    usage_momentum: float = 0.99
    dead_threshold: float = 1e-3
    merge_threshold: float = 0.95
    centroid_cooldown: int = 100
    pool_size: int = 8192


@dataclass
class CellRun:
    """What the model asks of every cell during one forward pass.

    token_mask: [N] float, 1 for positions that carry a target (padding is 0);
    compute_aux: add the auxiliary losses; metrics: add the diagnostics;
    collect_stats: accumulate write-back statistics (gradient-enabled training);
    collect_pool: keep a re-seed pool (the step ends with maintenance);
    faithful_update: reference in-forward write-back (faithful mode only).
    """

    n_layer: int = 1
    token_mask: torch.Tensor | None = None
    compute_aux: bool = False
    metrics: bool = False
    collect_stats: bool = False
    collect_pool: bool = False
    faithful_update: bool = False
    pool_seed: int = 0
    scratch: dict[int, Any] = field(default_factory=dict)
    traces: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def add_metric(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.metric_sums[name] = self.metric_sums[name] + value if name in self.metric_sums else value


# ----- the cell ------------------------------------------------------------------------------
class GraphMemoryCell(nn.Module):
    """One block's graph memory: x [B, T, d] -> displacement Delta [B, T, d]."""

    #: write-back statistics of the current optimizer step (buffers, cleared after each step)
    STAT_BUFFERS = ("stat_count", "stat_sum", "stat_psum", "stat_ntok")

    def __init__(self, cfg: GraphCellConfig, layer_idx: int = 0):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        d, k, dn = cfg.d_model, cfg.n_slots, cfg.nav_dim
        self.C = nn.Parameter(torch.empty(k, d))
        self.E = nn.Parameter(torch.empty(k, k))
        # C and E carry geometry (unit directions, transition logits): weight decay
        # would pull them toward 0 / uniform against every other term (G5 in docs/gmt.md).
        if not cfg.faithful:
            self.C.no_weight_decay = True
            self.E.no_weight_decay = True
        self.q_proj = nn.Linear(d, dn, bias=False)
        self.k_proj = nn.Linear(d, dn, bias=False)
        self.gate = nn.Parameter(torch.tensor(1.0))
        # mu is stored in both modes; only the reference learns it (G7 in docs/gmt.md)
        self.write_momentum = nn.Parameter(torch.tensor(4.6), requires_grad=cfg.faithful)
        self.norm_c = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.norm_d = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.register_buffer("usage", torch.full((k,), 1.0 / k))
        self.register_buffer("age", torch.zeros(k))
        self.register_buffer("temp", torch.tensor(float(cfg.temp_init)))
        # write-back statistics of the current optimizer step (saved so resume is exact)
        self.register_buffer("stat_count", torch.zeros(k))
        self.register_buffer("stat_sum", torch.zeros(k, d))
        self.register_buffer("stat_psum", torch.zeros(k))
        self.register_buffer("stat_ntok", torch.zeros(()))
        self.register_buffer("diag_mask", torch.eye(k, dtype=torch.bool), persistent=False)
        #: unit vectors the next maintenance may re-seed slots with (transient)
        self.reseed_pool: torch.Tensor | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Unit-norm random centroids, N(0, 1) edges, N(0, 0.02) projections.

        The whole init: docs/gmt.md#initialisation.
        """
        self.C.copy_(F.normalize(torch.randn_like(self.C), dim=-1))
        nn.init.normal_(self.E, 0.0, 1.0)
        nn.init.normal_(self.q_proj.weight, 0.0, 0.02)
        nn.init.normal_(self.k_proj.weight, 0.0, 0.02)
        self.gate.fill_(1.0)
        self.write_momentum.fill_(4.6)

    # ----- the forward equations -------------------------------------------------------
    def centroids(self) -> torch.Tensor:
        """C^ = LN_C(C), the centroid values every mixture is built from [K, d]."""
        return self.norm_c(self.C)

    def edge_probs(self) -> torch.Tensor:
        """A = row-softmax(E) with the diagonal masked: row-stochastic, zero diagonal."""
        return self.E.float().masked_fill(self.diag_mask, float("-inf")).softmax(-1)

    def source_routing(
        self, x: torch.Tensor, c_hat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 2-4: (P_src [N, K], unit inputs x_bar [N, d]).

        Runs in float32 with autocast off (memlm default): in bf16 the cosine
        near 1 moves in steps of ~0.004, which at eps = 0.01 and tau = 0.1 makes
        the source logits jump by hundreds (G13 in docs/gmt.md).
        """
        if self.cfg.routing_fp32:
            with torch.autocast(x.device.type, enabled=False):
                xbar = F.normalize(x.float(), dim=-1, eps=1e-12)
                cbar = F.normalize(c_hat.float(), dim=-1, eps=1e-12)
                dist = (1.0 - xbar @ cbar.T).clamp_min(self.cfg.grav_eps)
                return (1.0 / (dist * self.temp.float())).softmax(-1), xbar
        xbar = F.normalize(x, dim=-1, eps=1e-12)
        cbar = F.normalize(c_hat, dim=-1, eps=1e-12)
        dist = (1.0 - xbar @ cbar.T).clamp_min(self.cfg.grav_eps)
        return (1.0 / (dist * self.temp)).softmax(-1), xbar.float()

    def query_scores(self, x: torch.Tensor, c_hat: torch.Tensor) -> torch.Tensor:
        """q . kappa^T / sqrt(d_n): keys come from the LN'd, un-normalised centroids."""
        q = self.q_proj(x)
        kappa = self.k_proj(c_hat)
        return (q @ kappa.T).float() / math.sqrt(self.cfg.nav_dim)

    def target_routing(
        self, p_src: torch.Tensor, scores: torch.Tensor, A: torch.Tensor
    ) -> torch.Tensor:
        """Steps 6, 8, 9: P_tgt = softmax(G(P_src A) + scores)."""
        pi = p_src.float() @ A
        if self.cfg.graph_logits == "log":
            graph = torch.log(pi.clamp_min(GRAPH_LOG_FLOOR))
        else:
            graph = pi
        return (graph + scores).softmax(-1)

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        run: CellRun = getattr(ctx, "cell_run", None) or CellRun()
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        c_hat = self.centroids()
        p_src, xbar = self.source_routing(xf, c_hat)
        A = self.edge_probs()
        scores = self.query_scores(xf, c_hat)
        p_tgt = self.target_routing(p_src, scores, A)
        c_src = p_src.to(c_hat.dtype) @ c_hat
        c_tgt = p_tgt.to(c_hat.dtype) @ c_hat
        delta = torch.sigmoid(self.gate) * self.norm_d(c_tgt - c_src)

        if run.compute_aux:
            self._aux_losses(ctx, run, xf, p_src, c_src, A)
        if run.metrics or (ctx is not None and getattr(ctx, "trace_enabled", False)):
            self._diagnostics(ctx, run, shape, p_src, p_tgt, scores, delta, A)
        if run.collect_stats:
            self._accumulate_stats(p_src, xbar, run.token_mask)
        if run.collect_pool:
            self._store_pool(xbar, run.token_mask, run.pool_seed)
        if self.cfg.faithful and (run.faithful_update or run.compute_aux):
            run.scratch[self.layer_idx] = (p_src, c_src)
        return delta.reshape(shape)

    # ----- losses, diagnostics and statistics -----------------------------------------
    def _aux_losses(self, ctx, run: CellRun, xf, p_src, c_src, A) -> None:
        cfg, w, n = self.cfg, run.token_mask, run.n_layer
        if cfg.lambda_track and not cfg.faithful:
            # target: the cell input x (same LN scale as C^), constant factor 1 - m
            sq = (xf.detach().float() - c_src.float()).pow(2).mean(-1)
            track = (1.0 - cfg.write_momentum) * masked_mean(sq, w)
            ctx.add_aux("gmt_track", cfg.lambda_track * track / n)
        if cfg.lambda_ortho and not cfg.faithful:  # faithful: after the write-back
            ctx.add_aux("gmt_ortho", cfg.lambda_ortho * orthogonality_loss(self.C) / n)
        if cfg.lambda_cluster:
            pf = p_src.float()
            mean_p = pf.mean(0) if w is None else (pf * w[:, None]).sum(0) / w.sum().clamp_min(1)
            ctx.add_aux("gmt_cluster",
                        cfg.lambda_cluster * cluster_loss(mean_p, cfg.cluster_target) / n)
        if cfg.lambda_edge:
            ctx.add_aux("gmt_edge_entropy",
                        cfg.lambda_edge * edge_entropy_loss(A, cfg.edge_entropy_target) / n)
        if cfg.lambda_contrast:
            ctx.add_aux("gmt_edge_contrast", cfg.lambda_contrast * edge_contrast_loss(A) / n)

    @torch.no_grad()
    def _diagnostics(self, ctx, run: CellRun, shape, p_src, p_tgt, scores, delta, A) -> None:
        """Per-token routing facts for traces; their token means for metrics.

        The keys: docs/gmt.md#diagnostics.
        """
        k = self.cfg.n_slots
        w = run.token_mask
        ps, pt = p_src.float(), p_tgt.float()
        src_prob, src_slot = ps.max(-1)
        tgt_prob, tgt_slot = pt.max(-1)
        disp = delta.float().norm(dim=-1)
        influence = 0.5 * (pt - scores.softmax(-1)).abs().sum(-1)
        if run.metrics:
            ntok = float(ps.shape[0]) if w is None else w.sum().clamp_min(1.0)
            ones = torch.ones_like(src_prob) if w is None else w
            src_counts = torch.zeros(k, device=ps.device).index_add_(0, src_slot, ones)
            tgt_counts = torch.zeros(k, device=ps.device).index_add_(0, tgt_slot, ones)
            run.add_metric("gmt_src_entropy", masked_mean(entropy(ps), w))
            run.add_metric("gmt_tgt_entropy", masked_mean(entropy(pt), w))
            run.add_metric("gmt_src_top1_share", src_counts.max() / ntok)
            run.add_metric("gmt_tgt_top1_share", tgt_counts.max() / ntok)
            run.add_metric("gmt_self_route_rate", masked_mean((src_slot == tgt_slot).float(), w))
            run.add_metric("gmt_graph_influence", masked_mean(influence, w))
            run.add_metric("gmt_disp_norm", masked_mean(disp, w))
        if ctx is not None and getattr(ctx, "trace_enabled", False):
            b = shape[0]
            t = shape[1] if len(shape) == 3 else 1
            run.traces[self.layer_idx] = {
                "src_probs": ps.reshape(b, t, k),
                "tgt_probs": pt.reshape(b, t, k),
                "src_slot": src_slot.reshape(b, t),
                "src_prob": src_prob.reshape(b, t),
                "tgt_slot": tgt_slot.reshape(b, t),
                "tgt_prob": tgt_prob.reshape(b, t),
                "disp_norm": disp.reshape(b, t),
                "graph_influence": influence.reshape(b, t),
                "usage": self.usage.detach().clone(),
                "edges": A.detach().float(),
            }

    @torch.no_grad()
    def _accumulate_stats(self, p_src, xbar, mask) -> None:
        """Sum what write-back needs over this micro-batch's non-pad tokens (index-add, no sync)."""
        pf = p_src.float()
        w = torch.ones(pf.shape[0], device=pf.device) if mask is None else mask.float()
        hard = pf.argmax(-1)
        self.stat_count.index_add_(0, hard, w)
        self.stat_sum.index_add_(0, hard, xbar.float() * w[:, None])
        self.stat_psum.add_((pf * w[:, None]).sum(0))
        self.stat_ntok.add_(w.sum())

    @torch.no_grad()
    def _store_pool(self, xbar, mask, seed: int) -> None:
        rows = xbar.float() if mask is None else xbar.float()[mask > 0]
        if rows.shape[0] > self.cfg.pool_size:
            g = torch.Generator(device=rows.device).manual_seed(seed * 1009 + self.layer_idx)
            rows = rows[torch.randperm(rows.shape[0], generator=g, device=rows.device)
                        [: self.cfg.pool_size]]
        self.reseed_pool = rows.detach().clone()

    # ----- memory maintenance (no gradients) -------------------------------------------
    @torch.no_grad()
    def apply_writeback(self) -> None:
        """Default write-back, once per optimizer step and after it.

        Hit slots move toward the mean unit direction of the inputs that chose
        them, C_k <- nrm(m C_k + (1 - m) u_k); the others are only renormalised
        (LN_C is scale invariant, so that changes no routing). Then the usage
        EMA and the ages advance, and the statistics are cleared
        (docs/gmt.md#write-back-and-usage).
        """
        cfg = self.cfg
        count = self.stat_count
        mean_dir = self.stat_sum / count.clamp_min(1.0)[:, None]
        C = self.C.float()
        moved = cfg.write_momentum * C + (1.0 - cfg.write_momentum) * mean_dir
        new = torch.where((count > 0)[:, None], moved, C)
        self.C.copy_(F.normalize(new, dim=-1, eps=1e-12).to(self.C.dtype))
        ntok = self.stat_ntok
        fresh = self.stat_psum / ntok.clamp_min(1.0)
        ema = cfg.usage_momentum * self.usage + (1.0 - cfg.usage_momentum) * fresh
        self.usage.copy_(torch.where(ntok > 0, ema, self.usage))
        self.age.add_(1.0)
        self.clear_stats()

    @torch.no_grad()
    def clear_stats(self) -> None:
        for name in self.STAT_BUFFERS:
            getattr(self, name).zero_()

    def after_block(self, h: torch.Tensor, ctx: Any) -> None:
        """Faithful mode only: tracking loss on the raw block output, in-forward write-back.

        Reproduces the reference (docs/gmt.md#write-back-and-usage): usage EMA over all tokens, then
        C_k <- nrm(sigma(mu) C_k + (1 - sigma(mu)) h_bar_k) written into C's storage
        right after the block, so this micro-batch's backward sees the new C (G2).
        """
        run: CellRun = getattr(ctx, "cell_run", None) or CellRun()
        stash = run.scratch.pop(self.layer_idx, None)
        if stash is None:
            return
        p_src, c_src = stash
        hf = h.reshape(-1, h.shape[-1])
        cfg = self.cfg
        if run.compute_aux and cfg.lambda_track:
            # the factor 1 - sigma(mu) is learnable here: descent raises sigma(mu) (G7)
            sq = (hf.detach().float() - c_src.float()).pow(2).mean(-1)
            factor = 1.0 - torch.sigmoid(self.write_momentum)
            track = factor * masked_mean(sq, run.token_mask)
            ctx.add_aux("gmt_track", cfg.lambda_track * track / run.n_layer)
        if run.faithful_update:
            with torch.no_grad():
                self._faithful_writeback(p_src.detach().float(), hf.detach().float())
        if run.compute_aux and cfg.lambda_ortho:
            # the reference computes this loss after the forward, on the written-back C
            ortho = orthogonality_loss(self.C)
            ctx.add_aux("gmt_ortho", cfg.lambda_ortho * ortho / run.n_layer)

    def _faithful_writeback(self, pf: torch.Tensor, hf: torch.Tensor) -> None:
        cfg = self.cfg
        self.usage.mul_(cfg.usage_momentum).add_((1.0 - cfg.usage_momentum) * pf.mean(0))
        m = float(torch.sigmoid(self.write_momentum))  # a host sync, as in the reference
        hard = pf.argmax(-1)
        count = torch.zeros(cfg.n_slots, device=hf.device).index_add_(
            0, hard, torch.ones_like(hard, dtype=torch.float32))
        sums = torch.zeros(cfg.n_slots, hf.shape[-1], device=hf.device).index_add_(0, hard, hf)
        h_bar = sums / count.clamp_min(1.0)[:, None]
        new = F.normalize(m * self.C.float() + (1.0 - m) * h_bar, dim=-1, eps=1e-12)
        self.C.data.copy_(new.to(self.C.dtype))
        self.age.add_(1.0)

    @torch.no_grad()
    def maintain(self, generator: torch.Generator, pool: torch.Tensor | None = None) -> torch.Tensor:
        """Dead-slot reset then duplicate merge; returns the reset rows [K] bool.

        The rules, step by step: docs/gmt.md#maintenance.

        Re-seeded rows get a pool vector (the block's own unit cell inputs in the
        default mode), usage 1/K and age 0. With more than K/2 dead slots, or no
        pool, fresh random unit vectors are used instead.
        """
        cfg = self.cfg
        k, d = cfg.n_slots, cfg.d_model
        device = self.C.device
        pool = self.reseed_pool if pool is None else pool
        if pool is not None and pool.shape[0] == 0:
            pool = None
        reset = torch.zeros(k, dtype=torch.bool, device=device)

        def draw(n: int, force_random: bool = False) -> torch.Tensor:
            if pool is None or force_random:
                noise = torch.randn(n, d, generator=generator, device="cpu").to(device)
                return F.normalize(noise, dim=-1)
            if n <= pool.shape[0]:
                idx = torch.randperm(pool.shape[0], generator=generator, device="cpu")[:n]
            else:  # fewer pool vectors than resets: sample with replacement
                idx = torch.randint(0, pool.shape[0], (n,), generator=generator, device="cpu")
            return F.normalize(pool[idx.to(pool.device)].to(device).float(), dim=-1)

        dead = self.usage < cfg.dead_threshold
        n_dead = int(dead.sum())
        if n_dead:
            self.C[dead] = draw(n_dead, force_random=n_dead > k // 2).to(self.C.dtype)
            self.usage[dead] = 1.0 / k
            self.age[dead] = 0.0
            reset |= dead

        cn = F.normalize(self.C.float(), dim=-1)
        gram = cn @ cn.T
        gram.fill_diagonal_(0.0)
        young = self.age < cfg.centroid_cooldown
        gram[young, :] = 0.0
        gram[:, young] = 0.0
        pairs = (torch.triu(gram, diagonal=1) > cfg.merge_threshold).nonzero().tolist()
        for i, j in pairs:  # row-major order; runs once every maintenance_every steps
            cos = F.cosine_similarity(self.C[i].float(), self.C[j].float(), dim=0)
            if float(cos) <= cfg.merge_threshold:
                continue
            loser = j if float(self.usage[i]) >= float(self.usage[j]) else i
            self.C[loser] = draw(1)[0].to(self.C.dtype)
            self.usage[loser] = 1.0 / k
            self.age[loser] = 0.0
            reset[loser] = True
        self.reseed_pool = None
        return reset

    # ----- diagnostics of the stored memory --------------------------------------------
    @torch.no_grad()
    def memory_diagnostic_tensors(self) -> dict[str, torch.Tensor]:
        """State-only per-block diagnostics as 0-d tensors (no host sync).

        The keys: docs/gmt.md#diagnostics.
        """
        cfg = self.cfg
        k = cfg.n_slots
        u = self.usage / self.usage.sum().clamp_min(1e-12)
        cn = F.normalize(self.C.float(), dim=-1)
        gram = cn @ cn.T
        off = ~torch.eye(k, dtype=torch.bool, device=gram.device)
        A = self.edge_probs()
        an = F.normalize(A, dim=-1)
        row_sim = an @ an.T
        momentum = (torch.sigmoid(self.write_momentum.detach()) if cfg.faithful
                    else torch.tensor(cfg.write_momentum))
        return {
            "n_eff": torch.exp(entropy(u)),
            "dead": (self.usage < cfg.dead_threshold).sum().float(),
            "cos_sim": gram[off].mean(),
            "coverage": (1.0 - gram.masked_fill(~off, -2.0).max(-1).values).mean(),
            "gate": torch.sigmoid(self.gate.detach()),
            "momentum": momentum,
            "edge_ent": entropy(A).mean(),
            "edge_max": A.max(-1).values.mean(),
            "e_row_sim": row_sim[off].mean(),
            "temperature": self.temp.detach().clone(),
        }

    def memory_diagnostics(self) -> dict[str, float]:
        """The same diagnostics as Python numbers (`dead` as an int)."""
        out: dict[str, float] = {k: float(v) for k, v in self.memory_diagnostic_tensors().items()}
        out["dead"] = int(out["dead"])
        return out
