"""Causal self-attention on `scaled_dot_product_attention`, RoPE, and a KV cache.

The cache is preallocated per layer ([B, H, T_max, Dh]) and filled in place, so
decoding one token costs one write and one attention over the filled prefix.
Positions come from the cache length, which keeps RoPE correct while decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021), applied to queries and keys.

    Channel pairs (0, 1), (2, 3), ... of each head are rotated by position-dependent
    angles. The rotation is done as one complex multiplication on a view of the
    pairs, not as four real products of strided halves: same result, faster on CPU
    (benchmarks/cpu_kernels.py times both). The tables stay real (cos, sin) so that
    `model.to(dtype)` never meets a complex buffer.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [T, Dh/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | slice) -> torch.Tensor:
        """x: [B, H, T, Dh]; positions index the precomputed table."""
        dtype = x.dtype
        real = torch.float64 if dtype == torch.float64 else torch.float32
        if torch.compiler.is_compiling():
            # inductor generates no code for complex tensors (it falls back to eager and
            # splits the graph); the same rotation on real pairs fuses into one kernel
            cos, sin = self.cos[positions].to(real), self.sin[positions].to(real)
            pairs = x.to(real).unflatten(-1, (-1, 2))
            even, odd = pairs[..., 0], pairs[..., 1]
            return torch.stack((even * cos - odd * sin, even * sin + odd * cos),
                               dim=-1).flatten(-2).to(dtype)
        rot = torch.complex(self.cos[positions].to(real), self.sin[positions].to(real))
        xr = x.to(real)
        if xr.stride(-1) != 1 or xr.storage_offset() % 2:
            xr = xr.contiguous()  # view_as_complex needs (re, im) pairs adjacent and aligned
        xc = torch.view_as_complex(xr.reshape(*xr.shape[:-1], -1, 2))
        return torch.view_as_real(xc * rot).flatten(-2).to(dtype)


class LayerKVCache:
    """Keys and values of one attention layer, filled left to right."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        end = self.length + t
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} > capacity {self.capacity}")
        self.k[:, :, self.length : end] = k.to(self.k.dtype)
        self.v[:, :, self.length : end] = v.to(self.v.dtype)
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One `LayerKVCache` per layer plus the number of tokens already seen."""

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (batch_size, n_head, max_len, head_dim)
        self.layers = [
            LayerKVCache(torch.zeros(shape, device=device, dtype=dtype),
                         torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(n_layer)
        ]
        self.max_len = max_len

    @property
    def length(self) -> int:
        return self.layers[0].length

    def __getitem__(self, i: int) -> LayerKVCache:
        return self.layers[i]

    def reset(self) -> None:
        for layer in self.layers:
            layer.length = 0


def causal_mask_with_offset(t_q: int, t_k: int, device) -> torch.Tensor:
    """Boolean mask [t_q, t_k]: query i (absolute t_k - t_q + i) sees keys <= itself."""
    offset = t_k - t_q
    q = torch.arange(t_q, device=device)[:, None] + offset
    k = torch.arange(t_k, device=device)[None, :]
    return k <= q


#: bf16 causal attention on CPU runs SDPA's fp32 kernel (inputs cast up, output cast back)
#: unless the heads are at least this wide and the window at least `CPU_BF16_SDPA_MIN_T`
#: long: torch's CPU flash kernel is slower in bf16 than in fp32 for forward + backward at
#: every shape memlm's small benchmark trains (one core, Xeon with AMX, torch 2.13, batch 8,
#: d 256: Dh 32, T 128: 20.3 ms bf16 against 7.5 ms through fp32; T 144: 26.3 against 9.4;
#: T 256: 29.7 against 24.2), while with Dh 64 at T >= 256 its bf16 path wins (T 512: 47
#: against 69 ms). SDPA's math kernel and explicit bf16 matmuls lost to the fp32 kernel
#: everywhere but T 64, Dh 64 (2.0 ms each). `python benchmarks/speed_vs_peers.py
#: --attention` re-measures every candidate; docs/speed.md has the table.
CPU_BF16_SDPA_MIN_HEAD_DIM = 64
CPU_BF16_SDPA_MIN_T = 256


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention of q, k, v [B, H, T, Dh] (query i sees keys 0..i).

    SDPA with `is_causal=True`; for bf16 on CPU through its fp32 kernel where that is the
    faster one (`CPU_BF16_SDPA_MIN_HEAD_DIM`). Then the result is the fp32 attention of the
    bf16 inputs rounded once to bf16: no less exact than the bf16 kernel, which rounds its
    probabilities to bf16 before multiplying them with V.
    """
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16
            and (q.shape[-1] < CPU_BF16_SDPA_MIN_HEAD_DIM or q.shape[-2] < CPU_BF16_SDPA_MIN_T)):
        # autocast must be off here: SDPA is on CPU autocast's bf16 list, so under autocast
        # it would cast the fp32 copies straight back and run the bf16 kernel after all
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                 is_causal=True, dropout_p=dropout_p)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.proj.residual_proj = True
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v  # each [B, H, T, Dh]

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryEmbedding | None = None,
        cache: LayerKVCache | None = None,
        ctx=None,
    ) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.split_heads(x)
        start = cache.length if cache is not None else 0
        if rope is not None:
            q = rope(q, slice(start, start + t))
            k = rope(k, slice(start, start + t))
        if cache is not None:
            k, v = cache.append(k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        p = self.dropout if self.training else 0.0
        if start == 0:
            y = causal_attention(q, k, v, dropout_p=p)
        elif t == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            mask = causal_mask_with_offset(t, k.shape[2], x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.resid_dropout(self.proj(y))


class _MaskedBiasAttention(torch.autograd.Function):
    """softmax(scale q k^T + bias, over the allowed keys) v, keeping one probability matrix.

    What `F.scaled_dot_product_attention` computes with a float mask that needs a
    gradient (which sends it to its unfused math kernel), in fewer passes: the bias
    and the mask are applied in place on the fresh scores, the softmax runs in fp32
    (fp64 for fp64 inputs) whatever the input dtype, only the probabilities are kept
    for the backward, and the row term of the softmax gradient is dO . O (as in
    FlashAttention) instead of a pass over the full matrix. The bias gradient is the
    score gradient summed to the bias's own (broadcast) shape, so a per-head bias
    shared by the batch costs one reduction, not a batch-sized tensor.

    With `causal_from` = c >= 0, query row i never sees a column after c + i, so the
    rows run in blocks of `MASKED_QUERY_BLOCK` and a block ending at row e scores only
    the first c + e columns; the gradients of k, v and the bias are accumulated in
    place, never through a slice's backward (which would zero a full copy per block).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                bias: torch.Tensor | None, allowed: torch.Tensor | None,
                causal_from: int) -> torch.Tensor:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        scale = q.shape[-1] ** -0.5
        t, n = q.shape[-2], k.shape[-2]
        blocks = _query_blocks(t, n, causal_from)
        outs, probs = [], []
        for qs, qe, ne in blocks:
            s = torch.matmul(q[..., qs:qe, :] * scale, k[..., :ne, :].transpose(-1, -2)).to(acc)
            if bias is not None:
                s.add_(_rows_cols(bias, qs, qe, ne))
            if allowed is not None:
                s.masked_fill_(~_rows_cols(allowed, qs, qe, ne), float("-inf"))
            p = torch.softmax(s, dim=-1)
            del s
            outs.append(torch.matmul(p.to(v.dtype), v[..., :ne, :]))
            probs.append(p)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
        ctx.save_for_backward(q, k, v, out, *probs)
        ctx.blocks = blocks
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        q, k, v, out, *probs = ctx.saved_tensors
        acc = probs[0].dtype
        grad_out = grad_out.to(v.dtype)
        row = (grad_out.to(acc) * out.to(acc)).sum(-1, keepdim=True)  # rowsum(dO O)
        want_bias = ctx.bias_shape is not None and ctx.needs_input_grad[3]
        grad_q = torch.empty_like(q) if ctx.needs_input_grad[0] else None
        grad_k = torch.zeros_like(k) if ctx.needs_input_grad[1] else None
        grad_v = torch.zeros_like(v)
        grad_bias = torch.zeros(ctx.bias_shape, dtype=acc, device=q.device) if want_bias else None
        for (qs, qe, ne), p in zip(ctx.blocks, probs):
            go = grad_out[..., qs:qe, :]
            grad_v[..., :ne, :] += torch.matmul(p.to(v.dtype).transpose(-1, -2), go)
            ds = torch.matmul(go, v[..., :ne, :].transpose(-1, -2)).to(acc)
            ds.sub_(row[..., qs:qe, :]).mul_(p)  # dS = P (dP - rowsum(dO O)); 0 where masked
            if grad_bias is not None:
                target = _rows_cols(grad_bias, qs, qe, ne)
                target += ds.sum_to_size(target.shape)
            ds = ds.to(q.dtype)  # the scale goes onto the small products, not onto dS
            if grad_q is not None:
                grad_q[..., qs:qe, :] = torch.matmul(ds, k[..., :ne, :]).mul_(ctx.scale)
            if grad_k is not None:
                grad_k[..., :ne, :] += torch.matmul(ds.transpose(-1, -2),
                                                    q[..., qs:qe, :]).mul_(ctx.scale)
        return grad_q, grad_k, grad_v, grad_bias, None, None


#: query rows per block of `masked_attention` when the mask is causal (`causal_from`): a
#: block never scores the keys after its last query, which at T = 256 skips a quarter of
#: the T x T work for one more pair of matmuls
MASKED_QUERY_BLOCK = 128


def _query_blocks(t: int, n: int, causal_from: int) -> list[tuple[int, int, int]]:
    """(first row, end row, columns scored) of each query block."""
    if causal_from < 0:
        return [(0, t, n)]
    return [(qs, min(qs + MASKED_QUERY_BLOCK, t), min(n, causal_from + qs + MASKED_QUERY_BLOCK))
            for qs in range(0, t, MASKED_QUERY_BLOCK)]


def _rows_cols(x: torch.Tensor, qs: int, qe: int, ne: int) -> torch.Tensor:
    """Rows qs:qe and columns :ne of a [..., Tq|1, Tk|1] tensor that broadcasts to the scores."""
    rows = slice(qs, qe) if x.shape[-2] != 1 else slice(None)
    cols = slice(0, ne) if x.shape[-1] != 1 else slice(None)
    return x[..., rows, cols]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     bias: torch.Tensor | None = None, allowed: torch.Tensor | None = None,
                     causal_from: int = -1) -> torch.Tensor:
    """Attention of q [..., Tq, Dh] over k, v [..., Tk, Dh] with an additive bias and a mask.

    `bias` and `allowed` (bool, True = may attend) broadcast to [..., Tq, Tk]; the
    bias may need a gradient (a learned decay). Equals
    `F.scaled_dot_product_attention(q, k, v, attn_mask=bias masked to -inf)` with
    the softmax taken in fp32, at less time and memory (see `_MaskedBiasAttention`).
    `causal_from` = c >= 0 promises that `allowed` is False after column c + i in
    row i (c leading columns every query reads, then causal keys), which lets whole
    blocks of columns go unscored. Every query must be allowed at least one key.
    Returns [..., Tq, Dh] in v's dtype.
    """
    if torch.is_autocast_enabled(q.device.type):  # the matmuls take the dtype they are given
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    with torch.autocast(q.device.type, enabled=False):
        return _MaskedBiasAttention.apply(q, k, v, bias, allowed, causal_from)
