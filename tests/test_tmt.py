"""TMT rebuilt causally: what each test proves is in its name and docstring.

The model is tiny (d_model 32, 2-3 layers) and sequences are short, but k and
the window are set below the sequence length so the mesh really is sparse and
the blockwise selection really crosses several query/key tiles.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import memlm
from memlm import testing
from memlm.errors import ConfigError
from memlm.memory.anchors import PersistentAnchors
from memlm.memory.early_exit import calibrate_exit_threshold
from memlm.memory.mesh_attention import (
    Bias,
    DecayBias,
    LeakyModeError,
    LeakyModeWarning,
    dense_reference_attention,
    mesh_attention,
)
from memlm.nn.loss import lm_loss

V = 61
SMALL = dict(vocab_size=V, n_layer=2, d_model=32, n_head=4, context_len=64, mesh_k=4,
             mesh_window=4, mesh_block_q=8, mesh_block_k=16, n_anchors=4, exit_min_layer=1)


def build(**overrides):
    return memlm.build("tmt", **{**SMALL, **overrides})


def force_exits(model, threshold: float = 0.5):
    """Give the exit classifiers random weights so that roughly half the tokens exit early."""
    g = torch.Generator().manual_seed(3)
    for clf in model.exits.classifiers.values():
        clf.weight.data = torch.randn(clf.weight.shape, generator=g).to(clf.weight.dtype)
        clf.bias.data.zero_()
    model.config.exit_threshold = threshold
    return model


def chunked_logits(model, ids: torch.Tensor, chunk: int, state=None) -> torch.Tensor:
    """Logits of `ids` fed through the KV cache `chunk` tokens at a time."""
    cache = model.make_cache(ids.shape[0], 8)  # small on purpose: the cache must grow
    outs = []
    for s in range(0, ids.shape[1], chunk):
        out = model(ids[:, s : s + chunk], state=state, cache=cache)
        state = out.state
        outs.append(out.logits)
    return torch.cat(outs, dim=1)


# ----- causality ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [
    {},
    {"decay": "fox"},
    {"decay": "alibi_learned+fox", "pos_emb": "rope"},
    {"decay": "none", "mesh_window": 0, "ffn_type": "swiglu"},
])
def test_tmt_is_causal_in_training_and_inference(variant):
    model = build(**variant)
    testing.assert_causal(model, V, 40)
    assert testing.check_generation_causality(model, V, prompt_len=13, new=10) < 1e-5


def test_tmt_stays_causal_with_early_exits_on():
    model = force_exits(build(n_layer=3)).eval()
    out = model(torch.randint(0, V, (2, 40)), trace=True)
    assert 0 < (out.trace["exit_layer"] < 3).float().mean() < 1  # some, not all, exit early
    for cut in (0, 13, 38):
        assert testing.check_causality(model, V, 40, cut=cut) < 1e-6


def test_faithful_mode_leaks_and_the_causality_check_catches_it():
    """Negative control: the original's all-positions kNN graph must FAIL the shared check."""
    with pytest.warns(LeakyModeWarning, match="LEAKY"):
        model = build(attn_mode="tmt_faithful_leaky")
    deviation = testing.check_causality(model, V, 40)
    assert deviation > 1e-3, f"the leak detector saw only {deviation:.2e}"
    out = model(torch.randint(0, V, (1, 20)), trace=True)
    assert out.trace["causal"] is False and out.trace["mode"] == "tmt_faithful_leaky"
    assert "LEAKY_noncausal" in out.metrics
    idx = out.trace["knn_idx.l1"].long()
    assert (idx > torch.arange(20)[:, None]).any()  # edges to the future exist
    with pytest.raises(LeakyModeError):
        model.make_cache(1, 32)
    with pytest.raises(LeakyModeError):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2)


def test_causal_mesh_edges_point_only_to_the_past_and_are_unique():
    """A8: every mesh index is <= i - window or -1, with no duplicates."""
    model = build().eval()
    w = SMALL["mesh_window"]
    trace = model(torch.randint(0, V, (2, 40)), trace=True).trace
    for layer in (1, 2):
        idx = trace[f"knn_idx.l{layer}"].long()
        pos = torch.arange(40)[None, None, :, None]
        assert ((idx == -1) | (idx <= pos - w)).all()
        real = idx.clamp(min=-1)
        for row in real.reshape(-1, real.shape[-1]).tolist():
            picked = [j for j in row if j >= 0]
            assert len(picked) == len(set(picked))
        # a query past the window with enough history fills all k slots
        assert (idx[:, :, 20:] >= 0).all()


