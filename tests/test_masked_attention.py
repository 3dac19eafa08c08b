"""`memlm.nn.attention.masked_attention`, the kernel of TMT's short full forwards.

It replaced `F.scaled_dot_product_attention` with a float mask that needs a
gradient (TMT's learned decay), which runs SDPA's unfused math kernel. These
tests pin it to that old computation: outputs and the gradients of q, k, v and
the bias, with per-head (batch-shared) and per-row biases, with and without the
causal query blocks, in fp64 (tight) and fp32 (allclose); and the TMT model's
loss and gradients through it against its tiled mesh path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import memlm
from memlm.nn import attention as attn_mod
from memlm.nn.attention import masked_attention


def _case(dtype: torch.dtype, t: int = 300, fixed: int = 5, per_row_bias: bool = False,
          causal: bool = True, seed: int = 0):
    """q (B,H,T,d); keys = `fixed` columns every query reads, then T causal keys."""
    g = torch.Generator().manual_seed(seed)
    b, h, d = 2, 3, 8
    n = fixed + t
    q = torch.randn(b, h, t, d, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(b, h, n, d, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(b, h, n, d, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(b if per_row_bias else 1, h, t, n, generator=g, dtype=dtype,
                       requires_grad=True)
    allowed = torch.rand(b, h, t, n, generator=g) > 0.4
    allowed[..., :fixed] |= torch.rand(b, h, t, 1, generator=g) > 0.5
    allowed[..., 0] = True  # every query reads at least one column
    if causal:
        i = torch.arange(t)[:, None]
        j = torch.arange(n)[None, :]
        allowed &= j <= fixed + i
    return q, k, v, bias, allowed


def _old(q, k, v, bias, allowed):
    """The computation TMT's short path ran before: SDPA with the bias masked to -inf."""
    mask = bias.masked_fill(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _grads(fn, q, k, v, bias, allowed, weight):
    out = fn(q, k, v, bias, allowed)
    gq, gk, gv, gb = torch.autograd.grad((out * weight).sum(), (q, k, v, bias))
    return out, gq, gk, gv, gb


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("per_row_bias", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_old_sdpa_computation(dtype, tol, per_row_bias, causal):
    q, k, v, bias, allowed = _case(dtype, per_row_bias=per_row_bias, causal=causal)
    weight = torch.randn(q.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    new = _grads(lambda *a: masked_attention(*a, causal_from=5 if causal else -1),
                 q, k, v, bias, allowed, weight)
    old = _grads(_old, q, k, v, bias, allowed, weight)
    for name, a, b in zip(("out", "q", "k", "v", "bias"), new, old):
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, atol=tol, rtol=tol), (name, (a - b).abs().max())


def test_causal_blocks_really_split_the_rows(monkeypatch):
    """Three blocks of 128 rows at T = 300 give the one-block result (the path is exercised)."""
    assert len(attn_mod._query_blocks(300, 305, 5)) == 3
    q, k, v, bias, allowed = _case(torch.float64)
    whole = masked_attention(q, k, v, bias, allowed)
    blocked = masked_attention(q, k, v, bias, allowed, causal_from=5)
    assert (whole - blocked).abs().max() < 1e-12
    monkeypatch.setattr(attn_mod, "MASKED_QUERY_BLOCK", 7)  # uneven blocks, same answer
    assert (masked_attention(q, k, v, bias, allowed, causal_from=5) - whole).abs().max() < 1e-12


def test_bf16_autocast_matches_fp32_to_bf16_rounding():
    q, k, v, bias, allowed = _case(torch.float32, t=64)
    ref = masked_attention(q, k, v, bias, allowed, causal_from=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = masked_attention(q, k, v, bias, allowed, causal_from=5)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05
    out.float().sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v, bias))


@pytest.mark.parametrize("decay", ["alibi_learned", "alibi_learned+fox"])
def test_tmt_short_path_loss_and_gradients_equal_the_tiled_path(decay):
    """fp32: a 160-token TMT forward through `mesh_dense_below` (this kernel, two query
    blocks, top-k selection active) gives the tiled path's loss and every gradient."""
    cfg = dict(vocab_size=61, n_layer=2, d_model=32, n_head=4, context_len=160, mesh_window=40,
               mesh_k=8, mesh_block_q=32, mesh_block_k=64, n_anchors=4, decay=decay,
               exit_min_layer=1)
    ids = torch.randint(0, 61, (2, 161), generator=torch.Generator().manual_seed(0))
    results = []
    for dense_below in (512, 0):
        torch.manual_seed(0)
        model = memlm.build("tmt", mesh_dense_below=dense_below, **cfg).train()
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None}))
    (l_short, g_short), (l_tiled, g_tiled) = results
    assert torch.allclose(l_short, l_tiled, atol=1e-5, rtol=1e-5)
    assert g_short.keys() == g_tiled.keys() and len(g_short) > 10
    for name in g_short:
        assert torch.allclose(g_short[name], g_tiled[name], atol=1e-5, rtol=1e-4), name


def test_unordered_selection_is_the_same_set():
    """`select_mesh(ordered=False)` (the short path's mask) picks exactly the ordered keys."""
    from memlm.memory.mesh_attention import Bias, alibi_slopes, select_mesh

    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 3, 200, 8, generator=g) for _ in range(2))
    qpos = torch.arange(200).expand(2, 200)
    args = (q, k, qpos, Bias(alibi_slopes(3)), 16, 20, 64, 48)
    idx_o, val_o = select_mesh(*args)
    idx_u, val_u = select_mesh(*args, ordered=False)
    assert torch.equal(idx_o.sort(-1).values, idx_u.sort(-1).values)
    assert torch.equal(val_o.sort(-1).values, val_u.sort(-1).values)
    assert (idx_o >= 0).any() and (idx_o == -1).any()  # both filled and empty slots occur
