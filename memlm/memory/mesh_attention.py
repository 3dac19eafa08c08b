"""Causal mesh (top-k) attention with a distance-dependent decay bias.

Each query i (head h) attends, in one softmax, to
  * M learned anchor slots (see `memlm.memory.anchors`),
  * the local window W(i) = {j : i - w < j <= i} (it contains i itself),
  * its own top-k keys among the older positions j <= i - w, ranked by the full
    logit s_h(i, j) = q.k / sqrt(d) + beta_h(i, j),
  * optionally, cross-segment memory entries (`xmem`).
Every candidate key lies at or before the query, so the layer is causal by
construction; this is the difference from the original TMT, whose kNN graph
ranked *all* positions, future ones included (kept here, fenced, as
`FaithfulLeakyAttention`).

Memory is linear in the sequence length: selection walks over (query block x
key block) tiles and keeps a running top-k, so no S x S matrix ever exists.
The attention step reads the window of a block of consecutive queries as one
band-masked slice of keys, gathers the k mesh keys of each query, and under
autograd checkpoints each query block, so gathered keys are recomputed in
backward instead of stored. Exact selection still scores every causal pair
(about half the MACs of dense QK^T), so time stays O(S^2 D); the gain is
memory and the softmax/AV part, not the scoring. When k covers every eligible
key (short sequences), the mesh is the whole causal prefix and is read as one
dense slice, which is exact causal attention.

Ties in the top-k are broken by `torch.topk`, which is arbitrary among exactly
equal logits. With any decay bias two distinct positions cannot tie exactly
unless their keys differ by precisely the bias gap, so this only matters with
`decay="none"` and repeated identical keys, where the tied entries carry the
same key and value and the output is the same either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from memlm.errors import ConfigError, MemlmError
from memlm.nn.attention import masked_attention

NEG_INF = float("-inf")
#: the temporal-decay biases (TMTConfig.decay is typed with it)
DecayKind = Literal["none", "alibi_fixed", "alibi_learned", "fox", "alibi_learned+fox"]
DECAY_KINDS: tuple[str, ...] = get_args(DecayKind)


class LeakyModeWarning(UserWarning):
    """Emitted when a model is built in the non-causal `tmt_faithful_leaky` mode."""


class LeakyModeError(MemlmError, RuntimeError):
    """A causal-only operation (KV cache, generation) was asked of a leaking model."""


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulate logits in fp32, or fp64 when the model runs in fp64 (exactness tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's geometric slopes 2^(-8h/H), h = 1..H."""
    return torch.pow(2.0, -8.0 * torch.arange(1, n_head + 1, dtype=torch.float32) / n_head)


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return torch.log(torch.expm1(y))


# ----- decay ----------------------------------------------------------------------------


@dataclass
class Bias:
    """The decay bias beta_h(i, j) of one attention call, evaluated lazily per tile.

    `slopes` (H,) gives the ALiBi part -m_h (i - j); `cum` (B, H, T) holds the FoX
    cumulative log forget gate F at absolute positions, giving F_i - F_j. Both
    depend only on positions and gates between j and i, never on the sequence
    length, so a prefix is biased the same way inside any longer sequence.
    """

    slopes: torch.Tensor | None = None
    cum: torch.Tensor | None = None

    def rows(self, rows: torch.Tensor | None) -> Bias:
        if rows is None or self.cum is None:
            return self
        return Bias(self.slopes, self.cum[rows])

    def grid(self, qpos: torch.Tensor, ks: int, ke: int, dtype: torch.dtype) -> torch.Tensor | float:
        """Bias (B, H, nq, ke-ks) between queries at `qpos` (B, nq) and keys ks..ke-1."""
        out: torch.Tensor | float = 0.0
        if self.slopes is not None:
            kpos = torch.arange(ks, ke, device=qpos.device)
            dist = (qpos[:, None, :, None] - kpos).to(dtype)
            out = -self.slopes.to(dtype)[None, :, None, None] * dist
        if self.cum is not None:
            b, h = self.cum.shape[:2]
            fq = self.cum.gather(2, qpos[:, None, :].expand(b, h, -1)).to(dtype)
            out = out + (fq[..., None] - self.cum[:, :, None, ks:ke].to(dtype))
        return out

    def key_part(self, ks: int, ke: int, ref: int, dtype: torch.dtype) -> torch.Tensor | float:
        """The part of beta(i, j) that varies with the key j, for keys ks..ke-1: (B|1, H, 1, nk).

        beta(i, j) = g(i) + key_part(j) with g(i) constant per query, so ranking
        keys by q.k + key_part gives the same top-k as the full logit. `ref` (a
        position near the queries) re-bases the values so they stay small.
        """
        out: torch.Tensor | float = 0.0
        if self.slopes is not None:
            kpos = torch.arange(ks - ref, ke - ref, device=self.slopes.device).to(dtype)
            out = self.slopes.to(dtype)[None, :, None, None] * kpos
        if self.cum is not None:
            c = self.cum[:, :, ref:ref + 1] - self.cum[:, :, ks:ke]
            out = out + c.to(dtype)[:, :, None, :]
        return out

    def gathered(self, qpos: torch.Tensor, kidx: torch.Tensor, dtype: torch.dtype
                 ) -> torch.Tensor | float:
        """Bias (B, H, nq, n) between queries at `qpos` (B, nq) and keys at `kidx` (B, H, nq, n)."""
        out: torch.Tensor | float = 0.0
        if self.slopes is not None:
            dist = (qpos[:, None, :, None] - kidx).to(dtype)
            out = -self.slopes.to(dtype)[None, :, None, None] * dist
        if self.cum is not None:
            b, h, nq, n = kidx.shape
            fq = self.cum.gather(2, qpos[:, None, :].expand(b, h, -1)).to(dtype)
            fk = self.cum.gather(2, kidx.reshape(b, h, nq * n)).view(b, h, nq, n).to(dtype)
            out = out + (fq[..., None] - fk)
        return out

    def pairs(self, qp: torch.Tensor, kp: torch.Tensor, dtype: torch.dtype
              ) -> torch.Tensor | float:
        """Bias (B, H, N, nq, nk) between query positions qp (B,H,N,nq) and keys kp (B,H,N,nk)."""
        out: torch.Tensor | float = 0.0
        if self.slopes is not None:
            dist = (qp[..., :, None] - kp[..., None, :]).to(dtype)
            out = -self.slopes.to(dtype).view(1, -1, 1, 1, 1) * dist
        if self.cum is not None:
            b, h = self.cum.shape[:2]
            fq = self.cum.gather(2, qp.reshape(b, h, -1)).view(qp.shape).to(dtype)
            fk = self.cum.gather(2, kp.reshape(b, h, -1)).view(kp.shape).to(dtype)
            out = out + (fq[..., :, None] - fk[..., None, :])
        return out


