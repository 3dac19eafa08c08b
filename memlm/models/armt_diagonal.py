"""Diagonal batching for reading a long stream with ARMT (inference only).

ARMT's layer l of segment s needs two things: the output of layer l - 1 on the same
segment, and layer l's memory after segment s - 1. So layer l of segment s can run
at the same time as layer l - 1 of segment s + 1: along the anti-diagonals of the
(segment, layer) grid, every cell depends only on cells of earlier diagonals. This
module walks those diagonals. Diagonal t holds the cells (l, s = t - l); their layers
are consecutive, so their weights are slices of the layers' weights stacked once per
read, and each diagonal is one batched pass: memory read, attention, MLP and memory
write of up to n_layer segments in a single set of kernels (batched matmuls over the
layer axis), instead of n_layer separate layer calls per segment.

The maths is the sequential reader's (tests/test_memspeed.py compares logits and final
state, 1e-5 in float32); only the order of the work changes. Diagonal batching follows
the ARMT authors' follow-up ("Diagonal Batching Unlocks Parallelism in Recurrent Memory
Transformers", Sivtsov et al. 2025); the implementation here is memlm's own.

Scope: memlm's own backbone (pre-LN `Block`s with `CausalSelfAttention` and the dense
`MLP`), eval mode, no padding mask. Segments shorter than `segment_len` (the last one
under left alignment) run through the ordinary segment step before or after the
pipelined run of full segments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memlm.errors import ConfigError
from memlm.memory.associative import (
    LayerMemory,
    read_stacked,
    stack_write_weights,
    write_stacked,
)
from memlm.models.backbones import MemlmBackbone
from memlm.models.base import ForwardContext
from memlm.models.decoder import Block
from memlm.models.streaming import segment_bounds
from memlm.nn.attention import CausalSelfAttention, causal_attention
from memlm.nn.mlp import MLP


def check_diagonal(model) -> None:
    """Raise a one-line ConfigError unless `model` can be read diagonally."""
    if not isinstance(model.backbone, MemlmBackbone):
        raise ConfigError("diagonal batching needs an ARMT on memlm's own backbone "
                          "(backbone: gpt); read this model with diagonal=False.")
    for layer in model.backbone.layers():
        block = layer.layer
        if (type(block) is not Block or type(block.attn) is not CausalSelfAttention
                or type(block.ffn) is not MLP):
            raise ConfigError("diagonal batching supports plain GPT blocks (attention + dense "
                              "MLP) only; read this model with diagonal=False.")
    if model.config.sliding_window:
        raise ConfigError("diagonal batching does not carry the sliding_window keys; read this "
                          "model with diagonal=False.")
    if model.training:
        raise ConfigError("diagonal batching is an inference reader; call model.eval() first.")


class _Stacked:
    """Every layer's weights stacked along a leading layer axis (sliced per diagonal)."""

    def __init__(self, model):
        layers = list(model.backbone.layers())
        blocks = [layer.layer for layer in layers]
        self.memories = [layer.memory for layer in layers]
        self.first = self.memories[0]

        def stack(get):
            return torch.stack([get(b) for b in blocks])

        def opt(get):  # a bias that may be absent (bias=False)
            return None if get(blocks[0]) is None else stack(get)

        self.ln1_w, self.ln1_b = stack(lambda b: b.ln1.weight), opt(lambda b: b.ln1.bias)
        self.ln2_w, self.ln2_b = stack(lambda b: b.ln2.weight), opt(lambda b: b.ln2.bias)
        self.qkv_w, self.qkv_b = stack(lambda b: b.attn.qkv.weight), opt(lambda b: b.attn.qkv.bias)
        self.proj_w = stack(lambda b: b.attn.proj.weight)
        self.proj_b = opt(lambda b: b.attn.proj.bias)
        self.fc_w, self.fc_b = stack(lambda b: b.ffn.fc.weight), opt(lambda b: b.ffn.fc.bias)
        self.out_w, self.out_b = stack(lambda b: b.ffn.proj.weight), opt(lambda b: b.ffn.proj.bias)
        self.w_q = torch.stack([mem.w_q.weight for mem in self.memories])
        self.write_weights = stack_write_weights(self.memories)
        self.eps = blocks[0].ln1.eps
        self.n_head = blocks[0].attn.n_head
        self.approximate = blocks[0].ffn.approximate


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Per-layer x W^T + b for x [P, R, d_in], W [P, d_out, d_in]."""
    wt = w.transpose(1, 2).to(x.dtype)
    if b is None:
        return torch.bmm(x, wt)
    return torch.baddbmm(b.to(x.dtype).unsqueeze(1), x, wt)


def _norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = F.layer_norm(x, x.shape[-1:], eps=eps) * w[:, None, :].to(x.dtype)
    return y if b is None else y + b[:, None, :].to(x.dtype)


def _cells(st: _Stacked, sl: slice, x: torch.Tensor, A: torch.Tensor, z: torch.Tensor,
           mem_start: int, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layers `sl` on their own segments x [P, B, n, d] with states (A, z) [P, B, ...]:
    read, block, write. Returns the layers' outputs and their new states."""
    p, b, n, d = x.shape
    x = x + read_stacked(st.first, st.w_q[sl], x, A, z).to(x.dtype)
    rows = x.reshape(p, b * n, d)
    h = _norm(rows, st.ln1_w[sl], None if st.ln1_b is None else st.ln1_b[sl], st.eps)
    qkv = _linear(h, st.qkv_w[sl], None if st.qkv_b is None else st.qkv_b[sl])
    hd = d // st.n_head
    q, k, v = qkv.view(p * b, n, 3, st.n_head, hd).permute(2, 0, 3, 1, 4)
    if rope is not None:
        q, k = rope(q, slice(0, n)), rope(k, slice(0, n))
    y = causal_attention(q, k, v)  # the segment step's kernel choice (bf16 on CPU: fp32 SDPA)
    y = y.transpose(1, 2).reshape(p, b * n, d)
    rows = rows + _linear(y, st.proj_w[sl], None if st.proj_b is None else st.proj_b[sl])
    h = _norm(rows, st.ln2_w[sl], None if st.ln2_b is None else st.ln2_b[sl], st.eps)
    h = F.gelu(_linear(h, st.fc_w[sl], None if st.fc_b is None else st.fc_b[sl]),
               approximate=st.approximate)
    rows = rows + _linear(h, st.out_w[sl], None if st.out_b is None else st.out_b[sl])
    out = rows.view(p, b, n, d)
    weights = tuple(w[sl] for w in st.write_weights)
    A_new, z_new, _, _ = write_stacked(st.first, weights, out[:, :, mem_start:].float(),
                                       A.float(), z.float())
    return out, A_new.to(A.dtype), z_new.to(z.dtype)


