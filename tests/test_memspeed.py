"""Speed work on ARMT and DNC (issue 18) keeps their maths: every fast path against the
straightforward computation it replaced (kept here as the reference), in float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import memlm
from memlm.memory import associative as am
from memlm.memory.associative import AssociativeMemory, LayerMemory, MemoryCall

# ----- ARMT references: the computation before the speed work ---------------------------------


def ref_dpfp(x: torch.Tensor, order: int) -> torch.Tensor:
    u = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    return torch.cat([u * torch.roll(u, shifts=j, dims=-1) for j in range(1, order + 1)], dim=-1)


def ref_features(mem: AssociativeMemory, x: torch.Tensor, proj) -> torch.Tensor:
    b, n, _ = x.shape
    q = F.linear(x, proj.weight.float()).view(b, n, mem.heads, mem.d_mem // mem.heads)
    phi = ref_dpfp(q, mem.order)
    if mem.key_norm == "l2":
        phi = phi / phi.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return phi


def ref_read(mem: AssociativeMemory, hidden: torch.Tensor, state: LayerMemory) -> torch.Tensor:
    """O = (phi A) / (phi z + eps) with phi normalised first and two einsums."""
    phi = ref_features(mem, hidden.float(), mem.w_q)
    num = torch.einsum("bnhk,bhkv->bnhv", phi, state.A.float())
    if mem.use_denom:
        s = torch.einsum("bnhk,bhk->bnh", phi, state.z.float())
        num = num / (s + am.DENOM_EPS).unsqueeze(-1)
    return num.reshape(hidden.shape[0], hidden.shape[1], mem.d_model)


def _memory(heads=1, key_norm="l2", use_denom=True, correction=True, capacity=None,
            first_write_whole=False, seed=0) -> AssociativeMemory:
    torch.manual_seed(seed)
    mem = AssociativeMemory(32, 8, 3, heads, use_denom, correction, key_norm, capacity,
                            first_write_whole)
    torch.nn.init.normal_(mem.w_v.weight, std=0.2)  # W_V starts at zero: make writes count
    return mem


def _state(mem: AssociativeMemory, b: int, empty_rows=()) -> LayerMemory:
    st = mem.init_state(b)
    A = torch.randn_like(st.A) * 0.3
    z = torch.rand_like(st.z) * 3
    for r in empty_rows:
        A[r], z[r] = 0.0, 0.0
    return LayerMemory(A, z)


def test_dpfp_without_rolls_equals_the_roll_form():
    for p, orders in ((8, (1, 2, 3, 5, 8)), (2, (1, 2, 3, 4, 6))):  # shifts past p and 2 p
        x = torch.randn(3, 5, 2, p, requires_grad=True)
        for order in orders:
            new, ref = am.dpfp(x, order), ref_dpfp(x, order)
            assert torch.equal(new, ref)
            weight = torch.randn_like(ref)
            g_new, = torch.autograd.grad((new * weight).sum(), x)
            g_ref, = torch.autograd.grad((ref * weight).sum(), x)
            torch.testing.assert_close(g_new, g_ref)


@pytest.mark.parametrize("heads,key_norm,use_denom", [
    (1, "l2", True), (2, "l2", True), (1, "none", True), (1, "l2", False), (2, "none", False)])
def test_fused_read_matches_the_reference_values_and_gradients(heads, key_norm, use_denom):
    mem = _memory(heads, key_norm, use_denom)
    state = _state(mem, 3)
    state = LayerMemory(state.A.requires_grad_(), state.z.requires_grad_())
    hidden = torch.randn(3, 7, 32, requires_grad=True)
    hidden.data[0, 0] = 0.0  # all-zero features: the norm clamp path
    outs, grads = [], []
    for fn in (ref_read, AssociativeMemory.read):
        out = fn(mem, hidden, state)
        weight = torch.linspace(-1, 1, out.numel()).view_as(out)
        g = torch.autograd.grad((out * weight).sum(), [hidden, state.A, state.z, mem.w_q.weight],
                                allow_unused=True)
        outs.append(out)
        grads.append(g)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for new, ref in zip(grads[1], grads[0]):
        if ref is None:  # z without a denominator
            assert new is None
            continue
        torch.testing.assert_close(new, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("l2", [True, False])
def test_read_ratio_backward_equals_plain_autograd(l2):
    """`_ReadRatio` (the read's hand-written backward): fp64 gradcheck, and in fp32 the plain
    form's values bit for bit and its gradients to rounding, an all-zero feature row included."""
    g = torch.Generator().manual_seed(0)
    f, A, z = (torch.rand(2, 2, 5, 6, generator=g, dtype=torch.float64),
               torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64),
               torch.rand(2, 2, 6, generator=g, dtype=torch.float64))
    args = [x.clone().requires_grad_() for x in (f, A, z)]
    assert torch.autograd.gradcheck(lambda *a: am._ReadRatio.apply(*a, l2), args)
    f = f.float()
    f[0, 1, 3] = 0.0  # a position whose features are all zero (its norm is clamped)
    new = [x.float().requires_grad_() for x in (f, A, z)]
    ref = [x.detach().clone().requires_grad_() for x in new]
    out, want = am._ReadRatio.apply(*new, l2), am.read_ratio(*ref, l2)
    assert torch.equal(out, want)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    want.backward(grad)
    for a, b in zip(new, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [
    dict(),
    dict(heads=2, capacity=1.5),
    dict(correction=False, first_write_whole=True),
    dict(key_norm="none", first_write_whole=True),
    dict(use_denom=False),
])
@pytest.mark.parametrize("masked", [False, True])
def test_all_layers_written_together_equal_one_write_per_layer(options, masked):
    n_layers, b, m = 3, 4, 5
    memories = [_memory(seed=i, **options) for i in range(n_layers)]
    states = [_state(mem, b, empty_rows=(1,)) for mem in memories]
    outs = [torch.randn(b, m, 32, requires_grad=True) for _ in memories]
    row_mask = torch.tensor([True, False, True, True]) if masked else None
    params = [p for mem in memories for p in (mem.w_k.weight, mem.w_v.weight,
                                              mem.w_beta.weight, mem.w_beta.bias)]

    def loss(new):
        return sum(((s.A * torch.linspace(-1, 1, s.A.numel()).view_as(s.A)).sum()
                    + (s.z * s.z).sum()) for s in new)

    ref = [mem.write(o, s, row_mask) for mem, o, s in zip(memories, outs, states)]
    ref_grads = torch.autograd.grad(loss([r[0] for r in ref]), outs + params)

    call = MemoryCall(0, tuple(states), True, 0, row_mask)
    call.pending = list(outs)
    am.write_layers(memories, call)
    new_grads = torch.autograd.grad(loss(call.state_out), outs + params)
    for (ref_state, ref_stats), new_state, new_stats in zip(ref, call.state_out, call.stats):
        torch.testing.assert_close(new_state.A, ref_state.A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(new_state.z, ref_state.z, rtol=1e-5, atol=1e-6)
        for key in ("beta_mean", "gamma_mean"):
            torch.testing.assert_close(new_stats[key], ref_stats[key])
    for new, old in zip(new_grads, ref_grads):
        torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-5)
    if masked:  # padding-only rows keep their state bit-identical
        assert torch.equal(call.state_out[0].A[1], states[0].A[1])


