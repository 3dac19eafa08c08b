"""ARMT's associative memory: per-layer linear-attention fast weights with a delta-rule write.

Every wrapped layer owns an associative matrix A [d_key x d] and a normaliser z [d_key]
(per memory head). Before the layer runs, every position *reads* from (A, z) and adds the
result to its hidden state; after the layer runs, its outputs at the segment's memory-token
positions are *written* into (A, z). The equations (in words:
docs/recurrent.md#armt-read-and-write) are, per layer:

    read   Q = phi(H W_Q^T);  O = (Q A) / (Q z + eps);  H' = H + O
    write  K = phi(M W_K^T);  V = M W_V^T;  beta = sigmoid(M w_b + b_b)
           s = K z;  Vbar = (K A) / (s + eps)          what the memory already returns for K
           gamma = stopgrad(clamp(1 - (s + eps) / (|K|^2 + eps), 0, 1))  share of K new to z
           A <- A + sum_i beta_i K_i (x) (V_i - Vbar_i)  (delta rule: store only the error)
           z <- z + sum_i gamma_i K_i
    bound  if sum(z) > capacity * sum_i sum(K_i):  (A, z) <- (A, z) * that ratio's inverse

phi is the DPFP feature map (Schlag et al. 2021) divided by its L2 norm, as in the later
versions of the ARMT code; key_norm="none" keeps the paper's July 2024 code (no
normalisation), which blew up in memlm's BABILong recipe (docs/recurrent.md). The gamma
formula, epsilon placement included, is the paper code's. W_V starts at zero, so
A stays exactly zero and a freshly wrapped model is exactly its backbone.

The bound keeps the memory finite over any number of segments. A joint rescale of A and
z leaves every read (Q A) / (Q z + eps) and every delta-rule target unchanged (up to eps),
so nothing stored is distorted; it only makes the next writes weigh more than the old
ones, so old content fades instead of the normaliser growing without end (z only ever
grows: gamma >= 0). `capacity` is counted in segments' worth of key mass, so it means the
same with or without key normalisation; docs/recurrent.md has the measurement.

Why the state never lives on a module: the reference keeps A and z as module attributes,
which breaks under concurrent use, needs manual resets and silently broadcasts batch-1
state. Here the model opens a call-scoped `MemoryCall` around each backbone call (a
`contextvars` variable, so it is thread-safe); the layer wrappers read the incoming state
from it and deposit the outgoing state in it. A wrapper called outside such a call raises.
The state is always float32 (bf16 would round away small increments of z over long
streams); reads and writes run in float32 with autocast disabled.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from memlm.errors import ConfigError, MemlmError

#: epsilon of the read and write denominators
DENOM_EPS = 1e-5
#: layer-list attribute paths tried, in order, when `layers_attr` is not given
LAYER_PATHS = ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers",
               "decoder.blocks")


class MemoryContextError(MemlmError, RuntimeError):
    """An associative layer ran outside the model call that owns its state."""


class LayerMemory(NamedTuple):
    """One layer's associative state, float32.

    A: [B, H, d_key/H, d/H]; z: [B, H, d_key/H]. With one memory head (the default) these
    are B x d_key x d and B x d_key with a singleton head axis.
    """

    A: torch.Tensor
    z: torch.Tensor


def dpfp(x: torch.Tensor, order: int) -> torch.Tensor:
    """Deterministic parameter-free projection: [..., p] -> [..., 2 p order], non-negative.

    u = [relu(x); relu(-x)], then the products of u with its circular shifts by 1..order
    positions (toward higher indices) are concatenated. Built without a roll per shift:
    u is laid out once with its last `order` entries in front (w), so the shift by j is
    the view w[order - j : order - j + 2p]; the shifts are stacked and multiplied by u in
    one broadcast product (six kernels whatever the order, against 2 order + 5).
    """
    p2 = 2 * x.shape[-1]
    pos, neg = F.relu(x), F.relu(-x)
    if order > p2:  # shifts wrap more than once: the plain form
        u = torch.cat([pos, neg], dim=-1)
        return torch.cat([u * torch.roll(u, shifts=j, dims=-1) for j in range(1, order + 1)],
                         dim=-1)
    w = torch.cat([neg[..., p2 // 2 - order:], pos, neg], dim=-1) if order <= p2 // 2 else \
        torch.cat([pos[..., p2 - order:], neg, pos, neg], dim=-1)
    u = w[..., order:]  # [..., p2]: w[i + order] = u[i]; w[i] = u[i - order mod p2]
    shifted = torch.stack([w[..., order - j: order - j + p2] for j in range(1, order + 1)], -2)
    return (u.unsqueeze(-2) * shifted).flatten(-2)


def cap_read(read: torch.Tensor, hidden: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Scale each position's read down to at most `cap` times its hidden state's norm.

    Why: far beyond the training length the read of a trained ARMT keeps growing relative
    to the residual stream (2.3x by segment 500 where training saw ~0.5), a state the
    layers never saw; a cap above the training range leaves training untouched and keeps
    long reads inside it. None: no cap (the paper's read).
    """
    if cap is None:
        return read
    r = torch.linalg.vector_norm(read, dim=-1, keepdim=True)
    h = torch.linalg.vector_norm(hidden.float(), dim=-1, keepdim=True)
    return read * (cap * h / r.clamp_min(1e-12)).clamp(max=1.0)


