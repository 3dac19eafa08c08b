"""DNC: a working differentiable neural computer carried across segments (docs/dnc.md)."""

import math

import pytest
import torch

import memlm
from memlm import testing
from memlm.config import load_run_config
from memlm.errors import ConfigError
from memlm.eval.memory_modes import carry_segments
from memlm.memory.dnc import (
    DNCState,
    allocation_weights,
    entropy,
    retention,
    update_links,
    update_usage,
    write_memory,
)
from memlm.registry import INSPECTORS
from memlm.types import IGNORE_INDEX

V = 61
TINY = dict(vocab_size=V, n_layer=2, d_model=64, n_head=4, context_len=32,
            mem_slots=16, mem_width=16, num_reads=2)
BACKBONE = {k: v for k, v in TINY.items() if not k.startswith(("mem_", "num_"))}
VARIANTS = {
    "final": {},
    "middle": {"mem_layer": 0},
    "links": {"temporal_links": True},
}


def tiny(seed=0, live=True, **kw):
    """A tiny DNC; `live` randomises the zero-initialised read projection so reads matter."""
    torch.manual_seed(seed)
    model = memlm.build("dnc", **{**TINY, **kw})
    if live:
        with torch.no_grad():
            model.memory.read_proj.weight.normal_(0.0, 0.3)
    return model.eval()


def ids(*shape, seed=1):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def carried(model, batch=2, seed=7):
    """The state after one earlier segment, so checks run in carry mode, not from scratch."""
    with torch.no_grad():
        return model(ids(batch, 16, seed=seed), state=model.init_state(batch)).state


# ----- structure -----------------------------------------------------------------------------
def test_parameter_counts_match_the_reference_shapes():
    model_cfg = load_run_config("dnc-memoryllm").model
    shapes = {k: v for k, v in model_cfg.to_dict().items() if k != "arch"}
    with torch.device("meta"):
        dnc = memlm.build("dnc", **shapes)
        links = memlm.build("dnc", **{**shapes, "temporal_links": True})
        faithful = memlm.build("dnc", **{**shapes, "faithful": True, "lambda_routing": 0.1})
    assert dnc.num_params() - dnc.memory_param_count() == 119_821_824
    assert dnc.memory_param_count() == 1_099_659
    assert links.memory_param_count() == 1_108_887
    assert faithful.memory_param_count() == 1_083_778


def test_at_init_the_model_is_exactly_its_dense_backbone():
    torch.manual_seed(3)
    gpt = memlm.build("gpt", **BACKBONE)
    dnc = tiny(seed=3, live=False)
    gpt.eval()
    for (name, p), (name2, q) in zip(gpt.decoder.named_parameters(),
                                     dnc.decoder.named_parameters()):
        assert name == name2 and torch.equal(p, q), name
    x = ids(2, 32)
    out = dnc(x, targets=x)
    assert (out.logits - gpt(x).logits).abs().max() <= 1e-6
    assert out.metrics["dnc_mem_kl"] == 0.0


def test_slot_symmetry_is_broken_from_the_first_step():
    model = tiny(live=False)
    n = TINY["mem_slots"]
    out = model(ids(1, 32), trace=True)
    first = out.trace["write_address"][0, 0]
    assert entropy(first) < math.log(n) - 0.1  # not uniform after one step
    unit = torch.nn.functional.normalize(out.state.memory[0], dim=-1)
    cos = unit @ unit.T - 2 * torch.eye(n)
    assert cos.max() < 0.999  # rows stay distinct after 32 steps
    read = out.trace["read_weights"]
    assert (read - 1.0 / n).abs().max() > 1e-3  # reads are not uniform either