def test_empty_states_needs_both_a_and_z_zero_and_no_gradient():
    zeros = LayerMemory(torch.zeros(2, 1, 4, 3), torch.zeros(2, 1, 4))
    a_only = LayerMemory(zeros.A.clone(), zeros.z.clone())
    a_only.A[1, 0, 2, 1] = 1e-30  # A written while z stayed zero (use_denom off)
    z_only = LayerMemory(zeros.A.clone(), zeros.z.clone())
    z_only.z[0, 0, 3] = 2.0
    needs_grad = LayerMemory(zeros.A.clone().requires_grad_(), zeros.z.clone())
    assert am.empty_states((zeros, a_only, z_only, needs_grad, zeros)) == [
        True, False, False, False, True]
    assert am.empty_states((needs_grad,)) == [False]


@pytest.mark.parametrize("capacity", [None, 1.5])
def test_consecutive_stacked_writes_equal_per_layer_writes(capacity):
    """Two segments through write_layers (the second writes on the first's stacked state),
    then a detached third: states and gradients equal per-layer writes."""
    n_layers, b, m = 3, 2, 4
    memories = [_memory(seed=i, heads=2, capacity=capacity) for i in range(n_layers)]
    outs = [[torch.randn(b, m, 32, requires_grad=True) for _ in memories] for _ in range(3)]
    params = [p for mem in memories for p in (mem.w_k.weight, mem.w_v.weight,
                                              mem.w_beta.weight, mem.w_beta.bias)]

    def run(together: bool):
        states = tuple(mem.init_state(b) for mem in memories)
        losses = []
        for seg, seg_outs in enumerate(outs):
            if seg == 2:
                states = tuple(LayerMemory(s.A.detach(), s.z.detach()) for s in states)
            if together:
                call = MemoryCall(0, states, True, 0)
                call.pending = list(seg_outs)
                am.write_layers(memories, call)
                states = tuple(call.state_out)
            else:
                states = tuple(mem.write(o, s)[0] for mem, o, s in zip(memories, seg_outs, states))
            losses.append(sum((s.A * s.A).sum() + s.z.sum() for s in states))
        total = sum(losses)
        return states, torch.autograd.grad(total, [o for seg in outs for o in seg] + params)

    ref_states, ref_grads = run(False)
    states, grads = run(True)
    for new, ref in zip(states, ref_states):
        torch.testing.assert_close(new.A, ref.A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(new.z, ref.z, rtol=1e-5, atol=1e-6)
    for new, ref in zip(grads, ref_grads):
        torch.testing.assert_close(new, ref, rtol=1e-4, atol=1e-5)


def _armt_training_run(monkeypatch, reference: bool, steps: int = 4):
    """Losses and final gradients of a few fp32 AdamW steps of a small ARMT."""
    with monkeypatch.context() as mp:
        if reference:
            mp.setattr(am.AssociativeMemory, "read", ref_read)
            mp.setattr(am, "dpfp", ref_dpfp)
        torch.manual_seed(0)
        model = memlm.build("armt", vocab_size=64, n_layer=3, n_head=2, d_model=32,
                            context_len=24, segment_len=8, num_mem_tokens=3, d_mem=8,
                            mem_capacity=4.0)
        torch.nn.init.normal_(model.backbone.layers()[0].memory.w_v.weight, std=0.1)
        model.write_together = model.skip_empty_reads = not reference
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(steps):
            ids = torch.randint(0, 64, (3, 25), generator=gen)
            mask = torch.ones(3, 24, dtype=torch.long)
            mask[2, 8:16] = 0  # a padding-only segment in one row
            out = model(ids[:, :-1], targets=ids[:, 1:], attention_mask=mask)
            opt.zero_grad()
            out.loss.backward()
            losses.append(out.loss.detach())
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            opt.step()
        return torch.stack(losses), grads, out.metrics


@pytest.mark.parametrize("steps", [1, 4])
def test_armt_training_steps_equal_the_reference_computation(monkeypatch, steps):
    ref_losses, ref_grads, ref_metrics = _armt_training_run(monkeypatch, True, steps)
    losses, grads, metrics = _armt_training_run(monkeypatch, False, steps)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(ref_grads)
    for new, old in zip(grads, ref_grads):
        torch.testing.assert_close(new, old, rtol=1e-3, atol=1e-6)
    for key in ("armt_beta_mean", "armt_gamma_mean", "armt_read_share", "armt_z_sum"):
        torch.testing.assert_close(metrics[key], ref_metrics[key], rtol=1e-4, atol=1e-6)


def test_a_skipped_empty_read_leaves_the_exact_zero_gradient():
    """One segment from a fresh state: no read runs, yet W_Q gets the zero gradient the
    read gives it (not None, which AdamW would treat differently), and the output and
    every other gradient are the full computation's."""
    results = []
    for skip in (False, True):
        torch.manual_seed(0)
        model = memlm.build("armt", vocab_size=64, n_layer=2, n_head=2, d_model=32,
                            context_len=8, num_mem_tokens=2, d_mem=8)
        model.skip_empty_reads = skip
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
        out = model(ids[:, :-1], targets=ids[:, 1:])
        out.loss.backward()
        results.append((out.loss, {n: p.grad for n, p in model.named_parameters()},
                        out.metrics["armt_read_share"]))
    (ref_loss, ref_grads, ref_share), (loss, grads, share) = results
    assert torch.equal(loss, ref_loss) and float(share) == float(ref_share) == 0.0
    for name, ref in ref_grads.items():
        assert (grads[name] is None) == (ref is None), name
        if ref is not None:
            torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-7)
    w_q = [g for n, g in grads.items() if n.endswith("memory.w_q.weight")]
    assert w_q and all(g is not None and not g.any() for g in w_q)