def feature_map(x: torch.Tensor, order: int, key_norm: str) -> torch.Tensor:
    """phi-hat: DPFP features, divided by their L2 norm when `key_norm == "l2"`."""
    phi = dpfp(x, order)
    if key_norm == "l2":
        phi = phi / phi.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return phi


def read_ratio(f: torch.Tensor, A: torch.Tensor, z: torch.Tensor, l2: bool) -> torch.Tensor:
    """(f A) / (f z + eps |f|) in plain autograd ops (eps alone when not `l2`): the reference
    for `_ReadRatio`. f [B, H, n, dk], A [B, H, dk, dv], z [B, H, dk] -> [B, H, n, dv]."""
    num = torch.matmul(f, A)
    s = torch.matmul(f, z.unsqueeze(-1))
    if l2:
        return num / torch.add(s, f.norm(dim=-1, keepdim=True).clamp_min(1e-12), alpha=DENOM_EPS)
    return num / (s + DENOM_EPS)


class _ReadRatio(torch.autograd.Function):
    """`read_ratio` with a hand-written backward: the read's backward was ~3.5x its forward.

    Autograd's backward of the plain form takes the features' gradient from three branches
    (the numerator's matmul, the denominator's matvec, the norm), each a fresh [n, d_key]
    tensor summed afterwards. Here the gradient of f is one buffer: dO/den times A^T, then the
    denominator's rank-1 term and the norm's term added in place (docs/speed.md, round 5:
    about 2% of ARMT's training step at `small`). Values are the plain form's ops (bit-identical); gradients
    equal to fp32 rounding (tests/test_memspeed.py, and an fp64 gradcheck).
    """

    @staticmethod
    def forward(ctx, f, A, z, l2: bool):
        num = torch.matmul(f, A)  # [B, H, n, dv]
        s = torch.matmul(f, z.unsqueeze(-1))  # [B, H, n, 1]
        raw = f.norm(dim=-1, keepdim=True) if l2 else None
        den = torch.add(s, raw.clamp_min(1e-12), alpha=DENOM_EPS) if l2 else s + DENOM_EPS
        out = num.div_(den)
        ctx.save_for_backward(f, A, z, den, out, raw)
        ctx.l2 = l2
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        f, A, z, den, out, raw = ctx.saved_tensors
        g_num = g / den  # [B, H, n, dv]
        g_den = (g_num * out).sum(-1, keepdim=True).neg_()  # d out / d den = -out / den
        g_f = g_A = g_z = None
        if ctx.needs_input_grad[0]:
            g_f = torch.matmul(g_num, A.transpose(-1, -2))  # [B, H, n, dk]
            g_f.add_(g_den * z.unsqueeze(-2))  # the denominator's f z
            if ctx.l2:  # and its eps |f| (clamp_min passes the gradient where |f| >= 1e-12)
                coef = torch.where(raw >= 1e-12, g_den * DENOM_EPS / raw, torch.zeros_like(raw))
                g_f.addcmul_(f, coef)
        if ctx.needs_input_grad[1]:
            g_A = torch.matmul(f.transpose(-1, -2), g_num)
        if ctx.needs_input_grad[2]:
            g_z = torch.matmul(f.transpose(-1, -2), g_den).squeeze(-1)
        return g_f, g_A, g_z, None