def test_faithful_mode_reproduces_the_collapsed_reference_memory():
    model = memlm.build("dnc", **TINY, faithful=True, lambda_routing=0.1)
    with torch.no_grad():  # random parameters everywhere: the collapse does not depend on them
        for p in model.memory.parameters():
            p.normal_(0.0, 0.5)
    out = model(ids(2, 32), trace=True)
    h = entropy(out.trace["write_address"])
    assert (h - math.log(TINY["mem_slots"])).abs().max() < 1e-5
    memory = out.state.memory
    assert (memory - memory[:, :1]).abs().max() < 1e-6  # every row identical
    assert abs(float(out.metrics["dnc_write_sparsity"])) < 1e-5
    assert model.is_stateful is False  # the reference wipes memory every batch


# ----- causality and the inference path ------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_causal_in_carry_mode_in_train_and_eval(variant):
    model = tiny(dropout=0.0, **VARIANTS[variant])
    state = carried(model)
    testing.assert_causal(model, V, 24, state_fn=lambda b: state)
    assert testing.check_prefix_consistency(model, V, 24) < 1e-5


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_decoding_threads_the_state_like_a_full_forward(variant):
    model = tiny(**VARIANTS[variant])
    assert testing.check_cache_equivalence(model, V, prompt_len=6, new=10) < 1e-5
    prompt = ids(2, 5)
    cached = model.generate(prompt, 16, use_cache=True)
    uncached = model.generate(prompt, 16, use_cache=False)
    assert torch.equal(cached, uncached)


def test_later_segments_cannot_change_earlier_ones():
    model = tiny()
    a = [ids(2, 16, seed=s) for s in (1, 2, 3)]
    b = a[:2] + [ids(2, 16, seed=9)]
    with torch.no_grad():
        run = [carry_segments(model, segs, model.init_state(2)) for segs in (a, b)]
    for s in (0, 1):
        assert torch.equal(run[0][s].logits, run[1][s].logits)
        assert all(torch.equal(x, y) for x, y in zip(run[0][s].state, run[1][s].state))


# ----- memory beyond the attention window -----------------------------------------------------
def test_a_token_in_segment_0_reaches_segment_2_only_through_carried_memory():
    model = tiny()
    torch.manual_seed(0)
    dense = memlm.build("gpt", **BACKBONE).eval()
    a = [ids(2, 16, seed=s) for s in (1, 2, 3)]
    b = [a[0].clone(), a[1], a[2]]
    b[0][:, 4] = (b[0][:, 4] + 1) % V

    def last(segs, **kw):
        with torch.no_grad():
            return carry_segments(model, segs, model.init_state(2), **kw)[-1]

    assert (last(a).logits - last(b).logits).abs().max() > 1e-4  # carry: memory brings it
    assert torch.equal(last(a, nomem=True).logits, last(b, nomem=True).logits)
    with torch.no_grad():
        reset = [model(s[2], state=model.init_state(2)).logits for s in (a, b)]
        assert torch.equal(reset[0], reset[1])
        assert torch.equal(dense(a[2]).logits, dense(b[2]).logits)


def test_truncated_bptt_cuts_the_gradient_at_the_segment_boundary():
    model = tiny()
    model.train()
    x0, x1 = ids(2, 16, seed=1), ids(2, 16, seed=2)

    def mem_init_grad(detach):
        model.zero_grad(set_to_none=True)
        state = model(x0, targets=x0, state=model.init_state(2)).state
        if detach:
            state = model.detach_state(state)
        model(x1, targets=x1, state=state).loss.backward()
        return model.memory.mem_init.grad

    assert mem_init_grad(detach=True) is None  # segment 1's loss never reaches M_init
    assert mem_init_grad(detach=False).abs().sum() > 0


def test_padding_changes_neither_loss_metrics_nor_state():
    model = tiny()
    state = carried(model)
    x, real = ids(2, 16), 11
    pad = torch.arange(16) < real
    attention_mask = pad.expand(2, 16)
    y = x.roll(-1, 1).masked_fill(~attention_mask, IGNORE_INDEX)
    x2 = x.clone()
    x2[:, real:] = ids(2, 16 - real, seed=5)
    with torch.no_grad():
        o1 = model(x, targets=y, state=state, attention_mask=attention_mask)
        o2 = model(x2, targets=y, state=state, attention_mask=attention_mask)
        cut = model(x[:, :real], targets=y[:, :real], state=state)
    assert torch.equal(o1.loss, o2.loss)
    assert all(torch.equal(o1.metrics[k], o2.metrics[k]) for k in o1.metrics)
    for a, b, c in zip(o1.state, o2.state, cut.state):
        assert torch.equal(a, b)
        assert torch.allclose(a, c, atol=1e-6)  # padded segment == truncated segment
    assert torch.allclose(o1.loss, cut.loss, atol=1e-6)