@pytest.mark.slow
def test_random_tokens_cannot_beat_the_vocabulary_size():
    """A3: on uniform random tokens a causal model cannot predict; the leaking one can.

    Same data, steps and seed for both. The causal model's held-out perplexity
    stays at about V; the faithful (leaking) model, which can look at the next
    token through its kNN graph, collapses far below V: a negative control
    proving the probe can tell the two apart. The faithful mode is the whole
    original model, whose positions live in the residual stream (not in Q/K), so
    it needs ~200 steps before it exploits the leak (at 60 it is still near V).
    """
    v, s = 32, 32

    def trained_ppl(mode: str) -> float:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LeakyModeWarning)
            model = memlm.build("tmt", **{**SMALL, "vocab_size": v, "context_len": s,
                                          "mesh_k": s, "mesh_window": 0, "pos_emb": "rope",
                                          "attn_mode": mode})
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(250):
            ids = torch.randint(0, v, (16, s + 1), generator=g)
            loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        ids = torch.randint(0, v, (32, s + 1), generator=g)
        with torch.no_grad():
            return math.exp(model(ids[:, :-1], targets=ids[:, 1:]).lm_loss.item())

    assert trained_ppl("mesh") >= 0.9 * v
    assert trained_ppl("tmt_faithful_leaky") < 0.8 * v


# ----- cache, exits, batch ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", [{}, {"decay": "alibi_learned+fox", "pos_emb": "rope"}])
def test_chunked_prefill_and_decode_equal_the_full_forward(variant):
    """A6 in fp64: any chunking of the cache path equals one full forward, exits on and off."""
    assert_cache_equals_full_forward(build(n_layer=3, **variant).double().eval(),
                                     torch.randint(0, V, (2, 30)))


def assert_cache_equals_full_forward(model, ids: torch.Tensor) -> None:
    """Prefill in chunks of 1, 7 and 30 tokens equals one full forward (1e-10, fp64), with
    the exits off and then on."""
    for exits in (False, True):
        if exits:
            force_exits(model)
        with torch.no_grad():
            full = model(ids).logits
            for chunk in (1, 7, 30):
                assert (chunked_logits(model, ids, chunk) - full).abs().max() < 1e-10


def test_skipping_exits_equal_the_compute_all_reference():
    """A11: really skipping exited tokens gives the same logits as computing everything."""
    model = force_exits(build(n_layer=3)).double().eval()
    ids = torch.randint(0, V, (3, 40))
    with torch.no_grad():
        skipped = model(ids, trace=True)
        model.config.exit_skip = False
        reference = model(ids).logits
        model.config.exit_skip = True
        model.config.exit_threshold = None
        full_depth = model(ids).logits
    assert (skipped.logits - reference).abs().max() < 1e-10
    exited = skipped.trace["exit_layer"] < 3
    assert exited.any()
    assert (skipped.logits - full_depth).abs().amax(-1)[exited].min() > 0  # exits matter


def test_early_exits_execute_fewer_flops():
    """A10: exited tokens really skip work; counted FLOPs of the forward and of decoding."""
    model = build(n_layer=4, d_model=64, context_len=128).eval()
    ids = torch.randint(0, V, (2, 64))

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    def decode_flops() -> int:
        cache = model.make_cache(2, 80)
        model(ids, cache=cache)
        return flops(lambda: model(ids[:, :1], cache=cache))

    full, full_step = flops(lambda: model(ids)), decode_flops()
    model.config.exit_threshold = 0.0  # every token exits at the first eligible layer
    early, early_step = flops(lambda: model(ids)), decode_flops()
    assert early < 0.6 * full
    assert early_step < 0.6 * full_step


def test_calibration_picks_a_threshold_and_full_depth_before_it():
    model = build(n_layer=3).eval()
    ids = torch.randint(0, V, (2, 24))
    assert model.config.exit_threshold is None
    assert (model(ids, trace=True).trace["exit_layer"] == 3).all()  # uncalibrated: full depth
    result = calibrate_exit_threshold(model, [ids], eps=0.05, grid=(0.9, 0.5, 0.1, 0.0))
    assert [r["lambda"] for r in result["table"]] == [0.9, 0.5, 0.1, 0.0]
    chosen = result["lambda"]
    assert model.config.exit_threshold == chosen
    if chosen is not None:
        row = next(r for r in result["table"] if r["lambda"] == chosen)
        assert row["agreement"] >= 0.95