class DecayBias(nn.Module):
    """Learned per-head temporal decay, added to the logits before the softmax.

    * `alibi_learned`: beta = -softplus(rho_h) (i - j), slopes start at ALiBi's values.
    * `alibi_fixed`: the same with frozen slopes.
    * `fox`: a Forgetting-Transformer gate f = sigmoid(a_h . u_t + c_h); beta is the
      sum of log f over the positions between j (exclusive) and i (inclusive).
      a starts at 0 and c at -log(e^m - 1), so at step 0 FoX equals ALiBi.
    * `alibi_learned+fox`: the sum; `none`: no bias.
    The raw parameters are plain `nn.Parameter`s (not `nn.Linear`), so the global
    N(0, 0.02) init never overwrites these meaningful starting values.
    """

    def __init__(self, kind: str, n_head: int, d_model: int):
        super().__init__()
        if kind not in DECAY_KINDS:
            raise ConfigError(f"decay={kind!r} is not known; use one of {', '.join(DECAY_KINDS)}.")
        self.kind = kind
        slopes = alibi_slopes(n_head)
        self.rho = nn.Parameter(_inverse_softplus(slopes)) if "alibi_learned" in kind else None
        if kind == "alibi_fixed":
            self.register_buffer("fixed_slopes", slopes)
        else:
            self.fixed_slopes = None
        if "fox" in kind:
            self.fox_a = nn.Parameter(torch.zeros(n_head, d_model))
            self.fox_c = nn.Parameter(-_inverse_softplus(slopes))
        else:
            self.fox_a = self.fox_c = None

    @property
    def uses_gate(self) -> bool:
        return self.fox_a is not None

    def slopes(self) -> torch.Tensor | None:
        """m_h >= 0 (H,), or None without an ALiBi part."""
        if self.rho is not None:
            return F.softplus(self.rho)
        return self.fixed_slopes

    def log_forget(self, u: torch.Tensor) -> torch.Tensor | None:
        """log f (B, H, S) for the attention inputs u (B, S, D), or None without FoX."""
        if self.fox_a is None:
            return None
        dt = _acc_dtype(u)
        return F.logsigmoid(u.to(dt) @ self.fox_a.to(dt).t() + self.fox_c.to(dt)).transpose(1, 2)


# ----- the mesh kernel ----------------------------------------------------------------------


def _gather_keys(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, d) at idx (B, H, nq, n) -> (B, H, nq, n, d).

    An embedding lookup on the flattened (B*H*T, d) table: much faster on CPU
    than `gather` with an expanded index, and its backward is an index_add.
    """
    b, h, t, d = x.shape
    offset = (torch.arange(b * h, device=idx.device) * t).view(b, h, 1, 1)
    return F.embedding(idx + offset, x.reshape(b * h * t, d))


@torch.no_grad()
def select_mesh(
    q: torch.Tensor,
    k: torch.Tensor,
    qpos: torch.Tensor,
    bias: Bias,
    topk: int,
    window: int,
    block_q: int = 128,
    block_k: int = 512,
    ordered: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eligible keys j <= qpos - window for every query, tile by tile.

    q (B, H, Sq, d), k (B, H, T, d), qpos (B, Sq) absolute query positions.
    Returns (idx, score), each (B, H, Sq, topk): absolute key positions (int64,
    -1 = empty slot) and their ranking scores (-inf when empty). A score is the
    full logit minus a constant of its query (see `Bias.key_part`).
    Key tiles lying wholly after the last eligible position of a query tile are
    never scored; inside a tile every pair is masked individually, so a query
    never sees a key that is later than itself (or inside its window).
    `ordered=False` leaves each query's k keys in no particular order (the same set,
    for callers that only use the set: about a third less time in `topk` on CPU).
    """
    b, h, sq, d = q.shape
    dt = _acc_dtype(q)
    scale = 1.0 / math.sqrt(d)
    idx = torch.full((b, h, sq, topk), -1, dtype=torch.long, device=q.device)
    val = torch.full((b, h, sq, topk), NEG_INF, dtype=dt, device=q.device)
    if topk == 0 or sq == 0:
        return idx, val
    for qs in range(0, sq, block_q):
        qe = min(qs + block_q, sq)
        nq = qe - qs
        pb = qpos[:, qs:qe]
        last = pb - window  # last eligible key per query (B, nq)
        hi = int(last.max())
        if hi < 0:
            continue
        ref = int(pb.max())
        qb = q[:, :, qs:qe].reshape(b * h, nq, d)
        best_v = val[:, :, qs:qe]
        best_i = idx[:, :, qs:qe]
        for ks in range(0, hi + 1, block_k):
            ke = min(ks + block_k, hi + 1)
            kt = k[:, :, ks:ke].transpose(-1, -2).reshape(b * h, d, ke - ks)
            kb = bias.key_part(ks, ke, ref, dt)
            if torch.is_tensor(kb):  # scale and key bias fused into the matmul
                kb = kb.expand(b, h, 1, ke - ks).reshape(b * h, 1, ke - ks).to(q.dtype)
                sc = torch.baddbmm(kb, qb, kt, alpha=scale)
            else:
                sc = torch.bmm(qb, kt) * scale
            sc = sc.view(b, h, nq, ke - ks).to(dt)
            if ke - 1 > int(last.min()):  # tile crosses some query's limit: mask per pair
                kpos = torch.arange(ks, ke, device=q.device)
                sc = sc.masked_fill(kpos > last[:, None, :, None], NEG_INF)
            tv, ti = sc.topk(min(topk, ke - ks), dim=-1, sorted=ordered)
            if ks == 0 and tv.shape[-1] == topk:  # the first tile fills the list: no merge
                best_v, best_i = tv, ti
                continue
            best_v, j = torch.cat([best_v, tv], dim=-1).topk(topk, dim=-1, sorted=ordered)
            best_i = torch.cat([best_i, ti + ks], dim=-1).gather(-1, j)
        idx[:, :, qs:qe] = best_i.masked_fill(best_v == NEG_INF, -1)
        val[:, :, qs:qe] = best_v
    return idx, val


@dataclass
class ExtraEntries:
    """Entries every query may read besides its own keys (cross-segment memory).

    keys/values (B, H, X, d); offset (H,) is added to their logits; `allowed`
    (B, Sq) says which queries may read them (a query in a newer document than
    the memory may not).
    """

    keys: torch.Tensor
    values: torch.Tensor
    offset: torch.Tensor
    allowed: torch.Tensor

    def rows(self, rows: torch.Tensor | None, pos: torch.Tensor | None) -> ExtraEntries:
        if rows is None:
            return self
        return ExtraEntries(self.keys[rows], self.values[rows], self.offset,
                            self.allowed[rows[:, None], pos])