# ----- the DNC equations ---------------------------------------------------------------------
def test_free_gates_release_read_slots_and_usage_stays_in_0_1():
    usage = torch.tensor([[0.3, 0.8, 0.5, 0.9]])
    read = torch.zeros(1, 2, 4)
    read[0, 0, 1] = 1.0  # the previous read looked at slot 1
    psi = retention(torch.ones(1, 2), read)
    assert update_usage(usage, torch.zeros(1, 4), psi)[0, 1] == 0.0
    g = torch.Generator().manual_seed(0)
    u = torch.zeros(3, 8)
    for _ in range(50):  # free gates 0: usage never decreases
        w = torch.rand(3, 8, generator=g).softmax(-1) * torch.rand(3, 1, generator=g)
        new = update_usage(u, w, retention(torch.zeros(3, 2), torch.rand(3, 2, 8, generator=g)))
        assert (new >= u - 1e-7).all() and (new <= 1.0).all()
        u = new
    f = torch.rand(3, 2, generator=g)
    freed = update_usage(u, torch.zeros(3, 8), retention(f, torch.rand(3, 2, 8, generator=g)))
    assert (freed >= 0).all() and (freed <= 1).all()


def test_allocation_prefers_the_least_used_slot_and_is_differentiable():
    usage = torch.tensor([[0.9, 0.1, 0.5, 0.7]], requires_grad=True)
    a = allocation_weights(usage)
    assert a.argmax() == 1 and a.sum() <= 1.0
    a[0, 1].backward()
    assert torch.isfinite(usage.grad).all() and usage.grad.abs().sum() > 0
    equal = allocation_weights(torch.zeros(2, 6))
    assert (equal[:, 0] > 1 - 1e-5).all() and (equal[:, 1:] < 1e-5).all()


def test_write_rule_erases_and_adds_exactly():
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(2, 5, 4, generator=g)
    value = torch.randn(2, 4, generator=g)
    assert torch.equal(write_memory(memory, torch.zeros(2, 5), torch.rand(2, 4), value), memory)
    one_hot = torch.zeros(2, 5)
    one_hot[:, 3] = 1.0
    new = write_memory(memory, one_hot, torch.ones(2, 4), value)
    assert torch.equal(new[:, 3], value)
    assert torch.equal(new[:, [0, 1, 2, 4]], memory[:, [0, 1, 2, 4]])


def test_temporal_links_follow_the_write_order():
    n = 4
    link, prec = torch.zeros(1, n, n), torch.zeros(1, n)
    for slot in (2, 0):  # write slot 2, then slot 0
        w = torch.zeros(1, n)
        w[0, slot] = 1.0
        link, prec = update_links(link, prec, w)
    assert link[0, 0, 2] == 1.0 and link.diagonal(dim1=1, dim2=2).abs().max() == 0
    from_2 = torch.zeros(1, 1, n)
    from_2[0, 0, 2] = 1.0
    assert (from_2 @ link.transpose(1, 2)).argmax() == 0  # forward: what came after slot 2
    from_0 = torch.zeros(1, 1, n)
    from_0[0, 0, 0] = 1.0
    assert (from_0 @ link).argmax() == 2  # backward: what came before slot 0


@pytest.mark.parametrize("links,fused", [(False, False), (True, False), (False, True),
                                         (True, True)])