def test_rows_of_a_batch_do_not_affect_each_other():
    """A4 in eval and in the training forward (exit-layer sampling is per batch, not per row)."""
    model = build()
    assert testing.check_batch_independence(model, V, 40) == 0.0
    force_exits(model)
    assert testing.check_batch_independence(model, V, 40) == 0.0
    a = torch.randint(0, V, (3, 40))
    b = a.clone()
    b[1:] = torch.randint(0, V, (2, 40))
    model.train()
    torch.manual_seed(0)
    la = model(a, targets=a).logits
    torch.manual_seed(0)
    lb = model(b, targets=b).logits
    assert torch.equal(la[0], lb[0])


# ----- the pieces ---------------------------------------------------------------------------------


def test_mesh_equals_dense_causal_attention_when_k_covers_every_key():
    """A7: with k >= S, mesh attention (window, anchors, decay) is exact causal attention."""
    torch.manual_seed(0)
    b, h, s, d = 2, 3, 37, 8
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    decay = DecayBias("alibi_learned+fox", h, 16).double()
    with torch.no_grad():
        decay.fox_a.normal_()
    logf = decay.log_forget(torch.randn(b, s, 16, dtype=torch.float64))
    bias = Bias(decay.slopes(), logf.cumsum(-1))
    anchors = PersistentAnchors(h, 5, d).double()
    qpos = torch.arange(s).expand(b, s)
    ref = dense_reference_attention(q, k, v, qpos, bias, anchors.keys, anchors.values)
    for window, block_q, block_k in ((0, 8, 16), (3, 5, 7), (6, 64, 64)):
        out, _ = mesh_attention(q, k, v, qpos, bias, topk=s, window=window, block_q=block_q,
                                block_k=block_k, anchor_k=anchors.keys, anchor_v=anchors.values)
        assert (out - ref).abs().max() < 1e-10
    # below the dense limit (k < S) the tiles, checkpointing and gathers still give exact grads
    out, info = mesh_attention(q, k, v, qpos, bias, topk=4, window=3, block_q=5, block_k=7)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    mask = torch.full((b, h, s, s), float("-inf"), dtype=torch.float64)
    idx = info["idx"]
    win = qpos[:, None, :, None] - torch.arange(3)
    for sel in (idx, win.expand(b, h, s, 3)):
        src = torch.zeros(sel.shape, dtype=torch.float64).masked_fill(sel < 0, float("-inf"))
        mask.scatter_reduce_(-1, sel.clamp(min=0), src, reduce="amax")
    logits = q @ k.transpose(-1, -2) / math.sqrt(d) + bias.grid(qpos, 0, s, torch.float64) + mask
    dense = logits.softmax(-1) @ v
    assert (out - dense).abs().max() < 1e-10
    for g1, g2 in zip(grads, torch.autograd.grad(dense.square().sum(), (q, k, v))):
        assert (g1 - g2).abs().max() < 1e-10


