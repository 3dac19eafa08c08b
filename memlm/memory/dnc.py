"""Differentiable Neural Computer memory (Graves et al., Nature 2016), driven by an LM's hidden state.

One `DNCMemory` owns an N x W memory matrix per stream. For every token, in order, the
controller (the transformer's hidden state h_t) emits an interface vector that

1. frees slots that earlier reads marked as done (free gates -> retention psi),
2. updates slot usage and derives an allocation address from the least-used slots,
3. mixes allocation with content addressing (allocation gate), gates the write
   (write gate) and applies erase + add to the chosen rows,
4. reads R vectors from the *new* memory by content (and, with temporal links,
   forward/backward along the order in which slots were written).

The R read vectors are projected to the model width and returned; the model adds
them to the residual stream. The memory is a recurrent state (`DNCState`) that the
caller carries from segment to segment, which is what lets information reach
tokens far beyond the attention window.

Why this differs from the reference implementation (AsishKumarDalal/memoryllm):
its memory and usage start at exact zeros and every operation is equivariant under
slot permutations, so all slots stay identical forever and writes are exactly
uniform. Here the initial memory is a learned random matrix and allocation is
Graves' usage-sorted allocation, so the very first write already picks one slot.
`faithful=True` keeps the reference equations for comparison (see `_faithful_step`).

Speed: the recurrence is inherently sequential, so everything that does not depend on
the memory (the whole interface projection, key normalisation, strengths, gates) is
computed for the segment in one matmul before the time loop; the loop body only
touches B x N x W tensors and never syncs with the host. The memory always runs in
float32, outside autocast.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

#: the floor of the allocation usage (Graves' epsilon): keeps the cumulative product
#: strictly positive so the allocation stays differentiable
ALLOC_EPS = 1e-6
#: the norm floor of cosine similarity: a / max(||a||, 1e-6)
COS_EPS = 1e-6


class DNCState(NamedTuple):
    """Everything the memory carries from one token (and segment) to the next; float32.

    `link` [B, N, N] and `precedence` [B, N] are empty tensors (N = 0) when temporal
    links are off, so the state is always a plain tuple of tensors that any trainer
    can detach, move or save without special cases.
    """

    memory: torch.Tensor  # [B, N, W]
    usage: torch.Tensor  # [B, N]
    write_weights: torch.Tensor  # [B, N]  gated write weights of the previous step
    read_weights: torch.Tensor  # [B, R, N] read weights of the previous step
    link: torch.Tensor  # [B, N, N] or [B, 0, 0]
    precedence: torch.Tensor  # [B, N] or [B, 0]

    @property
    def batch_size(self) -> int:
        return self.memory.shape[0]


class MemoryResult(NamedTuple):
    """What one segment through the memory produces (per-token tensors are [B, T, ...])."""

    out: torch.Tensor  # [B, T, d] projected reads, added to the residual stream
    reads: torch.Tensor  # [B, T, R*W] raw read vectors
    state: DNCState
    write_gate: torch.Tensor  # [B, T]
    alloc_gate: torch.Tensor  # [B, T]
    free_gate: torch.Tensor  # [B, T] mean over read heads
    address: torch.Tensor  # [B, T, N] normalised write address w-hat (sums to 1)
    read_weights: torch.Tensor  # [B, T, R, N]
    usage: torch.Tensor | None  # [B, T, N] usage after each step (only when asked for)


def oneplus(x: torch.Tensor) -> torch.Tensor:
    """1 + softplus(x): a key strength >= 1, so addressing can only sharpen."""
    return 1.0 + F.softplus(x)


def unit_rows(x: torch.Tensor, eps: float = COS_EPS) -> torch.Tensor:
    """x / max(||x||, eps) along the last dim (the cosine normalisation of content addressing)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum p log max(p, 1e-12) over the last dim."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def retention(free_gates: torch.Tensor, prev_read_weights: torch.Tensor) -> torch.Tensor:
    """psi = prod_r (1 - f_r w^r_prev[r]) [B, N]: how much of each slot's usage survives."""
    return (1.0 - free_gates.unsqueeze(-1) * prev_read_weights).prod(dim=1)