def test_the_memory_step_has_exact_gradients(links, fused):
    """float64 finite differences through three steps, sort-based allocation included."""
    from memlm.memory.dnc import _default_step, unit_rows

    b, n, w, r, t = 2, 5, 4, 2, 3
    g = torch.Generator().manual_seed(0)
    shapes = [(n, w), (b, t, w), (b, t, w), (b, t, w), (b, t, r), (b, t, 1), (b, t, 1),
              (b, t, r, w), (b, t, r, 3)]
    args = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]

    def run(m0, kw, e, v, f, ga, gw, kr, pi):
        memory = m0.expand(b, n, w)
        inv = memory.norm(dim=-1).reciprocal()
        usage, write, read = torch.zeros(b, n).double(), torch.zeros(b, n).double(), \
            torch.zeros(b, r, n).double()
        nl = n if links else 0
        link, prec = torch.zeros(b, nl, nl).double(), torch.zeros(b, nl).double()
        total = 0.0
        for i in range(t):
            memory, inv, usage, write, read, link, prec, address, vec = _default_step(
                memory, inv, usage, write, read, link, prec, 2 * unit_rows(kw[:, i]),
                e[:, i].sigmoid(), v[:, i], f[:, i].sigmoid(), ga[:, i].sigmoid(),
                gw[:, i].sigmoid(), 3 * unit_rows(kr[:, i]), pi[:, i].softmax(-1), None,
                links, False, fused)
            total = total + vec.sum() + address.square().sum() + usage.square().sum()
        return total

    assert torch.autograd.gradcheck(run, args)


def test_memory_modes_report_carry_reset_nomem_and_gain():
    from memlm.eval.memory_modes import memory_modes

    stream = ids(1, 8 * 16 + 1, seed=4)[0]
    at_init = memory_modes(tiny(live=False), stream, seq_len=16, rows=2)
    assert at_init["ppl_carry"] == at_init["ppl_reset"] == at_init["ppl_nomem"]
    live = memory_modes(tiny(), stream, seq_len=16, rows=2)
    assert live["tokens"] == 2 * 4 * 16 and live["ppl_carry"] != live["ppl_reset"]
    assert live["mem_gain"] == pytest.approx(
        math.log(live["ppl_reset"]) - math.log(live["ppl_carry"]), abs=1e-9)


def test_one_head_call_per_segment_equals_a_per_step_head():
    model = tiny()
    x = ids(2, 20)
    with torch.no_grad():
        out = model(x, trace=True)
        dec = model.decoder
        h = dec.ln_f(dec.hidden(x, memlm.models.ForwardContext()))
        reads = out.trace["read_vectors"]
        steps = [dec.lm_head(h[:, t] + model.memory.read_proj(reads[:, t])) for t in range(20)]
    assert (torch.stack(steps, 1) - out.logits).abs().max() < 1e-5


# ----- state API, precision, metrics ---------------------------------------------------------
def test_state_api_reset_rows_and_shape_errors():
    model = tiny()
    state = carried(model, batch=3)
    assert isinstance(state, DNCState) and all(t.dtype == torch.float32 for t in state)
    reset = model.reset_state_rows(state, torch.tensor([False, True, False]))
    fresh = model.init_state(3)
    assert torch.equal(reset.memory[1], fresh.memory[1]) and torch.equal(reset.usage[1], fresh.usage[1])
    assert torch.equal(reset.memory[0], state.memory[0])
    with pytest.raises(ConfigError, match="init_state"):
        model(ids(2, 8), state=state)
    with pytest.raises(ConfigError, match="mem_layer"):
        memlm.build("dnc", **{**TINY, "mem_layer": 5})


def test_bf16_autocast_keeps_the_memory_in_float32():
    model = tiny(temporal_links=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids(2, 16), state=carried(model))
    assert all(t.dtype == torch.float32 for t in out.state)


def test_long_streams_keep_a_constant_size_state():
    model = tiny()
    state = model.init_state(2)
    shapes = [tuple(t.shape) for t in state]
    with torch.no_grad():
        for s in range(60):
            state = model(ids(2, 8, seed=s), state=state).state
    assert [tuple(t.shape) for t in state] == shapes
    assert (state.usage >= 0).all() and (state.usage <= 1).all()