class _SquareWatch(TorchDispatchMode):
    """Records every tensor produced with two or more dimensions >= `limit`."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t) and sum(n >= self.limit for n in t.shape) >= 2:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def test_no_sequence_by_sequence_tensor_is_ever_built():
    """A9 guard: forward and backward of a mesh layer never materialise an S x S-like tensor."""
    s = 512
    q, k, v = (torch.randn(1, 2, s, 8, requires_grad=True) for _ in range(3))
    bias = Bias(DecayBias("alibi_learned", 2, 8).slopes())
    qpos = torch.arange(s)[None]
    with _SquareWatch(s // 2) as watch:
        out, _ = mesh_attention(q, k, v, qpos, bias, topk=8, window=16, block_q=64, block_k=128)
        out.sum().backward()
    assert watch.seen == []


def test_decay_bias_depends_on_distance_only():
    """A12: the same i - j gets the same bias in short and long sequences; ALiBi is <= 0."""
    decay = DecayBias("alibi_learned", 4, 16)
    bias = Bias(decay.slopes())
    short = bias.grid(torch.tensor([[10]]), 0, 11, torch.float32)
    long = bias.grid(torch.tensor([[4000]]), 3990, 4001, torch.float32)
    assert torch.equal(short, long)
    assert (short <= 0).all() and (decay.slopes() >= 0).all()
    assert (short[..., 1:] >= short[..., :-1]).all()  # weaker penalty for nearer keys
    fox = DecayBias("fox", 4, 16)  # at init FoX equals ALiBi
    logf = fox.log_forget(torch.randn(1, 12, 16))
    assert torch.allclose(logf, -decay.slopes()[None, :, None].expand(1, 4, 12), atol=1e-6)


def test_dual_ffn_costs_the_same_as_the_dense_ffn():
    """A13: dual-stream and SwiGLU FFNs match the 4D GELU FFN in counted FLOPs and parameters."""
    from memlm.models.tmt import make_ffn

    d = 64
    x = torch.randn(1, 10, d)
    costs = {}
    for kind in ("dense", "dual", "swiglu"):
        ffn = make_ffn(memlm.build("tmt", **{**SMALL, "d_model": d}, ffn_type=kind).config)
        with FlopCounterMode(display=False) as counter:
            ffn(x)
        costs[kind] = (counter.get_total_flops(), sum(p.numel() for p in ffn.parameters()))
        assert counter.get_total_flops() == 2 * 10 * ffn.macs_per_token
    for kind in ("dual", "swiglu"):
        for got, want in zip(costs[kind], costs["dense"]):
            assert abs(got - want) / want < 0.01, (kind, costs)


def test_anchors_are_plain_parameters_and_forward_writes_nothing():
    """A5/A14: no EMA or in-place write touches a parameter in train or eval forward."""
    model = build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, V, (2, 20))
    model.train()
    model(ids, targets=ids)
    model.eval()
    model(ids, trace=True)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    from memlm.train.optim import param_groups

    no_decay = {id(p) for p in param_groups(model, 0.1)[1]["params"]}
    anchors = model.blocks[0].attn.anchors
    assert id(anchors.keys) in no_decay and id(anchors.values) in no_decay
    assert anchors.max_pairwise_cosine() < 0.99


def test_reported_loss_is_the_honest_final_cross_entropy():
    """A16: lm_loss is exp-able CE of the returned logits; aux losses are added, not mixed in."""
    model = build()
    ids = torch.randint(0, V, (2, 21))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    assert out.aux_losses and all(v > 0 for v in out.aux_losses.values())
    assert torch.allclose(out.lm_loss, lm_loss(out.logits, ids[:, 1:]))
    assert torch.allclose(out.loss, out.lm_loss + sum(out.aux_losses.values()))
    force_exits(model).eval()
    out = model(ids[:, :-1], targets=ids[:, 1:])
    assert out.aux_losses == {} and "exit_mean_layers" in out.metrics
    assert torch.allclose(out.loss, F.cross_entropy(out.logits.reshape(-1, V), ids[:, 1:].reshape(-1)))


def test_tracing_does_not_change_logits_and_eval_is_deterministic():
    """A18, plus the trace format."""
    model = force_exits(build(n_layer=3)).eval()
    ids = torch.randint(0, V, (2, 30))
    plain = model(ids).logits
    traced = model(ids, trace=True)
    assert torch.equal(plain, traced.logits) and torch.equal(plain, model(ids).logits)
    tr = traced.trace
    assert tr["causal"] is True and tr["exit_layer"].shape == (2, 30)
    assert tr["confidence"].shape == (3, 2, 30) and tr["decay_slope"].shape == (3, 4)
    assert tr["knn_idx.l1"].shape == (2, 4, 30, 4) and tr["attn_mass.l1"].shape == (2, 4, 30, 4)
    assert torch.allclose(tr["attn_mass.l1"].float().sum(-1), torch.ones(2, 4, 30), atol=1e-2)
    assert (tr["macs"] > 0).all()
    # exit_mask[l] marks tokens that skipped layer l + 1: exactly those with exit_layer <= l
    layers = torch.arange(1, 4)[:, None, None]
    assert torch.equal(tr["exit_mask"], tr["exit_layer"][None].long() < layers)


def test_save_load_determinism_and_gradients():
    model = build(decay="alibi_learned+fox")
    assert testing.check_save_load(model, torch.randint(0, V, (2, 20))) == 0.0
    assert testing.params_without_grad(model, torch.randint(0, V, (2, 21))) == []
    curve = testing.loss_curve(lambda: build(), V, 16)
    assert curve == testing.loss_curve(lambda: build(), V, 16)


def test_bad_settings_get_clear_errors():
    with pytest.raises(ConfigError, match="decay"):
        build(decay="exponential")
    with pytest.raises(ConfigError, match="tmt-xmem"):
        build(xmem_mode="ema_slots")
    with pytest.raises(ConfigError, match="pos_emb"):
        build(pos_emb="learned")


# ----- cross-segment memory -------------------------------------------------------------------------


def build_xmem(**overrides):
    return memlm.build("tmt-xmem", **{**SMALL, "doc_sep_id": 0, **overrides})


@pytest.mark.parametrize("mesh", [{}, {"mesh_mode": "routed", "mesh_clusters": 3, "mesh_bucket": 5}])
def test_cross_segment_memory_reads_only_the_past_of_its_own_row(mesh):
    """A15: segment 2 uses segment 1's memory; rows, resets and documents stay separate."""
    model = build_xmem(**mesh).double().eval()
    assert model.is_stateful
    ids = torch.randint(1, V, (2, 48))
    fresh = model.init_state(2)
    with torch.no_grad():
        s1 = model(ids[:, :24], state=fresh).state
        with_mem = model(ids[:, 24:], state=s1).logits
        without = model(ids[:, 24:], state=fresh).logits
        assert (with_mem - without).abs().max() > 1e-4  # the memory is read
        # the cache path reads the same memory and returns the same next state
        inc = chunked_logits(model, ids[:, 24:], 5, state=s1)
        assert (inc - with_mem).abs().max() < 1e-10
        # resetting row 0 equals a fresh start for row 0 and leaves row 1 alone
        reset = model(ids[:, 24:], state=model.reset_state_rows(s1, torch.tensor([True, False])))
        assert torch.equal(reset.logits[0], without[0]) and torch.equal(reset.logits[1], with_mem[1])
        # another row's memory never leaks in
        swapped = {"slots": s1["slots"].clone(), "written": s1["written"]}
        swapped["slots"][:, 1] = 0
        assert torch.equal(model(ids[:, 24:], state=swapped).logits[0], with_mem[0])
        # a query after a document separator does not read the older document's slots
        sep = ids[:, 24:].clone()
        sep[:, 0] = 0
        mass = model(sep, state=s1, trace=True).trace["attn_mass.l1"][..., 3].float()
        assert (mass[:, :, 0] > 0).all() and (mass[:, :, 1:] == 0).all()
        assert not model(sep[:, :1], state=s1).state["written"].any()  # ends on a separator
    testing.assert_causal(model, V, 30, state_fn=lambda n: s1_for(model, n))