# ----- ARMT diagonal batching -------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    dict(),  # 4 full segments + a short one, rope
    dict(pos_emb="learned", bias=False, mem_heads=2, key_norm="none", n_layer=2),
    dict(segment_alignment="right", mem_capacity=None, n_layer=1),
    dict(output_only_last_segment=True, first_write_whole=True),
])
def test_diagonal_reader_equals_the_sequential_reader(options):
    from memlm.models.streaming import read

    cfg = dict(vocab_size=64, n_layer=3, n_head=2, d_model=32, context_len=8, segment_len=8,
               num_mem_tokens=3, d_mem=8)
    cfg.update(options)
    torch.manual_seed(0)
    model = memlm.build("armt", **cfg).eval()
    for layer in model.backbone.layers():  # W_V starts at zero: make the memory matter
        torch.nn.init.normal_(layer.memory.w_v.weight, std=0.3)
    ids = torch.randint(0, 64, (2, 37))
    start = model.init_state(2)
    with torch.no_grad():
        ref = model(ids, state=start)
        warm = model(ids[:, :16]).state  # a non-empty starting state
        ref_warm = model(ids, state=warm)
    out = read(model, ids, state=start, diagonal=True)
    out_warm = model.read_diagonal(ids, warm)
    for got, want in ((out, ref), (out_warm, ref_warm)):
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        for a, b in zip(got.state.layers, want.state.layers):
            torch.testing.assert_close(a.A, b.A, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.z, b.z, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_warm.logits, out.logits)  # the starting memory is read