def test_metrics_are_in_range_and_losses_follow_the_spec():
    model = tiny()
    x = ids(2, 24)
    out = model(x, targets=x.roll(-1, 1), state=carried(model))
    m = out.metrics
    for key in ("write_sparsity", "read_sparsity", "write_rate", "avg_gate", "alloc_share"):
        assert 0.0 <= float(m[f"dnc_{key}"]) <= 1.0, key
    # every memory diagnostic says it is a DNC quantity (metrics.jsonl puts them next to loss)
    assert m and all(k.startswith("dnc_") for k in m), sorted(m)
    assert float(m["dnc_mem_kl"]) >= 0.0 and float(m["dnc_gate_std"]) >= 0.0
    assert set(out.aux_losses) == {"dnc_entropy"}  # lambda_routing is 0 by default
    assert torch.allclose(out.loss, out.lm_loss + out.aux_losses["dnc_entropy"])
    with pytest.warns(UserWarning, match="one-sided"):
        routed = memlm.build("dnc", **TINY, lambda_routing=0.1)
    assert "dnc_routing" in routed(x, targets=x).aux_losses


def test_save_load_determinism_and_gradients():
    model = tiny()
    assert testing.check_save_load(model, ids(2, 16)) == 0.0
    build = lambda: memlm.build("dnc", **TINY)  # noqa: E731
    assert testing.loss_curve(build, V, 16) == testing.loss_curve(build, V, 16)
    assert testing.params_without_grad(tiny(temporal_links=True), ids(2, 17)) == []
    assert testing.params_without_grad(tiny(mem_layer=0), ids(2, 17)) == []


def test_inspect_prints_one_row_per_token_and_writes_a_heatmap(tmp_path):
    model = tiny()
    text = "Albert Einstein was born in 1879"
    x = torch.tensor([[ord(c) % V for c in text]])
    inspect = INSPECTORS.get("dnc")
    shown = inspect(model, list(text), x, None, tmp_path)
    assert shown == inspect(model, list(text), x, None, None)  # deterministic
    rows = (tmp_path / "dnc_inspect.jsonl").read_text().splitlines()
    assert len(rows) == len(text)
    trace = model(x, trace=True).trace
    import json
    for t, line in enumerate(rows):
        row = json.loads(line)
        assert 0.0 <= row["gate"] <= 1.0
        assert row["write_slot"] == int(trace["write_address"][0, t].argmax())
    table = shown.splitlines()[3:]
    gate = trace["write_gate"][0]
    assert all(line.count("\u2588") == int(30 * float(g)) for line, g in zip(table, gate))
    assert (tmp_path / "dnc_memory.png").stat().st_size > 1000


# ----- it learns what the dense model cannot ---------------------------------------------------
KEY, QUERY, N_VALUES = 0, 1, 4


def recall_episodes(g, batch, seg_len, distance, vocab):
    """A fact (KEY value) ends segment 0; segment `distance` opens with QUERY -> value.

    Every other token is noise drawn from symbols that are never values. The dense
    model's attention window is one segment, so it cannot see the fact and sits at
    chance (1/N_VALUES); the DNC has to carry the value through its memory.
    """
    x = torch.randint(2 + N_VALUES, vocab, (batch, distance + 1, seg_len), generator=g)
    value = torch.randint(2, 2 + N_VALUES, (batch,), generator=g)
    x[:, 0, -2], x[:, 0, -1], x[:, -1, 0] = KEY, value, QUERY
    y = torch.full_like(x, IGNORE_INDEX)
    y[:, -1, 0] = value
    return x, y