def _pipeline(model, st: _Stacked, segs: list[torch.Tensor], state) -> tuple[list, tuple]:
    """Full segments `segs` (each [B, L]) from `state`: their logits and the final state."""
    dec = model.backbone.decoder
    n_layer, n_seg = len(st.memories), len(segs)
    m = model.config.num_mem_tokens
    A = [s.A for s in state.layers]
    z = [s.z for s in state.layers]
    carry: dict[int, torch.Tensor] = {}  # layer l -> its input for segment (step - l)
    logits: list[torch.Tensor] = []
    for step in range(n_seg + n_layer - 1):
        lo, hi = max(0, step - n_seg + 1), min(step, n_layer - 1)
        xs = []
        for layer in range(lo, hi + 1):
            if layer == 0:
                ids = segs[step]
                emb = dec.wte(ids)
                mem = model.mem_tokens.to(emb.dtype).unsqueeze(0).expand(ids.shape[0], m, -1)
                xs.append(dec.add_positions(torch.cat([emb, mem], dim=1)))
            else:
                xs.append(carry.pop(layer))
        sl = slice(lo, hi + 1)
        out, A_new, z_new = _cells(st, sl, torch.stack(xs), torch.stack(A[sl]),
                                   torch.stack(z[sl]), xs[0].shape[1] - m, dec.rope)
        for i, layer in enumerate(range(lo, hi + 1)):
            A[layer], z[layer] = A_new[i], z_new[i]
            if layer == n_layer - 1:
                n = out.shape[2] - m
                logits.append(model.backbone.logits(dec.ln_f(out[i][:, :n])))
            else:
                carry[layer + 1] = out[i]
    return logits, tuple(LayerMemory(a, zz) for a, zz in zip(A, z))


@torch.no_grad()
def read_diagonal(model, ids: torch.Tensor, state=None):
    """Logits [B, T, V] and final state of `ids` [B, T] read with diagonal batching."""
    from memlm.models.armt import ARMTState

    check_diagonal(model)
    b, t = ids.shape
    if state is None:
        state = model.init_state(b, ids.device)
    st = _Stacked(model)
    length = model.segment_len
    bounds = segment_bounds(t, length, model.config.segment_alignment)
    parts: list[torch.Tensor] = []
    run: list[torch.Tensor] = []
    ctx = ForwardContext(False)

    def flush(state):
        if run:
            logits, layers = _pipeline(model, st, run, state)
            parts.extend(logits)
            run.clear()
            state = ARMTState(layers)
        return state

    for a, e in bounds:
        if e - a == length:
            run.append(ids[:, a:e])
            continue
        state = flush(state)
        logits, state = model._segment(ids[:, a:e], state, None, ctx, [])
        parts.append(logits)
    state = flush(state)
    logits = torch.cat(parts, dim=1)
    if model.config.output_only_last_segment:  # what forward returns
        logits = logits[:, bounds[-1][0]:]
    return logits, state