def s1_for(model, batch: int):
    """A non-empty memory state for `batch` rows (written from a fixed random segment)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, V, (batch, 16), generator=g)
    with torch.no_grad():
        return model(ids, state=model.init_state(batch)).state


def test_tmt_inspector_prints_exits_and_draws_the_knn_graph(tmp_path):
    from memlm.registry import INSPECTORS

    model = force_exits(build(n_layer=3, vocab_size=128)).eval()
    text = "Mary went to the kitchen."
    ids = torch.tensor([[ord(c) for c in text]])
    report = INSPECTORS.get("tmt")(model, list(text), ids, model(ids, trace=True), tmp_path,
                                   None, True)
    assert "future_edge_frac=0.000" in report and "exit histogram" in report
    assert (tmp_path / "tmt_exit_layers.png").exists()
    assert list(tmp_path.glob("tmt_knn_l*.png"))


def test_calibrate_command_sets_and_saves_the_exit_threshold(tmp_path, capsys):
    """`memlm calibrate RUN --data TEXT --out DIR` picks lambda on held-out text and saves it."""
    from memlm.cli import main
    from memlm.config import RunConfig
    from memlm.train.trainer import train

    def run_of(arch: str, **model) -> str:
        cfg = RunConfig.from_dict({
            "model": {"arch": arch, "n_layer": 3, "d_model": 32, "n_head": 2, "context_len": 16,
                      **model},
            "train": {"max_steps": 3, "batch_size": 4, "precision": "fp32"},
            "data": {"source": "builtin:recall:chars=3000", "tokenizer": "byte"}})
        train(cfg, tmp_path / arch, progress=False)
        return str(tmp_path / arch)

    tmt = run_of("tmt", mesh_window=4, mesh_k=4, mesh_block_q=8, mesh_block_k=8, exit_min_layer=1)
    out = tmp_path / "calibrated"
    assert main(["calibrate", tmt, "--data", "builtin:recall:chars=2000", "--windows", "8",
                 "--eps", "0.5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "argmax agreement" in text and "8 windows of 16 tokens" in text
    saved = memlm.load(out).config.exit_threshold
    if saved is None:
        assert "keeps running at full depth" in text
    else:
        assert f"chosen lambda = {saved}" in text
    assert (out / "memlm_tokenizer.json").exists()
    # a model without early exit is refused with the reason
    gpt = run_of("gpt")
    assert main(["calibrate", gpt, "--data", "builtin:recall:chars=2000"]) != 0
    assert "has no early exit" in capsys.readouterr().err