def _attend_block(
    qb: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor, idx: torch.Tensor,
    bias: Bias, window: int, band_start: int, dense: bool, anchor_k: torch.Tensor | None,
    anchor_v: torch.Tensor | None, extra: ExtraEntries | None, want_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query block: one softmax over [anchors; window; mesh; extra].

    `band_start` >= 0 says the block's queries are the consecutive positions
    band_start.. (the same in every row): the window is then read as one dense
    slice of keys with a band mask (plain matmuls); otherwise (queries packed
    around exited tokens) each query's window is gathered. `dense` says k covers
    every eligible key, so window and mesh together are the whole causal prefix
    [0, band_start + nq), read as one slice; `idx` then only names the mesh keys
    for the trace.
    Returns the output (B, H, nq, d), the softmax mass of each group
    (B, H, nq, 4), the full logits of the mesh entries (B, H, nq, k) and, with
    `want_lse`, the log-sum-exp of all logits (B, H, nq), which lets the routed
    mode merge a second softmax into this one exactly.
    """
    b, h, nq, d = qb.shape
    dt = _acc_dtype(qb)
    scale = 1.0 / math.sqrt(d)
    # (group, logits, values, einsum for probs x values or 'gathered')
    groups: list[tuple[int, torch.Tensor, torch.Tensor, str]] = []
    if anchor_k is not None:
        s = torch.einsum("bhqd,hmd->bhqm", qb, anchor_k.to(qb.dtype)).to(dt) * scale
        groups.append((0, s, anchor_v.to(qb.dtype), "bhqn,hnd->bhqd"))
    mesh_logit = torch.full(idx.shape, NEG_INF, dtype=dt, device=qb.device)
    in_window = None
    if band_start >= 0 and (window > 0 or dense):
        lo = 0 if dense else max(band_start - window + 1, 0)
        hi = band_start + nq
        s = (qb @ k[:, :, lo:hi].transpose(-1, -2)).to(dt) * scale + bias.grid(qpos, lo, hi, dt)
        dist = qpos[:, None, :, None] - torch.arange(lo, hi, device=qb.device)  # (B, 1, nq, n)
        in_window = (dist >= 0) & (dist < window)
        s = s.masked_fill((dist < 0) if dense else ~in_window, NEG_INF)
        groups.append((1, s, v[:, :, lo:hi], "bhqn,bhnd->bhqd"))
        if dense and idx.shape[-1] > 0:
            got = s.detach().gather(-1, (idx - lo).clamp(min=0))
            mesh_logit = got.masked_fill(idx < 0, NEG_INF)
    gathered = [] if dense else [(2, idx)]
    if window > 0 and band_start < 0:
        gathered.insert(0, (1, _window_positions(qpos, window, h)))
    for group, pos in gathered:
        if pos.shape[-1] == 0:
            continue
        ok = pos >= 0
        safe = pos.clamp(min=0)
        # broadcast multiply-sum: a batched mat-vec einsum here is far slower on CPU
        s = (qb[:, :, :, None, :] * _gather_keys(k, safe)).sum(-1).to(dt) * scale
        s = (s + bias.gathered(qpos, safe, dt)).masked_fill(~ok, NEG_INF)
        groups.append((group, s, _gather_keys(v, safe), "gathered"))
        if group == 2:
            mesh_logit = s.detach()
    if extra is not None:
        s = torch.einsum("bhqd,bhxd->bhqx", qb, extra.keys.to(qb.dtype)).to(dt) * scale
        s = s + extra.offset.to(dt)[None, :, None, None]
        s = s.masked_fill(~extra.allowed[:, None, :, None], NEG_INF)
        groups.append((3, s, extra.values.to(qb.dtype), "bhqn,bhnd->bhqd"))
    logits = torch.cat([g[1] for g in groups], dim=-1)
    p = logits.softmax(dim=-1)
    parts = p.split([g[1].shape[-1] for g in groups], dim=-1)
    out = torch.zeros_like(qb)
    mass = [torch.zeros(b, h, nq, device=qb.device, dtype=dt) for _ in range(4)]
    for (group, _, vals, eq), part in zip(groups, parts):
        if eq == "gathered":
            out = out + (part.to(qb.dtype)[..., None] * vals).sum(-2)
        else:
            out = out + torch.einsum(eq, part.to(qb.dtype), vals)
        if dense and group == 1:  # split the prefix slice into window and mesh mass
            mass[1] = (part * in_window).sum(-1)
            mass[2] = part.sum(-1) - mass[1]
        else:
            mass[group] = part.sum(-1)
    lse = torch.logsumexp(logits, dim=-1) if want_lse else logits.new_zeros(0)
    return out, torch.stack(mass, dim=-1), mesh_logit, lse


def _all_eligible(qpos: torch.Tensor, n_head: int, topk: int, window: int) -> torch.Tensor:
    """idx (B, H, Sq, topk) listing every key j <= i - window (when they all fit in topk)."""
    j = torch.arange(topk, device=qpos.device)
    idx = j.expand(*qpos.shape, topk)
    idx = idx.masked_fill(j > (qpos - window)[..., None], -1)
    return idx[:, None].expand(-1, n_head, -1, -1)


def _window_positions(qpos: torch.Tensor, window: int, n_head: int) -> torch.Tensor:
    """Absolute positions of each query's window (B, H, nq, w); -1 before the sequence start."""
    b, nq = qpos.shape
    wpos = qpos[:, None, :, None] - torch.arange(window, device=qpos.device)
    return wpos.masked_fill(wpos < 0, -1).expand(b, n_head, nq, window)


def _consecutive_start(qpos: torch.Tensor) -> int:
    """p0 when qpos is p0, p0+1, ... in every row, else -1."""
    if qpos.numel() == 0:
        return -1
    p0 = int(qpos[0, 0])
    expect = p0 + torch.arange(qpos.shape[1], device=qpos.device)
    return p0 if bool((qpos == expect).all()) else -1


MeshMode = Literal["exact", "routed"]
MESH_MODES: tuple[str, ...] = get_args(MeshMode)


def mesh_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qpos: torch.Tensor,
    bias: Bias,
    *,
    topk: int,
    window: int,
    block_q: int = 128,
    block_k: int = 512,
    anchor_k: torch.Tensor | None = None,
    anchor_v: torch.Tensor | None = None,
    extra: ExtraEntries | None = None,
    mode: MeshMode = "exact",
    route: torch.Tensor | None = None,
    bucket: int = 64,
    want_selection: bool = True,
    dense_below: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Causal mesh attention; q (B,H,Sq,d), k/v (B,H,T,d), qpos (B,Sq) absolute positions.

    mode "exact": each query's own top-k keys among j <= i - window (see module doc).
    mode "routed": the mesh set is instead the query token's cluster-mates among
    the last `bucket` tokens of its cluster up to i (`route` (B,H,T) gives each
    key's cluster), minus the window; see `routed_attention`. Window, anchors
    and extra entries are read the same way in both modes, in one softmax.

    Returns the output (B, H, Sq, d) and a dict with `idx`/`logit` (B,H,Sq,n)
    of the selected mesh keys (logits include the bias; n = topk, or bucket in
    routed mode, where the width is 0 unless `want_selection`) and `mass`
    (B,H,Sq,4): softmax mass on anchors, window, mesh and extra entries.
    Memory is O(Sq * n) indices plus one block's tiles (exact: blocks are
    checkpointed when gradients are needed; routed: O(Sq * (window + bucket))).

    `dense_below`: a full forward (queries = keys 0..T-1) of at most this many
    tokens runs as one masked dense attention (`_short_dense`): the same keys
    and logits, O(T^2) memory, but a few large kernels instead of many small
    ones, which is faster on short sequences. Its selection trace, when wanted,
    is computed by the tiled path, so tracing never changes the output.
    """
    if mode not in MESH_MODES:
        raise ConfigError(f"mesh mode {mode!r} is not known; use one of {', '.join(MESH_MODES)}.")
    t = k.shape[2]
    if t <= dense_below and q.shape[2] == t and _consecutive_start(qpos) == 0:
        if mode == "routed" and route is None:
            raise ValueError("mode='routed' needs `route`, the cluster of every key (B, H, T).")
        out, info = _short_dense(q, k, v, bias, mode, topk, window, block_q, block_k, route,
                                 bucket, anchor_k, anchor_v, extra)
        if want_selection:  # the trace comes from the tiled path; the output stays this one
            with torch.no_grad():
                _, info = mesh_attention(q, k, v, qpos, bias, topk=topk, window=window,
                                         block_q=block_q, block_k=block_k, anchor_k=anchor_k,
                                         anchor_v=anchor_v, extra=extra, mode=mode, route=route,
                                         bucket=bucket)
        return out, info
    if mode == "routed":
        if route is None:
            raise ValueError("mode='routed' needs `route`, the cluster of every key (B, H, T).")
        return routed_attention(q, k, v, qpos, bias, route, bucket, window, block_q,
                                anchor_k, anchor_v, extra, want_selection)
    p0 = _consecutive_start(qpos)
    # k covers every eligible key of every query: the mesh is the whole causal prefix
    dense = p0 >= 0 and topk >= p0 + q.shape[2] - window
    if dense:
        idx = _all_eligible(qpos, q.shape[1], topk, window)
    else:
        idx, _ = select_mesh(q, k, qpos, bias, topk, window, block_q, block_k)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, anchor_k, bias.slopes, bias.cum))
    outs, masses, logits = [], [], []
    for qs in range(0, q.shape[2], block_q):
        sl = slice(qs, min(qs + block_q, q.shape[2]))
        ex = None if extra is None else ExtraEntries(extra.keys, extra.values, extra.offset,
                                                     extra.allowed[:, sl])
        args = (q[:, :, sl], k, v, qpos[:, sl], idx[:, :, sl], bias, window,
                p0 + qs if p0 >= 0 else -1, dense, anchor_k, anchor_v, ex)
        if need_grad:
            o, m, lg, _ = checkpoint(_attend_block, *args, use_reentrant=False)
        else:
            o, m, lg, _ = _attend_block(*args)
        outs.append(o)
        masses.append(m.detach())
        logits.append(lg)
    out = torch.cat(outs, dim=2) if outs else q.new_zeros(q.shape)
    mass = torch.cat(masses, dim=2) if masses else q.new_zeros(*q.shape[:3], 4)
    logit = torch.cat(logits, dim=2) if logits else q.new_zeros(idx.shape)
    return out, {"idx": idx, "logit": logit, "mass": mass}


def _short_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Bias, mode: str, topk: int,
    window: int, block_q: int, block_k: int, route: torch.Tensor | None, bucket: int,
    anchor_k: torch.Tensor | None, anchor_v: torch.Tensor | None, extra: ExtraEntries | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full forward of a short sequence as one masked attention over [anchors; keys; extra].

    The mask is the mesh rule itself (window, plus the exact top-k or the routed
    set), and the logits carry the same decay bias and extra offsets, so the
    output equals the tiled paths up to float rounding (tested). The selection
    trace is not produced here (callers that trace take the tiled paths).
    """
    b, h, t, d = q.shape
    dt = _acc_dtype(q)
    pos = torch.arange(t, device=q.device)
    dist = pos[:, None] - pos[None, :]
    allowed = (dist >= 0) & (dist < window)  # (T, T)
    if mode == "routed":
        same = route[..., :, None] == route[..., None, :]  # (B, H, T, T)
        onehot = F.one_hot(route, int(route.max()) + 1)
        rank = onehot.cumsum(2).gather(-1, route[..., None]).squeeze(-1)  # rank among mates
        allowed = allowed | (same & (dist >= window)
                             & (rank[..., :, None] - rank[..., None, :] < bucket))
    elif topk > 0:
        qpos = pos.expand(b, t)
        if topk >= t - window:
            allowed = allowed | (dist >= window)
        else:
            idx, _ = select_mesh(q, k, qpos, bias, topk, window, block_q, block_k,
                                 ordered=False)  # only the set becomes the mask
            mesh = torch.zeros(b, h, t, t + 1, dtype=torch.bool, device=q.device)
            mesh.scatter_(-1, torch.where(idx < 0, t, idx), True)  # -1 (empty) -> spare column
            allowed = allowed | mesh[..., :t]
    # one bias and one mask over the columns [anchors; extra; keys], batch 1 where shared;
    # keys last, so the query block ending at qe needs only the first m + x + qe columns
    grid = bias.grid(pos[None], 0, t, dt)  # ALiBi alone: (1, H, T, T), one per head
    parts = [(k, v, grid if torch.is_tensor(grid) else None, allowed)]
    if extra is not None:
        parts.insert(0, (extra.keys.to(q.dtype), extra.values.to(q.dtype),
                         extra.offset.to(dt)[None, :, None, None],
                         extra.allowed[:, None, :, None]))
    if anchor_k is not None:
        parts.insert(0, (anchor_k.to(q.dtype).expand(b, -1, -1, -1),
                         anchor_v.to(q.dtype).expand(b, -1, -1, -1), None, None))
    biased = [pb for _, _, pb, _ in parts if pb is not None]
    masked = [pm for _, _, _, pm in parts if pm is not None]
    bb = max(x.shape[0] if x.dim() == 4 else 1 for x in biased + masked)
    add = allow = None
    if biased:
        add = torch.cat([(pb if pb is not None else q.new_zeros((), dtype=dt)).expand(
            bb, h, t, pk.shape[2]) for pk, _, pb, _ in parts], dim=-1)
    if masked:
        allow = torch.cat([(pm if pm is not None else allowed.new_ones(())).expand(
            bb, h, t, pk.shape[2]) for pk, _, _, pm in parts], dim=-1)
    keys = torch.cat([pk for pk, _, _, _ in parts], dim=2)
    values = torch.cat([pv for _, pv, _, _ in parts], dim=2)
    # query i reads the anchor and extra columns and keys up to itself
    out = masked_attention(q, keys, values, add, allow, causal_from=keys.shape[2] - t)
    empty = pos.new_zeros(b, h, t, 0)
    return out, {"idx": empty, "logit": empty.to(dt), "mass": q.new_zeros(b, h, t, 4, dtype=dt)}


# ----- routed mesh: online k-means clusters, attention inside a cluster, causally --------------


class RouteCentroids(nn.Module):
    """Per-head spherical k-means centroids that route tokens to clusters (Routing Transformer).

    A token's cluster in head h is argmax_c <mu_hc, k_hat>, where k_hat is its
    unit-normalised key (before RoPE, so the cluster does not depend on the
    position): it depends on that token alone. The centroids are a buffer, so
    checkpoints carry them, and they never receive a gradient. Training
    forwards only *accumulate* the keys assigned to each cluster; `update()`,
    called after the optimizer step (TMT.on_train_step_end), moves each
    centroid by EMA toward the mean of its keys: mu <- normalise(decay mu +
    (1 - decay) mean). So no forward is influenced by statistics of its own
    tokens, the future ones included, and eval forwards change nothing.
    The pending sums are plain attributes, not buffers: data parallelism must
    not overwrite one rank's sums with another's (TMT reduces them first).
    """

    def __init__(self, n_head: int, n_clusters: int, head_dim: int, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("centroids", F.normalize(torch.randn(n_head, n_clusters, head_dim),
                                                      dim=-1))
        self.pending_sum: torch.Tensor | None = None
        self.pending_count: torch.Tensor | None = None

    @torch.no_grad()
    def assign(self, k: torch.Tensor) -> torch.Tensor:
        """Cluster (B, H, T) int64 of each key k (B, H, T, d)."""
        dt = _acc_dtype(k)
        sim = torch.einsum("bhtd,hcd->bhtc", F.normalize(k.to(dt), dim=-1),
                           self.centroids.to(dt))
        return sim.argmax(dim=-1)

    @torch.no_grad()
    def accumulate(self, k: torch.Tensor, cluster: torch.Tensor) -> None:
        """Add the unit keys k (B, H, T, d) to the pending sums of their clusters (B, H, T)."""
        h, c, d = self.centroids.shape
        unit = F.normalize(k.detach().float(), dim=-1)
        flat = (cluster + torch.arange(h, device=k.device)[None, :, None] * c).reshape(-1)
        if self.pending_sum is None:
            self.pending_sum = torch.zeros(h * c, d, device=k.device)
            self.pending_count = torch.zeros(h * c, device=k.device)
        self.pending_sum.index_add_(0, flat, unit.reshape(-1, d))
        self.pending_count.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))

    @torch.no_grad()
    def update(self, reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """Apply the pending EMA step (after the optimizer step) and clear the sums.

        `reduce` sums a tensor over data-parallel ranks in place, so every rank
        moves its centroids by the same amount.
        """
        if self.pending_sum is None:
            return
        total, count = self.pending_sum, self.pending_count
        if reduce is not None:
            reduce(total)
            reduce(count)
        h, c, d = self.centroids.shape
        mean = (total / count.clamp(min=1)[:, None]).view(h, c, d)
        hit = (count > 0).view(h, c, 1)
        cur = self.centroids.float()
        moved = F.normalize(self.decay * cur + (1 - self.decay) * mean, dim=-1)
        self.centroids.copy_(torch.where(hit, moved, cur).to(self.centroids.dtype))
        self.pending_sum = self.pending_count = None


def _softmax_lse(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax over the last dim and its log-sum-exp; a row of only -inf gives zeros and -inf.

    Used where no gradient is needed in practice (KV cache, exited tokens), but
    kept NaN-free in backward too.
    """
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    total = e.sum(dim=-1, keepdim=True)
    empty = total == 0
    prob = e / torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, NEG_INF),
                      m + torch.log(torch.where(empty, torch.ones_like(total), total)))
    return prob, lse.squeeze(-1)


def _route_order(route: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort keys by (cluster, position): order (B,H,T) sorted -> position, inv position -> sorted.

    Inside one cluster the sorted order is the time order, so a token's rank
    among its cluster-mates depends only on the tokens before it.
    """
    t = route.shape[-1]
    pos = torch.arange(t, device=route.device)
    order = (route * t + pos).argsort(dim=-1)
    inv = torch.empty_like(order).scatter_(-1, order, pos.expand_as(order).contiguous())
    return order, inv


@dataclass
class _Part:
    """Logits of one group of entries and how to turn their probabilities into output."""

    logits: torch.Tensor  # (B, H, Sq, n), or sorted tiles for the routed part
    apply: Callable[[torch.Tensor], torch.Tensor]  # probs like logits -> output (B, H, Sq, d)
    mass_slot: int


def _local_parts(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p0: int, bias: Bias, window: int,
    block: int, anchor_k: torch.Tensor | None, anchor_v: torch.Tensor | None,
    extra: ExtraEntries | None,
) -> list[_Part]:
    """Anchors, local window and extra entries of the consecutive queries p0, p0+1, ...

    The window is read as batched tiles: queries in blocks of L = max(block,
    window) against the keys of their own block and the one before (2L keys,
    band-masked to i - window < j <= i). One op for the whole sequence, so the
    backward stays linear in S (a Python loop of slices would give every block
    a full-size key gradient).
    """
    b, h, sq, d = q.shape
    dt = _acc_dtype(q)
    scale = 1.0 / math.sqrt(d)
    parts: list[_Part] = []
    if anchor_k is not None:
        av = anchor_v.to(q.dtype)
        parts.append(_Part(
            torch.einsum("bhqd,hmd->bhqm", q, anchor_k.to(q.dtype)).to(dt) * scale,
            lambda p: torch.einsum("bhqm,hmd->bhqd", p.to(q.dtype), av), 0))
    if window > 0:
        n_l = max(block, window)
        nb = -(-sq // n_l)
        base = p0 - n_l  # position of the first key slot
        lo = max(base, 0)

        def tiles(x: torch.Tensor) -> torch.Tensor:  # keys base.., 2L per query block
            seg = x[:, :, lo:p0 + sq]
            seg = F.pad(seg, (0, 0, lo - base, (nb + 1) * n_l - (lo - base) - seg.shape[2]))
            kb = seg.view(b, h, nb + 1, n_l, d)
            return torch.cat([kb[:, :, :-1], kb[:, :, 1:]], dim=3)

        kk, vv = tiles(k), tiles(v)
        qb = F.pad(q, (0, 0, 0, nb * n_l - sq)).view(b, h, nb, n_l, d)
        qi = torch.arange(n_l, device=q.device)[:, None]
        slot = torch.arange(2 * n_l, device=q.device)
        dist = n_l + qi - slot  # query position - key position, the same in every tile
        band = (dist >= 0) & (dist < window)
        s = (qb @ kk.transpose(-1, -2)).to(dt)
        if bias.cum is None:  # ALiBi (or none): the bias depends on the distance only
            add = torch.zeros(h, n_l, 2 * n_l, dtype=dt, device=q.device)
            if bias.slopes is not None:
                add = -bias.slopes.to(dt)[:, None, None] * dist.to(dt)
            add = add.masked_fill(~band, NEG_INF)[None, :, None]  # (1, H, 1, L, 2L)
            s = torch.add(add, s, alpha=scale)  # one pass: scale, bias and band mask
        else:
            last = k.shape[2] - 1
            qp = (p0 + torch.arange(nb * n_l, device=q.device)).view(1, 1, nb, n_l)
            kp = (base + torch.arange(nb, device=q.device)[:, None] * n_l + slot).view(1, 1, nb, -1)
            s = s * scale + bias.pairs(qp.clamp(max=last).expand(b, h, -1, -1),
                                       kp.clamp(0, last).expand(b, h, -1, -1), dt)
            s = s.masked_fill(~band, NEG_INF)
        if base < 0:  # the first tile's key slots before position 0 are padding
            s[:, :, 0].masked_fill_(slot < -base, NEG_INF)
        s = s.reshape(b, h, nb * n_l, 2 * n_l)[:, :, :sq]

        def window_out(p: torch.Tensor) -> torch.Tensor:
            pw = F.pad(p, (0, 0, 0, nb * n_l - sq)).view(b, h, nb, n_l, 2 * n_l)
            return (pw.to(q.dtype) @ vv).view(b, h, nb * n_l, d)[:, :, :sq]

        parts.append(_Part(s, window_out, 1))
    if extra is not None:
        sx = torch.einsum("bhqd,bhxd->bhqx", q, extra.keys.to(q.dtype)).to(dt) * scale
        sx = sx + extra.offset.to(dt)[None, :, None, None]
        xv = extra.values.to(q.dtype)
        parts.append(_Part(sx.masked_fill(~extra.allowed[:, None, :, None], NEG_INF),
                           lambda p: torch.einsum("bhqx,bhxd->bhqd", p.to(q.dtype), xv), 3))
    return parts


def routed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor, bias: Bias,
    route: torch.Tensor, bucket: int, window: int, block_q: int = 128,
    anchor_k: torch.Tensor | None = None, anchor_v: torch.Tensor | None = None,
    extra: ExtraEntries | None = None, want_selection: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mesh attention whose mesh set comes from online k-means routing (`mode="routed"`).

    Query i, whose own key (position i) has cluster c = route[i], reads in one
    softmax: the anchors, its window (i - window < j <= i), the extra entries,
    and the keys of cluster c among the last `bucket` tokens of cluster c up to
    and including i, except those inside the window. With keys sorted by
    (cluster, position) the routed keys are the sorted indices p-bucket+1 .. p
    (p: the sorted index of the query's own key) that carry cluster c. That set
    is fixed by the tokens at or before i alone, so the layer is causal; the
    Routing Transformer's balanced top-w buckets, which rank the whole
    sequence, would let a future token move a query in or out of a bucket.

    The full forward (queries = every key, positions 0..T-1) runs as dense
    tiles: the window in blocks along time, the routed part in blocks of
    `bucket` along the sorted order (each against its own block and the one
    before), one shared stabiliser, O(T (window + bucket) d) time and memory.
    Any other query set (KV cache, exited tokens) gathers the `bucket`
    candidates of each query and merges the two softmaxes by their log-sum-exp.
    Both read the same keys with the same logits (tested in fp64).
    Returns what `mesh_attention` returns; idx/logit are (B,H,Sq,bucket).
    """
    b, h, t, d = k.shape
    sq = q.shape[2]
    p0 = _consecutive_start(qpos)
    if p0 == 0 and sq == t:
        return _routed_full(q, k, v, bias, route, bucket, window, block_q, anchor_k, anchor_v,
                            extra, want_selection)
    dt = _acc_dtype(q)
    # the local part: batched tiles when the queries are consecutive, else one gather per query
    if p0 >= 0:
        parts = _local_parts(q, k, v, p0, bias, window, block_q, anchor_k, anchor_v, extra)
        if parts:
            prob, lse_l = _softmax_lse(torch.cat([p.logits for p in parts], dim=-1))
            out_l, mass = _apply_parts(parts, prob, q)
        else:
            out_l, lse_l = torch.zeros_like(q), q.new_full((b, h, sq), NEG_INF, dtype=dt)
            mass = q.new_zeros(b, h, sq, 4, dtype=dt)
    else:
        no_idx = qpos.new_zeros(b, h, sq, 0)
        out_l, mass, _, lse_l = _attend_block(q, k, v, qpos, no_idx, bias, window, -1, False,
                                              anchor_k, anchor_v, extra, True)
    order, inv = _route_order(route)
    outs, lses, idxs, lgs = [], [], [], []
    scale = 1.0 / math.sqrt(d)
    for qs in range(0, sq, block_q):
        pb = qpos[:, qs:qs + block_q]
        qb = q[:, :, qs:qs + block_q]
        nq = pb.shape[1]
        own = inv.gather(-1, pb[:, None, :].expand(b, h, nq))  # sorted index of each query's key
        srt = own[..., None] - torch.arange(bucket - 1, -1, -1, device=q.device)  # (B,H,nq,r)
        kidx = order.gather(-1, srt.clamp(min=0).reshape(b, h, -1)).view(b, h, nq, bucket)
        c_q = route.gather(-1, pb[:, None, :].expand(b, h, nq))
        c_k = route.gather(-1, kidx.reshape(b, h, -1)).view(b, h, nq, bucket)
        ok = (srt >= 0) & (c_k == c_q[..., None]) & (kidx <= (pb[:, None, :, None] - window))
        s = (qb[:, :, :, None, :] * _gather_keys(k, kidx)).sum(-1).to(dt) * scale
        s = (s + bias.gathered(pb, kidx, dt)).masked_fill(~ok, NEG_INF)
        prob, lse = _softmax_lse(s)
        outs.append((prob.to(q.dtype)[..., None] * _gather_keys(v, kidx)).sum(-2))
        lses.append(lse)
        idxs.append(kidx.masked_fill(~ok, -1))
        lgs.append(s.detach())
    lse_r = torch.cat(lses, dim=2)
    lse = torch.logaddexp(lse_l, lse_r)
    w_l, w_r = torch.exp(lse_l - lse), torch.exp(lse_r - lse)
    out = out_l * w_l[..., None].to(q.dtype) + torch.cat(outs, dim=2) * w_r[..., None].to(q.dtype)
    mass = mass * w_l[..., None].detach()
    mass[..., 2] = w_r.detach()
    return out, {"idx": torch.cat(idxs, dim=2), "logit": torch.cat(lgs, dim=2), "mass": mass}


def _apply_parts(parts: list[_Part], prob: torch.Tensor, q: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and per-slot softmax mass (B,H,Sq,4) of query-ordered parts given their probs."""
    out = torch.zeros_like(q)
    mass = q.new_zeros(*q.shape[:3], 4, dtype=prob.dtype)
    at = 0
    for part in parts:
        n = part.logits.shape[-1]
        p = prob[..., at:at + n]
        out = out + part.apply(p)
        mass[..., part.mass_slot] = p.detach().sum(-1)
        at += n
    return out, mass


def _sorted_band(r: int, device: torch.device) -> torch.Tensor:
    """(r, 2r): tile slot qi (sorted index p) may read key slot l, i.e. sorted index p-r+1..p.

    This band is what makes the routed set causal. Reading the whole tile (own
    block and the previous one, masked only by position) is the tempting
    shortcut, and it leaks: a block's boundaries depend on how many tokens of
    the whole sequence fall in lower clusters, future tokens included. The
    tests plant exactly that shortcut here and check that the audit fails.
    """
    slot = torch.arange(2 * r, device=device)
    qi = torch.arange(r, device=device)[:, None]
    return (slot > qi) & (slot <= qi + r)


def _routed_full(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Bias, route: torch.Tensor,
    bucket: int, window: int, block: int, anchor_k: torch.Tensor | None,
    anchor_v: torch.Tensor | None, extra: ExtraEntries | None, want_selection: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`routed_attention` for the full forward: tiles along time and along the sorted order.

    The two sets live in different orders, so instead of one concatenated
    softmax both use the same per-query stabiliser m (the larger of the two
    maxima, no gradient): out = (sum_local e^(s-m) v + sum_routed e^(s-m) v) /
    (sum_local e^(s-m) + sum_routed e^(s-m)), which is that softmax exactly.
    """
    b, h, t, d = q.shape
    r = bucket
    dt = _acc_dtype(q)
    order, inv = _route_order(route)
    nb = -(-t // r)
    pad = nb * r - t

    def sort(x: torch.Tensor, fill: float = 0) -> torch.Tensor:  # (B,H,T[,d]) -> sorted, padded
        ix = order if x.dim() == 3 else order[..., None].expand(-1, -1, -1, x.shape[-1])
        xs = x.gather(2, ix)
        return F.pad(xs, (0, 0, 0, pad) if x.dim() == 4 else (0, pad), value=fill)

    def with_previous(x: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """(B,H,nb*r,...) -> (B,H,nb,2r,...): each sorted block after the block before it."""
        blocks = x.view(b, h, nb, r, *x.shape[3:])
        prev = torch.cat([torch.full_like(blocks[:, :, :1], fill), blocks[:, :, :-1]], dim=2)
        return torch.cat([prev, blocks], dim=3)

    pos_s = sort(torch.arange(t, device=q.device).expand(b, h, t), fill=-1)  # -1: padding
    c_s = sort(route, fill=-1)
    qs = sort(q).view(b, h, nb, r, d)
    ks, vs = with_previous(sort(k)), with_previous(sort(v))
    pk, ck = with_previous(pos_s, -1), with_previous(c_s, -1)  # (B,H,nb,2r); -1: no key
    pq, cq = pos_s.view(b, h, nb, r), c_s.view(b, h, nb, r)
    s_r = (qs @ ks.transpose(-1, -2)).to(dt) * (1.0 / math.sqrt(d))
    s_r = s_r + bias.pairs(pq.clamp(min=0), pk.clamp(min=0), dt)
    qi = torch.arange(r, device=q.device)[:, None]
    ok = _sorted_band(r, q.device) & (ck[..., None, :] == cq[..., None]) \
        & (ck[..., None, :] >= 0) & (pk[..., None, :] <= pq[..., None] - window)
    s_r = s_r.masked_fill(~ok, NEG_INF)

    parts = _local_parts(q, k, v, 0, bias, window, block, anchor_k, anchor_v, extra)
    s_l = torch.cat([p.logits for p in parts], dim=-1) if parts else None
    # one stabiliser per query: every query has a finite logit (itself, in the window or,
    # with window 0, in its own routed set)
    m = s_r.detach().amax(dim=-1).view(b, h, nb * r).gather(2, inv)
    if s_l is not None:
        m = torch.maximum(m, s_l.detach().amax(dim=-1))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    m_sorted = F.pad(m.gather(2, order), (0, pad)).view(b, h, nb, r)
    e_r = torch.exp(s_r - m_sorted[..., None])
    z_r = e_r.sum(-1).view(b, h, nb * r).gather(2, inv)
    back = inv[..., None].expand(-1, -1, -1, d)
    num = (e_r.to(q.dtype) @ vs).view(b, h, nb * r, d).gather(2, back)
    z = z_r
    if s_l is not None:
        e_l = torch.exp(s_l - m[..., None])
        z_l = e_l.sum(-1)
        z = z + z_l
        out_l, mass = _apply_parts(parts, e_l, q)  # unnormalised: divided by z below
        num = num + out_l
        mass = mass / z[..., None]
    else:
        mass = q.new_zeros(b, h, t, 4, dtype=dt)
    out = num / z[..., None].to(q.dtype)
    mass[..., 2] = (z_r / z).detach()
    if not want_selection:
        empty = inv.new_zeros(b, h, t, 0)
        return out, {"idx": empty, "logit": empty.to(dt), "mass": mass.detach()}
    pick = (qi + 1 + torch.arange(r, device=q.device)).expand(b, h, nb, r, r)
    sel_pos = pk[..., None, :].expand(-1, -1, -1, r, -1).gather(-1, pick)
    sel_ok = ok.expand(b, h, nb, r, 2 * r).gather(-1, pick)
    sel_logit = s_r.detach().gather(-1, pick)
    sel_idx = sel_pos.masked_fill(~sel_ok, -1).view(b, h, nb * r, r)
    back_r = inv[..., None].expand(-1, -1, -1, r)
    return out, {"idx": sel_idx.gather(2, back_r),
                 "logit": sel_logit.view(b, h, nb * r, r).gather(2, back_r),
                 "mass": mass.detach()}


def dense_reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor, bias: Bias,
    anchor_k: torch.Tensor | None = None, anchor_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain causal attention with the same bias and anchors, materialising (Sq x T).

    The limit mesh attention must reach when k covers every eligible key (A7),
    and the "eager dense" line of the memory benchmark.
    """
    d = q.shape[-1]
    dt = _acc_dtype(q)
    s = (q @ k.transpose(-1, -2)).to(dt) / math.sqrt(d)
    s = s + bias.grid(qpos, 0, k.shape[2], dt)
    kpos = torch.arange(k.shape[2], device=q.device)
    s = s.masked_fill(kpos > qpos[:, None, :, None], NEG_INF)
    vals = v
    if anchor_k is not None:
        a = torch.einsum("bhqd,hmd->bhqm", q, anchor_k.to(q.dtype)).to(dt) / math.sqrt(d)
        s = torch.cat([a, s], dim=-1)
        vals = torch.cat([anchor_v.to(v.dtype).expand(q.shape[0], -1, -1, -1), v], dim=2)
    return s.softmax(-1).to(q.dtype) @ vals


# ----- the attention layer -------------------------------------------------------------------


@dataclass
class QuerySet:
    """Which tokens issue queries in this layer (the rest have exited early).

    rows (R,) batch rows with at least one active token; pos (R, Sa) their local
    positions in this call, left-packed (padding slots repeat real positions and
    their results are dropped); valid (R, Sa) marks real slots.
    """

    rows: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor
    n_rows: int

    @classmethod
    def from_mask(cls, active: torch.Tensor) -> QuerySet:
        rows = active.any(dim=1).nonzero().squeeze(1)
        sub = active[rows]
        counts = sub.sum(dim=1)
        width = int(counts.max()) if rows.numel() else 0
        # stable sort puts the active positions first, in order
        pos = torch.argsort((~sub).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = torch.arange(width, device=active.device)[None, :] < counts[:, None]
        return cls(rows, pos, valid, active.shape[0])

    @property
    def empty(self) -> bool:
        return self.rows.numel() == 0

    @property
    def all_rows(self) -> bool:
        return self.rows.numel() == self.n_rows

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, ...) -> (R, Sa, ...)."""
        return x[self.rows[:, None], self.pos]

    def scatter(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Write values (R, Sa, ...) back into a copy of x (B, S, ...) at the real slots."""
        rows = self.rows[:, None].expand_as(self.pos)[self.valid]
        return x.index_put((rows, self.pos[self.valid]), values[self.valid])


class MeshAttention(nn.Module):
    """The causal TMT attention sublayer: projections, decay, anchors, cache, xmem reads.

    Keys and values are computed for every token of the call (tokens that exited
    early still provide keys at deeper layers, from their frozen hidden state);
    queries, the attention and W_o run only for the tokens in `queries`.
    """

    def __init__(self, d_model: int, n_head: int, *, topk: int, window: int, block_q: int,
                 block_k: int, decay: str, n_anchors: int, xmem: bool, dropout: float = 0.0,
                 mode: MeshMode = "exact", n_clusters: int = 8, bucket: int = 64,
                 centroid_decay: float = 0.99, dense_below: int = 0):
        super().__init__()
        self.dense_below = dense_below
        if mode not in MESH_MODES:
            raise ConfigError(f"mesh_mode={mode!r} is not known; use one of "
                              f"{', '.join(MESH_MODES)}.")
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.topk, self.window = topk, window
        self.block_q, self.block_k = block_q, block_k
        self.mode, self.bucket = mode, bucket
        # routed mode: the centroids that pick each token's cluster (a buffer, no gradient)
        self.router = RouteCentroids(n_head, n_clusters, self.head_dim, centroid_decay) \
            if mode == "routed" else None
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.proj.residual_proj = True
        self.decay = DecayBias(decay, n_head, d_model)
        from memlm.memory.anchors import PersistentAnchors

        self.anchors = PersistentAnchors(n_head, n_anchors, self.head_dim) if n_anchors else None
        # learned per-head offset of cross-segment entries (gamma^x_h)
        self.xmem_offset = nn.Parameter(torch.zeros(n_head)) if xmem else None
        self.resid_dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.n_head, self.head_dim).transpose(1, 2)

    def project_kv(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(u).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(
        self,
        u: torch.Tensor,
        *,
        start: int,
        queries: QuerySet | None = None,
        cache: Any = None,
        rope: Any = None,
        extra: ExtraEntries | None = None,
        trace: dict[str, torch.Tensor] | None = None,
        h_in: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        """u = LN1(h) (B, S, D) for every token of the call; `start` is its first position.

        Returns (y, (k_new, v_new)): y (B, S, D) when every token queries, (R, Sa, D)
        for a `QuerySet`, None when no token queries; the new keys/values feed the
        cache and the cross-segment memory write.
        """
        b, s, _ = u.shape
        k_new, v_new = self.project_kv(u)
        route = None
        if self.router is not None:  # clusters from the un-rotated keys: position-free
            route = self.router.assign(k_new)
            if self.training and torch.is_grad_enabled():
                self.router.accumulate(k_new, route)  # applied after the optimizer step
        if rope is not None:
            k_new = rope(k_new, slice(start, start + s))
        logf = self.decay.log_forget(u)
        if cache is not None:
            k, v, cum = cache.append(k_new, v_new, logf)
            k, v = k.to(u.dtype), v.to(u.dtype)
            if route is not None:
                route = cache.append_route(route)
        else:
            k, v = k_new, v_new
            cum = None if logf is None else logf.cumsum(dim=-1)
        if queries is not None and queries.empty:
            return None, (k_new, v_new)
        bias = Bias(self.decay.slopes(), cum)
        if queries is None:
            uq = u
            local = torch.arange(s, device=u.device).expand(b, s)
            rows = None
        else:
            uq = queries.gather(u)
            local = queries.pos
            rows = None if queries.all_rows else queries.rows
            if rows is not None:
                k, v = k[rows], v[rows]
                bias = bias.rows(rows)
                route = None if route is None else route[rows]
        qpos = local + start
        q = self._heads(self.q(uq))
        if rope is not None:
            q = rope(q, qpos[:, None, :])
        anchor_k = anchor_v = None
        if self.anchors is not None:
            anchor_k, anchor_v = self.anchors.keys, self.anchors.values
        ex = extra
        if ex is not None and queries is not None:
            ex = ex.rows(queries.rows, queries.pos)
        o, info = mesh_attention(
            q, k, v, qpos, bias, topk=self.topk, window=self.window, block_q=self.block_q,
            block_k=self.block_k, anchor_k=anchor_k, anchor_v=anchor_v, extra=ex,
            mode=self.mode, route=route, bucket=self.bucket, want_selection=trace is not None,
            dense_below=self.dense_below,
        )
        if trace is not None:
            trace.update(_scatter_trace(info, queries, b, s))
            if logf is not None:
                trace["fox_logf"] = logf.detach()
        y = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)
        return self.resid_dropout(self.proj(y)), (k_new, v_new)


def _scatter_trace(info: dict[str, torch.Tensor], queries: QuerySet | None, b: int, s: int
                   ) -> dict[str, torch.Tensor]:
    """Per-token trace tensors in (B, H, S, ...) layout; rows that issued no query get -1/NaN."""
    if queries is None:
        return {"knn_idx": info["idx"].to(torch.int32), "knn_logit": info["logit"].half(),
                "attn_mass": info["mass"].half()}
    idx, logit, mass = info["idx"], info["logit"], info["mass"]
    h, kk = idx.shape[1], idx.shape[3]
    full_idx = torch.full((b, h, s, kk), -1, dtype=torch.int32, device=idx.device)
    full_logit = torch.full((b, h, s, kk), NEG_INF, dtype=torch.float16, device=idx.device)
    full_mass = torch.full((b, h, s, 4), float("nan"), dtype=torch.float16, device=idx.device)
    rows = queries.rows[:, None].expand_as(queries.pos)[queries.valid]
    pos = queries.pos[queries.valid]
    # (R, H, Sa, .) -> (N, H, .) for the real slots
    pick = queries.valid.nonzero(as_tuple=True)
    full_idx[rows, :, pos] = idx.permute(0, 2, 1, 3)[pick].to(torch.int32)
    full_logit[rows, :, pos] = logit.permute(0, 2, 1, 3)[pick].half()
    full_mass[rows, :, pos] = mass.permute(0, 2, 1, 3)[pick].half()
    return {"knn_idx": full_idx, "knn_logit": full_logit, "attn_mass": full_mass}


# ----- the fenced faithful (leaking) reproduction ------------------------------------------------


def knn_graph(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The original TMT mesh: each position's k most cosine-similar OTHER positions, future included.

    h (B, S, D) is the layer's input (the residual stream, before the norm).
    Returns (edges (B, S, k') int64, weights (B, S, k') their cosines), k' =
    min(k, S - 1). The cosines keep their gradient, as in the original, where
    they are added to the attention logits.
    """
    s = h.shape[1]
    unit = F.normalize(h, p=2, dim=-1)
    cos = unit @ unit.transpose(1, 2)  # every position, the future included: the leak
    n = min(k, s - 1)
    eye = torch.eye(s, dtype=torch.bool, device=h.device)
    weights, edges = cos.masked_fill(eye, NEG_INF).topk(max(n, 0), dim=-1)
    return edges, weights


class FaithfulLeakyAttention(nn.Module):
    """LEAKS FUTURE TOKENS. The original TMT's MeshAttention, kept to reproduce it exactly.

    Dense QK^T / sqrt(d) with every non-edge at -inf, each kNN edge's cosine added
    to its logit and the diagonal at 0 (`knn_graph` ranks all positions, so each
    row's neighbours include future tokens); after the softmax, row i of head h
    is scaled by sigmoid(w_h tau_i), where tau_i (from the model's temporal
    position encoder) depends on i / (S - 1), i.e. on the current length. Rows
    therefore no longer sum to one. Memory and time are O(S^2). Never a default,
    never part of a preset; the model warns (`LeakyModeWarning`) when it is built.
    """

    causal = False

    def __init__(self, d_model: int, n_head: int, *, topk: int, decay_rate: float = 0.1,
                 dropout: float = 0.0):
        super().__init__()
        self.n_head, self.head_dim, self.topk = n_head, d_model // n_head, topk
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.proj.residual_proj = True
        self.w_decay = nn.Parameter(torch.full((n_head,), decay_rate))  # the original's w_decay
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, u: torch.Tensor, h_in: torch.Tensor, token_decay: torch.Tensor | None,
                trace: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """u = LN1(h) (B, S, D); h_in = h, whose cosines build the graph; token_decay tau (S,)."""
        b, s, d_model = u.shape
        hd, nh = self.head_dim, self.n_head
        q = self.q(u).view(b, s, nh, hd).transpose(1, 2)
        k, v = (t.view(b, s, nh, hd).transpose(1, 2) for t in self.kv(u).chunk(2, dim=-1))
        edges, weights = knn_graph(h_in, self.topk)
        mask = torch.full((b, s, s), NEG_INF, dtype=u.dtype, device=u.device)
        mask = mask.scatter(-1, edges, weights.to(u.dtype))
        eye = torch.eye(s, dtype=torch.bool, device=u.device)
        mask = mask.masked_fill(eye, 0.0)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask[:, None]
        alpha = logits.softmax(-1)
        if token_decay is not None:
            row = torch.sigmoid(self.w_decay.to(u.dtype)[:, None] * token_decay.to(u.dtype))
            alpha = alpha * row[None, :, :, None]
        o = self.attn_dropout(alpha) @ v
        if trace is not None:
            idx = edges[:, None].expand(b, nh, s, edges.shape[-1])
            trace["knn_idx"] = idx.to(torch.int32)
            trace["knn_logit"] = logits.gather(-1, idx).detach().half()
        return self.proj(o.transpose(1, 2).reshape(b, s, d_model))