def train_recall(arch, steps, seed=1, seg_len=8, distance=2, vocab=16, batch=32, lr=3e-3, **kw):
    """Train on fresh episodes with truncated BPTT over the whole episode; return accuracy."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, n_layer=1, d_model=32, n_head=2, context_len=seg_len)
    if arch == "dnc":
        cfg.update({"mem_slots": 8, "mem_width": 16, "num_reads": 1, "mem_kl": False, **kw})
    model = memlm.build(arch, **cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):  # bptt_segments = distance + 1: the gradient spans the dependency
        x, y = recall_episodes(g, batch, seg_len, distance, vocab)
        state = model.init_state(batch)
        for s in range(distance + 1):
            out = model(x[:, s], targets=y[:, s], state=state)
            state = out.state
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    x, y = recall_episodes(torch.Generator().manual_seed(10_000), 256, seg_len, distance, vocab)
    with torch.no_grad():
        state = model.init_state(256)
        for s in range(distance + 1):
            out = model(x[:, s], state=state)
            state = out.state
    return (out.logits[:, 0].argmax(-1) == y[:, -1, 0]).float().mean().item()


@pytest.mark.slow
def test_dnc_recalls_a_fact_two_segments_back_and_dense_cannot():
    # one thread: the per-token loop is made of tiny ops that extra threads only slow down,
    # and a fixed reduction order keeps this seeded run identical on every machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dnc = train_recall("dnc", steps=300)
        dense = train_recall("gpt", steps=300)
    finally:
        torch.set_num_threads(threads)
    assert dense < 0.4  # chance is 0.25: the fact is outside its attention window
    assert dnc > 0.9


@pytest.mark.parametrize("links,masked", [(False, False), (True, True)])
def test_fused_write_and_address_equals_the_plain_ops(links, masked):
    """The eager loop's hand-written backward (`_WriteAndAddress`) against plain autograd over
    a whole segment: bit-identical values, gradients of every input equal to fp32 rounding."""
    from memlm.memory.dnc import _default_chunk, unit_rows

    b, n, w, r, t = 3, 8, 6, 2, 7
    g = torch.Generator().manual_seed(0)
    shapes = [(b, n, w), (b, t, w), (b, t, w), (b, t, w), (b, t, r), (b, t, 1), (b, t, 1),
              (b, t, r, w), (b, t, r, 3)]
    base = [torch.randn(*s, generator=g) for s in shapes]
    mask = torch.ones(b, t, 1, dtype=torch.bool)
    mask[1, 4:] = False

    def run(fused):
        args = [x.clone().requires_grad_() for x in base]
        m0, kw, e, v, f, ga, gw, kr, pi = args
        nl = n if links else 0
        out = _default_chunk(
            m0, m0.norm(dim=-1).reciprocal(), torch.zeros(b, n), torch.zeros(b, n),
            torch.zeros(b, r, n), torch.zeros(b, nl, nl), torch.zeros(b, nl),
            2 * unit_rows(kw), e.sigmoid(), v, f.sigmoid(), ga.sigmoid(),
            gw.sigmoid() * mask if masked else gw.sigmoid(), 3 * unit_rows(kr), pi.softmax(-1),
            mask if masked else None, links, masked, True, fused)
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum()
                   for o in out if o is not None and o.numel())
        loss.backward()
        return [o for o in out if o is not None], [x.grad for x in args]

    (ref_out, ref_grads), (out, grads) = run(False), run(True)
    for got, want in zip(out, ref_out):
        assert torch.equal(got, want)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compile_chunk_is_a_config_field_the_memory_uses():
    """`compile_chunk` (tokens per compiled call, default 8) reaches the memory; 0 is refused."""
    small = dict(vocab_size=32, n_layer=1, n_head=2, d_model=16, context_len=8, mem_slots=4,
                 mem_width=4, num_reads=1)
    assert memlm.build("dnc", **small).memory.compile_chunk == 8
    assert memlm.build("dnc", compile_chunk=3, **small).memory.compile_chunk == 3
    with pytest.raises(ConfigError, match="compile_chunk"):
        memlm.build("dnc", compile_chunk=0, **small)


def test_dnc_benchmark_refuses_bad_compile_chunks():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "dnc.py"), "--parts", "speed",
                           "--compile-chunks", "8,0"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dnc.py: error: --compile-chunks wants integers >= 1, got '8,0'"]