class AssociativeMemory(nn.Module):
    """The parameters and the read/write maths of one layer's associative memory.

    The module holds parameters only; `read` and `write` take and return the state.
    """

    def __init__(
        self,
        d_model: int,
        d_mem: int = 64,
        order: int = 3,
        heads: int = 1,
        use_denom: bool = True,
        correction: bool = True,
        key_norm: Literal["l2", "none"] = "l2",
        capacity: float | None = None,
        first_write_whole: bool = False,
        write_gate_bias: float | None = None,
        read_cap: float | None = None,
    ):
        super().__init__()
        if d_mem % heads or d_model % heads:
            raise ConfigError(
                f"mem_heads={heads} must divide both d_mem={d_mem} and d_model={d_model}; "
                "use mem_heads: 1 or a common divisor."
            )
        if key_norm not in ("l2", "none"):
            raise ConfigError(f"key_norm must be 'l2' or 'none', got {key_norm!r}.")
        self.d_model, self.d_mem, self.order, self.heads = d_model, d_mem, order, heads
        if capacity is not None and capacity <= 0:
            raise ConfigError(f"mem_capacity must be positive or null, got {capacity}.")
        self.use_denom, self.correction, self.key_norm = use_denom, correction, key_norm
        self.capacity = capacity
        self.first_write_whole = first_write_whole
        if read_cap is not None and read_cap <= 0:
            raise ConfigError(f"read_cap must be positive or null, got {read_cap}.")
        self.read_cap = read_cap
        self.d_key_head = 2 * order * (d_mem // heads)
        self.d_val_head = d_model // heads
        self.w_q = nn.Linear(d_model, d_mem, bias=False)
        self.w_k = nn.Linear(d_model, d_mem, bias=False)
        self.w_v = nn.Linear(d_model, d_model, bias=False)
        self.w_beta = nn.Linear(d_model, heads, bias=True)
        nn.init.zeros_(self.w_v.weight)  # exact identity at init: nothing is ever stored
        if write_gate_bias is not None:  # beta starts at sigmoid(bias) instead of ~0.5
            nn.init.constant_(self.w_beta.bias, write_gate_bias)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> LayerMemory:
        h, dk, dv = self.heads, self.d_key_head, self.d_val_head
        return LayerMemory(torch.zeros(batch_size, h, dk, dv, device=device, dtype=dtype),
                           torch.zeros(batch_size, h, dk, device=device, dtype=dtype))

    def _features(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """[B, n, d] -> [B, n, H, d_key/H]: project, split heads, then phi-hat per head."""
        b, n, _ = x.shape
        q = F.linear(x, proj.weight.float()).view(b, n, self.heads, self.d_mem // self.heads)
        return feature_map(q, self.order, self.key_norm)

    def _lookup(self, keys: torch.Tensor, mem: LayerMemory) -> tuple[torch.Tensor, torch.Tensor]:
        """What the memory returns for feature vectors [B, n, H, dk], and their s = k.z."""
        num = torch.einsum("bnhk,bhkv->bnhv", keys, mem.A.float())
        if not self.use_denom:
            return num, torch.zeros(keys.shape[:-1], device=keys.device)
        s = torch.einsum("bnhk,bhk->bnh", keys, mem.z.float())
        return num / (s + DENOM_EPS).unsqueeze(-1), s

    def read(self, hidden: torch.Tensor, mem: LayerMemory) -> torch.Tensor:
        """R1-R2: O = (Q A) / (Q z + eps) for every position, float32 [B, n, d].

        Computed without normalising the features first: with f the raw DPFP features and
        phi = f / |f|, (phi A) / (phi z + eps) = (f A) / (f z + eps |f|). Same maths as
        `_lookup(feature_map(..))` (tests/test_memspeed.py checks values and gradients), with
        fewer kernels over the [B, n, d_key] features, which is where ARMT spends its read.
        """
        with torch.autocast(hidden.device.type, enabled=False):
            b, n, _ = hidden.shape
            h = self.heads
            q = F.linear(hidden.float(), self.w_q.weight.float()).view(b, n, h, -1)
            f = dpfp(q, self.order).transpose(1, 2)  # [B, H, n, dk]
            if self.use_denom:
                out = _ReadRatio.apply(f, mem.A.float(), mem.z.float(), self.key_norm == "l2")
            else:
                out = torch.matmul(f, mem.A.float())
                if self.key_norm == "l2":
                    out = out / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return cap_read(out.transpose(1, 2).reshape(b, n, self.d_model), hidden,
                            self.read_cap)

    def write(
        self, mem_hidden: torch.Tensor, mem: LayerMemory, row_mask: torch.Tensor | None = None
    ) -> tuple[LayerMemory, dict[str, torch.Tensor]]:
        """W2-W7: the m memory-token outputs [B, m, d] update (A, z) in parallel.

        Every memory token writes against the state as it was at the start of the segment.
        Rows where `row_mask` [B] is False (no real token in this segment) keep their state
        bit-identical. Returns the new state and detached diagnostics.
        """
        with torch.autocast(mem_hidden.device.type, enabled=False):
            x = mem_hidden.float()
            b, m, _ = x.shape
            r = (torch.ones(b, device=x.device) if row_mask is None
                 else row_mask.to(device=x.device, dtype=torch.float32))
            k = self._features(x, self.w_k)  # [B, m, H, dk]
            v = F.linear(x, self.w_v.weight.float()).view(b, m, self.heads, self.d_val_head)
            beta = torch.sigmoid(F.linear(x, self.w_beta.weight.float(), self.w_beta.bias.float()))
            beta = beta * r[:, None, None]  # [B, m, H]
            v_old, s = self._lookup(k, mem)
            A = mem.A.float() + torch.einsum("bmhk,bmhv->bhkv", beta.unsqueeze(-1) * k, v - v_old)
            if self.use_denom:
                if self.correction:  # the paper code's form, epsilon in both places
                    k_sq = (k * k).sum(-1)
                    gamma = (1.0 - (s + DENOM_EPS) / (k_sq + DENOM_EPS)).clamp(0.0, 1.0).detach()
                    if self.first_write_whole:  # the paper code: an empty z takes keys whole
                        empty = (mem.z.float() == 0).all(-1)  # [B, H]
                        gamma = torch.where(empty[:, None, :], torch.ones_like(gamma), gamma)
                else:
                    gamma = torch.ones_like(s)
                gamma = gamma * r[:, None, None]
                z = mem.z.float() + torch.einsum("bmh,bmhk->bhk", gamma, k)
            else:
                gamma = torch.zeros_like(s)
                z = mem.z.float()
            if self.capacity is not None and self.use_denom:
                # joint rescale of (A, z) per row and head once z's mass exceeds `capacity`
                # segments' worth of this write's key mass (reads are invariant to it)
                limit = self.capacity * k.sum(dim=(1, 3))  # [B, H]: this write's key mass
                scale = (limit / z.sum(-1).clamp_min(1e-30)).clamp(max=1.0).detach()
                A = A * scale[..., None, None]
                z = z * scale[..., None]
            if row_mask is not None:  # padding-only rows: bit-identical state
                keep = row_mask.to(torch.bool)
                A = torch.where(keep[:, None, None, None], A, mem.A.float())
                z = torch.where(keep[:, None, None], z, mem.z.float())
            stats = {"beta_mean": beta.detach().mean(), "gamma_mean": gamma.detach().mean()}
        return LayerMemory(A.to(mem.A.dtype), z.to(mem.z.dtype)), stats


# ----- call-scoped state passing -------------------------------------------------------------


@dataclass
class MemoryCall:
    """Everything one backbone call needs to run its associative layers.

    `state_in` is read-only; each layer deposits its new state in `state_out`. `mem_start`
    is the index of the first memory token (the segment length); with `write=False`
    (generation inside an open segment) no memory tokens are present and nothing is written.
    """

    group: int
    state_in: tuple[LayerMemory, ...]
    write: bool
    mem_start: int
    row_mask: torch.Tensor | None = None
    diagnostics: bool = True
    #: True: layers only hand their memory-token outputs over (`pending`) and the owner
    #: writes every layer at once after the backbone call (`write_layers`)
    defer_write: bool = False
    state_out: list[LayerMemory | None] = field(default_factory=list)
    stats: list[dict[str, torch.Tensor]] = field(default_factory=list)
    read_norms: list[torch.Tensor | None] = field(default_factory=list)
    pending: list[torch.Tensor | None] = field(default_factory=list)
    #: per layer: its incoming state is all zeros and needs no gradient (`empty_states`),
    #: so its read is exactly zero and is skipped
    empty: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.state_in)
        self.state_out = [None] * n
        self.pending = [None] * n
        if len(self.empty) != n:
            self.empty = [False] * n
        self.stats = [{} for _ in range(n)]
        self.read_norms = [None] * n


def empty_states(states: tuple[LayerMemory, ...]) -> list[bool]:
    """Which states are all zeros (a fresh stream) and need no gradient; one host sync."""
    free = [not (s.A.requires_grad or s.z.requires_grad) for s in states]
    if not any(free):
        return free
    nonzero = torch.stack([torch.count_nonzero(s.A) + torch.count_nonzero(s.z)
                           for s in states]).tolist()
    return [f and c == 0 for f, c in zip(free, nonzero)]


_ACTIVE: ContextVar[MemoryCall | None] = ContextVar("memlm_associative_call", default=None)
_GROUPS = itertools.count()


@contextlib.contextmanager
def memory_call(call: MemoryCall) -> Iterator[MemoryCall]:
    """Make `call` the active memory call for the duration of one backbone forward."""
    token = _ACTIVE.set(call)
    try:
        yield call
    finally:
        _ACTIVE.reset(token)


def active_call(group: int) -> MemoryCall:
    call = _ACTIVE.get()
    if call is None or call.group != group:
        raise MemoryContextError(
            "an ARMT-wrapped layer was called outside its model's forward (no active memory "
            "call). Run the wrapped model (ARMT.forward / forward_segment), not the backbone "
            "or one of its layers directly."
        )
    return call


class AssociativeLayer(nn.Module):
    """Wraps one backbone layer: read -> the original layer, untouched -> write.

    The wrapper passes every positional and keyword argument through to the layer and
    returns the layer's own result object unchanged (tuple or tensor), so it works for
    memlm blocks and Hugging Face decoder layers alike.
    """

    def __init__(self, layer: nn.Module, memory: AssociativeMemory, index: int, group: int):
        super().__init__()
        self.layer = layer
        self.memory = memory
        self.index = index
        self.group = group

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        call = active_call(self.group)
        mem = call.state_in[self.index]
        if call.empty[self.index]:
            # an all-zero state returns exactly zero everywhere ((Q 0) / (Q 0 + eps)) and,
            # needing no gradient, gets none: skip the read. W_Q stays in the graph through
            # an exact zero, so its gradient is the zero the read would give it (AdamW treats
            # a zero gradient and a missing one differently)
            read = None
            inputs = hidden_states + (self.memory.w_q.weight.sum() * 0.0).to(hidden_states.dtype)
        else:
            read = self.memory.read(hidden_states, mem)
            inputs = hidden_states + read.to(hidden_states.dtype)
        if call.diagnostics:
            with torch.no_grad():
                if read is None:
                    norms = hidden_states.new_zeros(hidden_states.shape[:-1], dtype=torch.float32)
                else:
                    norms = torch.linalg.vector_norm(read, dim=-1)  # [B, n]
                h_norms = torch.linalg.vector_norm(hidden_states, dim=-1, dtype=torch.float32)
                share = norms / h_norms.clamp_min(1e-12)
                call.stats[self.index]["read_share"] = share.mean()
                call.read_norms[self.index] = norms
        result = self.layer(inputs, *args, **kwargs)
        if call.write and call.defer_write:
            out = result[0] if isinstance(result, tuple) else result
            call.pending[self.index] = out[:, call.mem_start:]
        elif call.write:
            out = result[0] if isinstance(result, tuple) else result
            new, stats = self.memory.write(out[:, call.mem_start:], mem, call.row_mask)
            call.stats[self.index].update(stats)
            call.state_out[self.index] = new
        else:
            call.state_out[self.index] = mem
        return result

    def __getattr__(self, name: str) -> Any:
        # HF model loops sometimes read attributes of their layers (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("layer", "memory") or "layer" not in self._modules:
                raise
            return getattr(self._modules["layer"], name)


def can_write_together(memories: list[AssociativeMemory]) -> bool:
    """Whether `write_layers` applies: same settings, and parameters on one device."""
    first = memories[0]
    keys = ("d_model", "d_mem", "order", "heads", "use_denom", "correction", "key_norm",
            "capacity", "first_write_whole", "read_cap")
    device = first.w_k.weight.device
    return all(all(getattr(m, k) == getattr(first, k) for k in keys)
               and m.w_k.weight.device == device for m in memories)


def read_stacked(first: AssociativeMemory, w_q: torch.Tensor, hidden: torch.Tensor,
                 A: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """`AssociativeMemory.read` for P memories at once: hidden [P, B, n, d], w_q [P, d_mem, d],
    (A, z) [P, B, H, ...] -> float32 [P, B, n, d]. Same maths, one set of kernels."""
    n_l, b, n, d = hidden.shape
    h, dv = first.heads, first.d_val_head
    q = torch.bmm(hidden.reshape(n_l, b * n, d).float(), w_q.float().transpose(1, 2))
    f = dpfp(q.view(n_l, b, n, h, -1), first.order).transpose(2, 3)  # [P, B, H, n, dk]
    norm = f.norm(dim=-1, keepdim=True).clamp_min(1e-12) if first.key_norm == "l2" else None
    if first.use_denom:
        num, s = torch.matmul(f, torch.cat([A.float(), z.float().unsqueeze(-1)], -1)).split(
            (dv, 1), dim=-1)
        out = num / (s + DENOM_EPS if norm is None else torch.add(s, norm, alpha=DENOM_EPS))
    else:
        out = torch.matmul(f, A.float())
        if norm is not None:
            out = out / norm
    return cap_read(out.transpose(2, 3).reshape(n_l, b, n, d), hidden, first.read_cap)


def stack_write_weights(memories: list[AssociativeMemory]) -> tuple[torch.Tensor, ...]:
    """(W_K, W_V, w_b, b_b) of every memory stacked along a leading layer axis, float32."""
    return tuple(torch.stack([getattr(mem, name).weight if kind == "w" else mem.w_beta.bias
                              for mem in memories]).float()
                 for name, kind in (("w_k", "w"), ("w_v", "w"), ("w_beta", "w"), ("w_beta", "b")))


def write_stacked(
    first: AssociativeMemory, weights: tuple[torch.Tensor, ...], x: torch.Tensor,
    A0: torch.Tensor, z0: torch.Tensor, row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W2-W7 for P independent memories at once (same settings as `first`).

    x [P, B, m, d] are each memory's memory-token outputs, (A0, z0) [P, B, H, ...] their
    incoming states and `weights` their stacked write weights (`stack_write_weights`).
    Returns the new (A, z) and the per-memory means of beta and gamma [P], exactly as
    `AssociativeMemory.write` computes them one memory at a time.
    """
    h, dv = first.heads, first.d_val_head
    w_k, w_v, w_b, b_b = weights
    n_l, b, m, d = x.shape
    flat = x.reshape(n_l, b * m, d)
    k = torch.bmm(flat, w_k.transpose(1, 2)).view(n_l, b, m, h, -1)
    k = feature_map(k, first.order, first.key_norm)  # [P, B, m, H, dk]
    v = torch.bmm(flat, w_v.transpose(1, 2)).view(n_l, b, m, h, dv)
    beta = torch.sigmoid(torch.baddbmm(b_b.unsqueeze(1), flat, w_b.transpose(1, 2)))
    beta = beta.view(n_l, b, m, h)
    if row_mask is not None:
        r = row_mask.to(device=x.device, dtype=torch.float32)
        beta = beta * r[None, :, None, None]
    num = torch.einsum("lbmhk,lbhkv->lbmhv", k, A0)
    if first.use_denom:
        s = torch.einsum("lbmhk,lbhk->lbmh", k, z0)
        v_old = num / (s + DENOM_EPS).unsqueeze(-1)
    else:
        s = torch.zeros(k.shape[:-1], device=k.device)
        v_old = num
    scale = None
    if first.use_denom:
        if first.correction:
            k_sq = (k * k).sum(-1)
            gamma = (1.0 - (s + DENOM_EPS) / (k_sq + DENOM_EPS)).clamp(0.0, 1.0).detach()
            if first.first_write_whole:
                empty = (z0 == 0).all(-1)  # [P, B, H]
                gamma = torch.where(empty[:, :, None, :], torch.ones_like(gamma), gamma)
        else:
            gamma = torch.ones_like(s)
        if row_mask is not None:
            gamma = gamma * r[None, :, None, None]
        z = z0 + torch.einsum("lbmh,lbmhk->lbhk", gamma, k)
        if first.capacity is not None:
            limit = first.capacity * k.sum(dim=(2, 4))  # [P, B, H]
            scale = (limit / z.sum(-1).clamp_min(1e-30)).clamp(max=1.0).detach()
            z = z * scale[..., None]
    else:
        gamma = torch.zeros_like(s)
        z = z0
    A = A0 + torch.einsum("lbmhk,lbmhv->lbhkv", beta.unsqueeze(-1) * k, v - v_old)
    if scale is not None:
        A = A * scale[..., None, None]
    if row_mask is not None:
        keep = row_mask.to(torch.bool)
        A = torch.where(keep[None, :, None, None, None], A, A0)
        z = torch.where(keep[None, :, None, None], z, z0)
    return A, z, beta.detach().mean(dim=(1, 2, 3)), gamma.detach().mean(dim=(1, 2, 3))


def write_layers(memories: list[AssociativeMemory], call: MemoryCall) -> None:
    """W2-W7 for every layer at once, from the outputs the layers left in `call.pending`.

    Every layer writes against its own incoming state and no layer reads what another
    writes within a segment, so the L writes are independent: stacking them along a
    layer axis (`write_stacked`) gives exactly `AssociativeMemory.write` per layer
    (tests/test_memspeed.py compares states, diagnostics and gradients) in one set of
    kernels instead of L. Fills `call.state_out` and the per-layer write statistics.
    """
    with torch.autocast(call.pending[0].device.type, enabled=False):
        x = torch.stack([p.float() for p in call.pending])  # [L, B, m, d]
        A0 = torch.stack([s.A.float() for s in call.state_in])  # [L, B, H, dk, dv]
        z0 = torch.stack([s.z.float() for s in call.state_in])  # [L, B, H, dk]
        A, z, beta_mean, gamma_mean = write_stacked(
            memories[0], stack_write_weights(memories), x, A0, z0, call.row_mask)
    for i, (a_i, z_i, old) in enumerate(zip(A.unbind(0), z.unbind(0), call.state_in)):
        call.state_out[i] = LayerMemory(a_i.to(old.A.dtype), z_i.to(old.z.dtype))
        call.stats[i].update(beta_mean=beta_mean[i], gamma_mean=gamma_mean[i])
        call.pending[i] = None


def resolve_attr(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def find_layers(model: nn.Module, layers_attr: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder layers and the attribute path it was found at."""
    paths = (layers_attr,) if layers_attr else LAYER_PATHS
    for path in paths:
        try:
            layers = resolve_attr(model, path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    tried = ", ".join(repr(p) for p in paths)
    raise ConfigError(
        f"cannot find the decoder layer list of {type(model).__name__}: tried {tried}. "
        "Pass layers_attr='path.to.layers' (a dotted attribute path to an nn.ModuleList)."
    )


def wrap_layers(
    layers: nn.ModuleList, make_memory: Any, group: int
) -> list[AssociativeMemory]:
    """Replace each element of `layers` in place by an `AssociativeLayer`; return the memories."""
    memories = []
    for i, layer in enumerate(layers):
        if isinstance(layer, AssociativeLayer):
            raise ConfigError(
                "these layers are already wrapped by ARMT; wrap the original model only once."
            )
        memory = make_memory()
        layers[i] = AssociativeLayer(layer, memory, i, group)
        memories.append(memory)
    return memories


def new_group() -> int:
    """A fresh id tying one model's layer wrappers to the calls that model opens."""
    return next(_GROUPS)