def test_diagonal_reader_attends_through_causal_attention(monkeypatch):
    """The diagonal reader runs `causal_attention` (bf16 on CPU: SDPA's fp32 kernel, as the
    segment step does), so under bf16 autocast it matches the sequential reader."""
    import memlm.models.armt_diagonal as diag
    from memlm.nn.attention import causal_attention

    calls = []

    def spy(q, k, v, dropout_p=0.0):
        calls.append(q.dtype)
        return causal_attention(q, k, v, dropout_p)

    monkeypatch.setattr(diag, "causal_attention", spy)
    torch.manual_seed(0)
    model = memlm.build("armt", vocab_size=64, n_layer=2, n_head=2, d_model=32, context_len=8,
                        segment_len=8, num_mem_tokens=2, d_mem=8).eval()
    for layer in model.backbone.layers():
        torch.nn.init.normal_(layer.memory.w_v.weight, std=0.3)
    ids = torch.randint(0, 64, (2, 32))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(ids)
        got = model.read_diagonal(ids).logits
    assert calls and set(calls) == {torch.bfloat16}
    torch.testing.assert_close(got.float(), ref.logits.float(), rtol=0.05, atol=0.05)


def test_diagonal_reader_refuses_what_it_cannot_read():
    from memlm.errors import ConfigError, DataError
    from memlm.models.streaming import read

    model = memlm.build("armt", vocab_size=64, n_layer=2, n_head=2, d_model=32, context_len=8,
                        num_mem_tokens=2, d_mem=8)
    ids = torch.randint(0, 64, (1, 16))
    with pytest.raises(ConfigError, match="eval"):
        model.read_diagonal(ids)  # training mode
    with pytest.raises(DataError, match="diagonal"):
        read(memlm.build("gpt", vocab_size=64, n_layer=1, n_head=2, d_model=32,
                         context_len=8), ids, diagonal=True)
    with pytest.raises(DataError, match="window"):
        read(model.eval(), ids, diagonal=True, window=4)
    sliding = memlm.build("armt", vocab_size=64, n_layer=2, n_head=2, d_model=32, context_len=8,
                          num_mem_tokens=2, d_mem=8, sliding_window=True).eval()
    with pytest.raises(ConfigError, match="sliding_window"):
        sliding.read_diagonal(ids)


# ----- DNC ------------------------------------------------------------------------------------


def _dnc_run(compile_step: bool, chunk: int = 1, steps: int = 2, **options):
    """Losses, gradients and final state of a few fp32 AdamW steps, state carried."""
    torch.manual_seed(0)
    model = memlm.build("dnc", vocab_size=64, n_layer=1, n_head=2, d_model=16, context_len=5,
                        mem_slots=6, mem_width=8, num_reads=2, compile_step=compile_step,
                        **options)
    model.memory.compile_chunk = chunk
    torch.nn.init.normal_(model.memory.read_proj.weight, std=0.1)  # the reads count
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    state, losses = None, []
    for i in range(steps):
        ids = torch.randint(0, 64, (2, 6), generator=gen)
        mask = torch.ones(2, 5, dtype=torch.bool)
        mask[1, 3:] = i == 0  # padding freezes one row's memory in the second step
        out = model(ids[:, :-1], targets=ids[:, 1:], state=state, attention_mask=mask)
        opt.zero_grad()
        out.loss.backward()
        losses.append(out.loss.detach())
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        opt.step()
        state = model.detach_state(out.state)
    return torch.stack(losses), grads, state


@pytest.mark.slow
def test_compiled_dnc_chunks_equal_the_eager_step():
    """`compile_step` runs `_default_chunk` compiled, 2 tokens per call here (5 = 2 + 2 + 1,
    so a short last chunk too): the same losses, gradients and state as the eager loop.
    (Compiling two chunk shapes forward and backward: about a minute of CPU.)"""
    ref = _dnc_run(False, steps=1, temporal_links=True)
    new = _dnc_run(True, chunk=2, steps=1, temporal_links=True)
    torch.testing.assert_close(new[0], ref[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(new[1], ref[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for got, want in zip(new[2], ref[2]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