def update_usage(usage: torch.Tensor, prev_write: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """u' = (u + w^w_prev - u w^w_prev) psi: written slots fill up, freed slots empty."""
    return (usage + prev_write - usage * prev_write) * psi


def allocation_weights(usage: torch.Tensor) -> torch.Tensor:
    """Graves' allocation: the least-used slot gets the most weight.

    a[phi_j] = (1 - u[phi_j]) prod_{i<j} u[phi_i], with phi the ascending (stable) sort of
    the usage. The sort order is treated as a constant; gradient flows through the
    usage values. With equal usages the stable sort makes it one-hot on slot 0, which
    is what breaks the slot symmetry on the very first write.
    """
    u = ALLOC_EPS + (1.0 - ALLOC_EPS) * usage
    sorted_u, order = torch.sort(u, dim=-1, stable=True)
    before = torch.cumprod(sorted_u, dim=-1)
    before = torch.cat([torch.ones_like(before[..., :1]), before[..., :-1]], dim=-1)
    return torch.zeros_like(u).scatter(-1, order, (1.0 - sorted_u) * before)


def write_memory(memory: torch.Tensor, weights: torch.Tensor, erase: torch.Tensor,
                 value: torch.Tensor) -> torch.Tensor:
    """M' = M * (1 - w e^T) + w v^T for weights [B, N], erase/value [B, W]."""
    w = weights.unsqueeze(-1)
    return torch.addcmul(memory * (1.0 - w * erase.unsqueeze(1)), w, value.unsqueeze(1))


def update_links(link: torch.Tensor, precedence: torch.Tensor,
                 write: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Temporal link matrix L[i, j] ~ 'slot i was written right after slot j'."""
    wi, wj = write.unsqueeze(-1), write.unsqueeze(-2)
    link = (1.0 - wi - wj) * link + wi * precedence.unsqueeze(-2)
    link = link * (1.0 - torch.eye(link.shape[-1], device=link.device, dtype=link.dtype))
    precedence = (1.0 - write.sum(-1, keepdim=True)) * precedence + write
    return link, precedence


def write_and_address(memory: torch.Tensor, write: torch.Tensor, erase: torch.Tensor,
                      value: torch.Tensor, read_keys: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The memory-sized part of a step, in plain autograd ops (the reference for `_WriteAndAddress`).

    Writes (`write_memory`), takes the new rows' inverse norms and the read heads' cosine
    scores (before their softmax): returns (M', 1 / max(||M'_i||, eps), (k^r M'^T) / ||M'_i||).
    """
    memory = write_memory(memory, write, erase, value)
    inv_norm = memory.norm(dim=-1).clamp_min(COS_EPS).reciprocal()
    scores = torch.bmm(read_keys, memory.transpose(1, 2)) * inv_norm.unsqueeze(1)
    return memory, inv_norm, scores


class _WriteAndAddress(torch.autograd.Function):
    """`write_and_address` with a hand-written backward: the same values, fewer memory passes.

    Why: on a CPU the eager step is bound by memory traffic and per-op overhead, not
    arithmetic. Each B x N x W tensor that autograd allocates per token (the erase mask,
    1 - w e^T, each input's gradient of the erase/add, the norm's and the read scores'
    gradients, then their sum) is a fresh 256 KB at the small benchmark size, written and
    read once, for every one of the segment's tokens. This forward allocates only M' (the same
    ops as the plain form, in place, so bit-identical values); the backward folds the
    norm's and the read scores' gradients into one buffer (addcmul + baddbmm) and takes
    the erase/add gradients from it and one product G * M, two fresh buffers in all.
    Gradients equal the plain form's to rounding (tests/test_dnc.py, fp64 gradcheck too).
    """

    @staticmethod
    def forward(ctx, memory, write, erase, value, read_keys):
        w = write.unsqueeze(-1)
        new = w * erase.unsqueeze(1)
        new.neg_().add_(1.0).mul_(memory).addcmul_(w, value.unsqueeze(1))  # M(1 - w e^T) + w v^T
        norm = new.norm(dim=-1)
        inv_norm = norm.clamp_min(COS_EPS).reciprocal()
        raw = torch.bmm(read_keys, new.transpose(1, 2))
        scores = raw * inv_norm.unsqueeze(1)
        ctx.save_for_backward(memory, write, erase, value, read_keys, new, norm, inv_norm, raw)
        return new, inv_norm, scores

    @staticmethod
    @once_differentiable
    def backward(ctx, g_new, g_inv, g_scores):
        memory, write, erase, value, read_keys, new, norm, inv_norm, raw = ctx.saved_tensors
        g_raw = g_scores * inv_norm.unsqueeze(1)  # [B, R, N]
        g_inv = g_inv + (g_scores * raw).sum(1)  # [B, N]
        # inv = 1 / max(|M'_i|, eps): d|M'_i| = -g inv^2 where |M'_i| >= eps; d M'_i = that M'_i / |M'_i|
        coef = torch.where(norm >= COS_EPS, -g_inv * inv_norm * inv_norm / norm,
                           torch.zeros_like(norm))
        g = torch.addcmul(g_new, coef.unsqueeze(-1), new)
        g.baddbmm_(g_raw.transpose(1, 2), read_keys)  # the whole gradient reaching M'
        g_memory = g_write = g_erase = g_value = g_keys = buf = None
        w_row = write.unsqueeze(1)  # [B, 1, N]
        if ctx.needs_input_grad[4]:
            g_keys = torch.bmm(g_raw, new)
        if ctx.needs_input_grad[3]:
            g_value = torch.bmm(w_row, g).squeeze(1)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            buf = g * memory
            g_erase = torch.bmm(w_row, buf).squeeze(1).neg_()
            g_write = torch.bmm(g, value.unsqueeze(-1)).squeeze(-1)
            g_write -= torch.bmm(buf, erase.unsqueeze(-1)).squeeze(-1)
        if ctx.needs_input_grad[0]:  # G (1 - w e^T) = G - (G e^T) w, in the buffers at hand
            ge = torch.mul(g, erase.unsqueeze(1), out=buf) if buf is not None else g * erase.unsqueeze(1)
            g_memory = g.sub_(ge.mul_(write.unsqueeze(-1)))
        return g_memory, g_write, g_erase, g_value, g_keys


def _default_step(memory, inv_norm, usage, prev_write, prev_read, link, precedence,
                  write_key, erase, value, free, alloc_gate, write_gate, read_keys, modes,
                  step_mask, links: bool, masked: bool, fused: bool = False):
    """One token of the memlm DNC. Keys arrive unit-norm and scaled by beta.

    The step, in words: docs/dnc.md#what-one-token-does-memlm-default.

    `inv_norm` [B, N] holds 1 / max(||M_i||, eps) of the current memory: cosine scores
    are M k scaled per row, so the B x N x W memory is normalised once per step (after
    its write) and the next step's write addressing reuses that norm. `fused` runs the
    memory-sized part through `_WriteAndAddress` (eager only: the compiled path fuses the
    plain ops itself).
    """
    psi = retention(free, prev_read)
    new_usage = update_usage(usage, prev_write, psi)
    alloc = allocation_weights(new_usage)
    scores = torch.bmm(memory, write_key.unsqueeze(-1)).squeeze(-1) * inv_norm
    content = torch.softmax(scores, dim=-1)
    address = content + alloc_gate * (alloc - content)  # g^a a + (1 - g^a) c^w
    write = write_gate * address  # write_gate already holds the pad mask
    memory, inv_norm, scores = (_WriteAndAddress.apply if fused else write_and_address)(
        memory, write, erase, value, read_keys)
    read = torch.softmax(scores, dim=-1)
    if links:
        link, precedence = update_links(link, precedence, write)
        forward = torch.bmm(prev_read, link.transpose(1, 2))
        backward = torch.bmm(prev_read, link)
        read = modes[..., 0:1] * backward + modes[..., 1:2] * read + modes[..., 2:3] * forward
    vectors = torch.bmm(read, memory)
    if masked:  # padding freezes the state (memory and links are already unchanged: write == 0)
        new_usage = torch.where(step_mask, new_usage, usage)
        write = torch.where(step_mask, write, prev_write)
        read = torch.where(step_mask.unsqueeze(-1), read, prev_read)
    return memory, inv_norm, new_usage, write, read, link, precedence, address, vectors


def _default_chunk(memory, inv_norm, usage, prev_write, prev_read, link, precedence,
                   write_key, erase, value, free, alloc_gate, write_gate, read_keys, modes,
                   step_mask, links: bool, masked: bool, keep_usage: bool, fused: bool = False):
    """`_default_step` over the k tokens of [B, k, ...] inputs, in order.

    What `compile_step` compiles: one compiled call per k tokens instead of per token
    cuts the per-call overhead of compiled code k-fold, and lets the compiler fuse the
    elementwise work of consecutive steps. The maths is the step's, unchanged.
    """
    k = write_key.shape[1]
    # unbind, not x[:, i]: the backward of one unbind is one stack, that of k selects k
    # full-size zero tensors (quadratic in k)
    steps = zip(*(x.unbind(1) if x is not None else [None] * k
                  for x in (write_key, erase, value, free, alloc_gate, write_gate, read_keys,
                            modes if links else None, step_mask if masked else None)))
    addrs, reads, vecs, usages = [], [], [], []
    for k_w, e, v, f, g_a, g_w, k_r, pi, m in steps:
        memory, inv_norm, usage, prev_write, prev_read, link, precedence, address, vec = (
            _default_step(memory, inv_norm, usage, prev_write, prev_read, link, precedence,
                          k_w, e, v, f, g_a, g_w, k_r, pi, m, links, masked, fused))
        addrs.append(address)
        reads.append(prev_read)
        vecs.append(vec)
        if keep_usage:
            usages.append(usage)
    return (memory, inv_norm, usage, prev_write, prev_read, link, precedence,
            torch.stack(addrs, 1), torch.stack(reads, 1), torch.stack(vecs, 1),
            torch.stack(usages, 1) if keep_usage else None)


def _faithful_step(memory, usage, beta, key, erase, value, gate, read_keys):
    """One token of the reference memory (`faithful`, docs/dnc.md), kept to document its flaws.

    From the zero state every operation here is equivariant under slot permutations,
    so the write address stays exactly uniform and all rows stay identical.
    """
    unit = F.normalize(memory, dim=-1, eps=1e-12)
    content = torch.softmax(beta * torch.bmm(unit, key.unsqueeze(-1)).squeeze(-1), dim=-1)
    alloc = torch.softmax(beta * (1.0 - usage), dim=-1)
    address = 0.5 * content + 0.5 * alloc
    read = torch.softmax(beta * torch.bmm(read_keys, unit.transpose(1, 2)), dim=-1)  # pre-write
    memory = write_memory(memory, gate * address, erase, value)
    usage = usage + (1.0 - usage) * address.detach()
    return memory, usage, address, read, torch.bmm(read, memory)  # old weights, new memory


class DNCMemory(nn.Module):
    """The external memory: interface projection, the per-token recurrence, read projection."""

    def __init__(self, d_model: int, slots: int = 64, width: int = 128, reads: int = 4,
                 temporal_links: bool = False, faithful: bool = False,
                 interface_std: float | None = None, mem_init_std: float = 0.5,
                 compile_step: bool = False, compile_chunk: int = 8):
        super().__init__()
        self.slots, self.width, self.reads = slots, width, reads
        self.temporal_links = temporal_links and not faithful
        self.faithful = faithful
        n, w, r = slots, width, reads
        if faithful:
            # W_k, W_v, W_e (d -> W), W_g (d -> 1), W_r (d -> R W) fused into one matmul
            self.sizes = (w, w, w, 1, r * w)
            self.beta = nn.Parameter(torch.tensor(2.0))
        else:
            # k^w, beta^w, e, v, f, g^a, g^w, k^r, beta^r (+ read modes)
            self.sizes = (w, 1, w, w, r, 1, 1, r * w, r) + ((3 * r,) if self.temporal_links else ())
            self.mem_init = nn.Parameter(torch.empty(n, w))
            # the initial memory is content, not a weight matrix: decaying it would pull
            # every slot toward zero, i.e. back toward the symmetric start
            self.mem_init.no_weight_decay = True
        self.interface = nn.Linear(d_model, sum(self.sizes))
        self.read_proj = nn.Linear(r * w, d_model)
        if not faithful:
            nn.init.normal_(self.interface.weight, std=interface_std or d_model**-0.5)
            nn.init.zeros_(self.interface.bias)
            nn.init.normal_(self.mem_init, std=mem_init_std)
            # zero read projection: at init the model is exactly its backbone
            nn.init.zeros_(self.read_proj.weight)
            nn.init.zeros_(self.read_proj.bias)
        self.compile_step = compile_step
        self.compile_chunk = compile_chunk  # tokens per compiled call (`_default_chunk`)
        self._compiled = None

    # ----- state -------------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> DNCState:
        """A fresh stream: M = M_init (zeros when faithful), everything else zero."""
        device = device if device is not None else self.interface.weight.device
        n, r = self.slots, self.reads
        if self.faithful:
            memory = torch.zeros(batch_size, n, self.width, device=device)
        else:
            memory = self.mem_init.float().to(device).unsqueeze(0).expand(batch_size, -1, -1)
        nl = n if self.temporal_links else 0
        return DNCState(
            memory=memory,
            usage=torch.zeros(batch_size, n, device=device),
            write_weights=torch.zeros(batch_size, n, device=device),
            read_weights=torch.zeros(batch_size, r, n, device=device),
            link=torch.zeros(batch_size, nl, nl, device=device),
            precedence=torch.zeros(batch_size, nl, device=device),
        )

    def check_state(self, state: DNCState, batch_size: int) -> None:
        from memlm.errors import ConfigError

        want = (batch_size, self.slots, self.width)
        if not isinstance(state, DNCState) or tuple(state.memory.shape) != want:
            got = tuple(state.memory.shape) if isinstance(state, DNCState) else type(state).__name__
            raise ConfigError(
                f"DNC state has memory shape {got} but this batch needs {want} "
                f"(batch, mem_slots, mem_width); start a stream with "
                f"model.init_state({batch_size}) or pass state=None."
            )

    # ----- forward -----------------------------------------------------------------------
    def forward(self, h: torch.Tensor, state: DNCState, attention_mask: torch.Tensor | None = None,
                keep_usage: bool = False) -> MemoryResult:
        """Run the memory over a segment of controller states h [B, T, d].

        `attention_mask` [B, T] (True = real token) freezes the state at padding: no write, no
        usage change. `keep_usage` stacks the per-step usage for inspection.
        """
        with torch.autocast(device_type=h.device.type, enabled=False):
            xi = self.interface(h.float())
            if self.faithful:
                reads, new_state, stats = self._run_faithful(xi, state, keep_usage)
            else:
                reads, new_state, stats = self._run_default(xi, state, attention_mask, keep_usage)
            out = self.read_proj(reads)
        return MemoryResult(out, reads, new_state, *stats)

    def _chunk_fn(self):
        if self._compiled is None:
            self._compiled = torch.compile(_default_chunk, dynamic=False)
        return self._compiled

    def _run_default(self, xi, state: DNCState, attention_mask, keep_usage):
        b, t, _ = xi.shape
        r, w = self.reads, self.width
        parts = xi.split(self.sizes, dim=-1)
        kw, bw, erase, value, free, ga, gw, kr, br = parts[:9]
        # everything that does not depend on the memory, for the whole segment at once
        write_key = unit_rows(kw) * oneplus(bw)
        read_keys = unit_rows(kr.view(b, t, r, w)) * oneplus(br).unsqueeze(-1)
        erase, free, ga, gw = erase.sigmoid(), free.sigmoid(), ga.sigmoid(), gw.sigmoid()
        masked = attention_mask is not None
        mask = attention_mask.to(torch.bool) if masked else None
        gate = gw * mask.unsqueeze(-1) if masked else gw
        modes = parts[9].view(b, t, r, 3).softmax(-1) if self.temporal_links else None
        inputs = (write_key, erase, value, free, ga, gate, read_keys, modes,
                  mask.unsqueeze(-1) if masked else None)
        memory, usage, write, read, link, prec = (x.float() for x in state)
        inv_norm = memory.norm(dim=-1).clamp_min(COS_EPS).reciprocal()
        carry = (memory, inv_norm, usage, write, read, link, prec)
        if self.compile_step:  # one compiled call per `compile_chunk` tokens
            run, size = self._chunk_fn(), self.compile_chunk
        else:  # eager: one Python loop over the segment
            run, size = _default_chunk, t
        addrs, rws, vecs, usages = [], [], [], []
        n_chunks = -(-t // size)
        # split, not x[:, a:a + size]: one backward cat instead of a full-size zero tensor
        # per chunk
        chunks = zip(*(x.split(size, 1) if x is not None else [None] * n_chunks
                       for x in inputs))
        for chunk in chunks:
            *carry, address, rw, vec, use = run(*carry, *chunk, self.temporal_links, masked,
                                                keep_usage, not self.compile_step)
            addrs.append(address)
            rws.append(rw)
            vecs.append(vec)
            usages.append(use)
        memory, _, usage, write, read, link, prec = carry
        new_state = DNCState(memory, usage, write, read, link, prec)

        def cat(parts):
            return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

        reads = cat(vecs).reshape(b, t, r * w)
        stats = (gw.squeeze(-1), ga.squeeze(-1), free.mean(-1), cat(addrs), cat(rws),
                 cat(usages) if keep_usage else None)
        return reads, new_state, stats

    def _run_faithful(self, xi, state: DNCState, keep_usage):
        b, t, _ = xi.shape
        r, w = self.reads, self.width
        k, value, erase, gate, kr = xi.split(self.sizes, dim=-1)
        key = F.normalize(k, dim=-1, eps=1e-12)
        read_keys = F.normalize(kr.view(b, t, r, w), dim=-1, eps=1e-12)
        erase, gate = erase.sigmoid(), gate.sigmoid()
        beta = self.beta.float()
        memory, usage = state.memory.float(), state.usage.float()
        vecs, addrs, rws, usages = [], [], [], []
        read = state.read_weights
        address = state.write_weights
        for kt, et, vt, gt, krt in zip(key.unbind(1), erase.unbind(1), value.unbind(1),
                                       gate.unbind(1), read_keys.unbind(1)):
            memory, usage, address, read, vec = _faithful_step(memory, usage, beta, kt, et, vt,
                                                               gt, krt)
            vecs.append(vec)
            addrs.append(address)
            rws.append(read)
            if keep_usage:
                usages.append(usage)
        new_state = DNCState(memory, usage, gate[:, -1] * address, read, state.link,
                             state.precedence)
        reads = torch.stack(vecs, 1).reshape(b, t, r * w)
        half = torch.full_like(gate.squeeze(-1), 0.5)  # the fixed 50/50 allocation mix
        stats = (gate.squeeze(-1), half, torch.zeros_like(half), torch.stack(addrs, 1),
                 torch.stack(rws, 1), torch.stack(usages, 1) if keep_usage else None)
        return reads, new_state, stats


def slot_similarity(memory: torch.Tensor) -> torch.Tensor:
    """mean_{i != j} cos(M_i, M_j) per row [B]; 1.0 is the collapsed all-rows-equal memory."""
    unit = unit_rows(memory)
    n = memory.shape[1]
    cos = torch.bmm(unit, unit.transpose(1, 2))
    off = cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(-1)
    return off / max(n * (n - 1), 1)


def normalised_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) / ln N, in [0, 1] (0 = one-hot, 1 = uniform)."""
    return entropy(p) / math.log(p.shape[-1])
