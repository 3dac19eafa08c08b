"""TMT's routed mesh (`mesh_mode="routed"`): online k-means routing, causal, cached, reproducible.

The routed set of a query is its cluster-mates among the last `bucket` tokens of
its cluster (minus the window). These tests pin that rule against a brute-force
S x S reference, run the causality audit on it, show that the audit catches the
tempting non-causal bucketing, and check that the centroids move only after a
training step, travel with checkpoints and follow the seed.
"""

from __future__ import annotations

import math

import pytest
import torch

import memlm
from memlm import testing
from memlm.errors import ConfigError
from memlm.inspect.tmt import trace_summary
from memlm.memory import mesh_attention as mesh_mod
from memlm.memory.mesh_attention import Bias, ExtraEntries, alibi_slopes, mesh_attention
from memlm.testing.audit import all_passed, audit, format_audit

V = 61
ROUTED = dict(vocab_size=V, n_layer=2, d_model=32, n_head=4, context_len=64, mesh_window=4,
              mesh_block_q=8, n_anchors=4, exit_min_layer=1, mesh_mode="routed",
              mesh_clusters=3, mesh_bucket=5)


def build(**overrides):
    return memlm.build("tmt", **{**ROUTED, **overrides})


def routed_reference(q, k, v, bias, route, bucket, window, anchor_k=None, anchor_v=None):
    """The rule written as one S x S mask: window, or same cluster within the last `bucket`."""
    b, h, t, d = q.shape
    pos = torch.arange(t)
    same = route[..., :, None] == route[..., None, :]
    rank = (same & (pos[None, :] <= pos[:, None])).sum(-1)  # rank of i among its cluster-mates
    dist = pos[:, None] - pos[None, :]
    routed = same & (dist >= window) & (rank[..., :, None] - rank[..., None, :] < bucket)
    allowed = routed | ((dist >= 0) & (dist < window))
    s = q @ k.transpose(-1, -2) / math.sqrt(d) + bias.grid(pos.expand(b, t), 0, t, q.dtype)
    s = s.masked_fill(~allowed, float("-inf"))
    values = v
    if anchor_k is not None:
        s = torch.cat([torch.einsum("bhqd,hmd->bhqm", q, anchor_k) / math.sqrt(d), s], dim=-1)
        values = torch.cat([anchor_v.expand(b, -1, -1, -1), v], dim=2)
    return s.softmax(-1) @ values


def _inputs(t: int = 45, b: int = 2, h: int = 3, d: int = 8, clusters: int = 3):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for _ in range(3))
    route = torch.randint(0, clusters, (b, h, t), generator=g)
    return q, k, v, route


@pytest.mark.parametrize("window,bucket", [(0, 4), (3, 4), (6, 9), (1, 1), (11, 3)])
def test_routed_attention_equals_the_brute_force_rule(window, bucket):
    """fp64: the tiled full forward and the gathered path both equal the S x S reference."""
    q, k, v, route = _inputs()
    b, h, t, d = q.shape
    anchor_k, anchor_v = torch.randn(h, 4, d, dtype=q.dtype), torch.randn(h, 4, d, dtype=q.dtype)
    for bias in (Bias(alibi_slopes(h).double()),
                 Bias(None, (0.1 * torch.randn(b, h, t, dtype=q.dtype)).cumsum(-1)), Bias()):
        ref = routed_reference(q, k, v, bias, route, bucket, window, anchor_k, anchor_v)
        qpos = torch.arange(t).expand(b, t)
        kw = dict(topk=0, window=window, block_q=5, mode="routed", route=route, bucket=bucket,
                  anchor_k=anchor_k, anchor_v=anchor_v)
        full, info = mesh_attention(q, k, v, qpos, bias, **kw)
        assert (full - ref).abs().max() < 1e-12
        assert torch.allclose(info["mass"].sum(-1), torch.ones(b, h, t, dtype=q.dtype))
        perm = torch.randperm(t, generator=torch.Generator().manual_seed(1))
        shuffled, sinfo = mesh_attention(q[:, :, perm], k, v, qpos[:, perm], bias, **kw)
        assert (shuffled - ref[:, :, perm]).abs().max() < 1e-12
        assert torch.equal(sinfo["idx"], info["idx"][:, :, perm])
        tail, _ = mesh_attention(q[:, :, 20:], k, v, qpos[:, 20:], bias, **kw)  # cache-like
        assert (tail - ref[:, :, 20:]).abs().max() < 1e-12


def test_routed_selection_points_to_the_past_and_outside_the_window():
    q, k, v, route = _inputs()
    b, h, t, _ = q.shape
    _, info = mesh_attention(q, k, v, torch.arange(t).expand(b, t), Bias(), topk=0, window=3,
                             block_q=8, mode="routed", route=route, bucket=6)
    idx, pos = info["idx"], torch.arange(t)[None, None, :, None]
    ok = idx >= 0
    assert ok.any()
    assert (idx[ok] <= (pos - 3).expand_as(idx)[ok]).all()
    same = route.gather(2, idx.clamp(min=0).flatten(2)).view_as(idx) == route[..., None]
    assert same[ok].all()


def test_extra_entries_are_read_the_same_way_in_the_routed_mode():
    """xmem entries join the same softmax: full, shuffled and cache-like runs agree."""
    q, k, v, route = _inputs()
    b, h, t, d = q.shape
    extra = ExtraEntries(torch.randn(b, h, 2, d, dtype=q.dtype), torch.randn(b, h, 2, d, dtype=q.dtype),
                         torch.zeros(h, dtype=q.dtype), torch.rand(b, t) > 0.5)
    qpos = torch.arange(t).expand(b, t)
    kw = dict(topk=0, window=3, block_q=5, mode="routed", route=route, bucket=4)
    full, info = mesh_attention(q, k, v, qpos, Bias(), extra=extra, **kw)
    tail_extra = ExtraEntries(extra.keys, extra.values, extra.offset, extra.allowed[:, 17:])
    tail, _ = mesh_attention(q[:, :, 17:], k, v, qpos[:, 17:], Bias(), extra=tail_extra, **kw)
    assert (tail - full[:, :, 17:]).abs().max() < 1e-12
    assert (info["mass"][..., 3][~extra.allowed[:, None].expand(b, h, t)] == 0).all()


# ----- the model: causality, cache ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["routed", "exact"])
@pytest.mark.parametrize("bias_kind", ["alibi", "fox", "none"])
def test_short_dense_path_equals_the_tiled_paths(mode, bias_kind):
    """fp64: `dense_below` (one masked attention) reads the same keys with the same logits."""
    q, k, v, route = _inputs()
    b, h, t, d = q.shape
    bias = {"alibi": Bias(alibi_slopes(h).double()),
            "fox": Bias(None, (0.1 * torch.randn(b, h, t, dtype=q.dtype)).cumsum(-1)),
            "none": Bias()}[bias_kind]
    extra = ExtraEntries(torch.randn(b, h, 2, d, dtype=q.dtype), torch.randn(b, h, 2, d, dtype=q.dtype),
                         torch.randn(h, dtype=q.dtype), torch.rand(b, t) > 0.5)
    anchors = dict(anchor_k=torch.randn(h, 4, d, dtype=q.dtype),
                   anchor_v=torch.randn(h, 4, d, dtype=q.dtype))
    qpos = torch.arange(t).expand(b, t)
    for window, topk in ((3, 5), (0, 4), (5, 60)):
        kw = dict(topk=topk, window=window, block_q=5, block_k=7, mode=mode, route=route,
                  bucket=4, extra=extra, **anchors)
        tiled, _ = mesh_attention(q, k, v, qpos, bias, **kw)
        short, _ = mesh_attention(q, k, v, qpos, bias, want_selection=False, dense_below=t, **kw)
        assert (tiled - short).abs().max() < 1e-12


@pytest.mark.parametrize("variant", [
    {},
    {"mesh_dense_below": 0},
    {"decay": "fox"},
    {"decay": "alibi_learned+fox", "pos_emb": "rope", "mesh_dense_below": 0},
    {"decay": "none", "mesh_window": 0, "n_anchors": 0},
])
def test_routed_tmt_is_causal_in_training_and_inference(variant):
    model = build(**variant)
    testing.assert_causal(model, V, 40)
    assert testing.check_generation_causality(model, V, prompt_len=13, new=10) < 1e-5


def test_routed_tmt_passes_the_audit():
    torch.manual_seed(0)
    results = audit(build(), vocab_size=16, seq_len=32, floor_steps=40)
    assert all_passed(results), format_audit(results)
    assert not any(r.skipped for r in results)  # the cache probe really ran


def test_position_only_bucketing_leaks_and_the_audit_catches_it(monkeypatch):
    """Planted leak: attend to the whole sorted tile, masked by position only (the shortcut).

    Future tokens change how many tokens fall in lower clusters, which shifts
    the tile boundaries of earlier queries; the future-perturbation probe must see it.
    """
    torch.manual_seed(0)
    model = build(mesh_bucket=4, mesh_clusters=4, mesh_dense_below=0)  # the tiled full forward
    assert all_passed(audit(model, vocab_size=16, seq_len=32, floor=False))
    monkeypatch.setattr(mesh_mod, "_sorted_band",
                        lambda r, device: torch.ones(r, 2 * r, dtype=torch.bool, device=device))
    assert testing.check_causality(model, V, 40, cut=10) > 1e-3
    results = audit(model, vocab_size=16, seq_len=32, floor=False)
    assert not all_passed(results)
    assert any(r.name.startswith("future perturbation") and not r.passed for r in results)


@pytest.mark.parametrize("variant", [{}, {"mesh_dense_below": 0},
                                     {"decay": "alibi_learned+fox", "pos_emb": "rope"}])
def test_routed_cache_equals_the_full_forward(variant):
    """fp64: prefill in chunks and token-by-token decoding give the full forward's logits."""
    from tests.test_tmt import assert_cache_equals_full_forward

    ids = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(2))
    assert_cache_equals_full_forward(build(n_layer=3, **variant).double().eval(), ids)


def test_routed_skipping_exits_equal_the_compute_all_reference():
    from tests.test_tmt import force_exits

    model = force_exits(build(n_layer=3)).double().eval()
    ids = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        skipped = model(ids).logits
        model.config.exit_skip = False
        reference = model(ids).logits
    assert (skipped - reference).abs().max() < 1e-10


def test_routed_layer_builds_no_sequence_by_sequence_tensor():
    """Forward and backward of a routed mesh layer stay O(S (window + bucket))."""
    from tests.test_tmt import _SquareWatch

    s = 512
    q, k, v = (torch.randn(1, 2, s, 8, requires_grad=True) for _ in range(3))
    route = torch.randint(0, 4, (1, 2, s))
    with _SquareWatch(s // 2) as watch:
        out, _ = mesh_attention(q, k, v, torch.arange(s)[None], Bias(alibi_slopes(2)), topk=0,
                                window=16, block_q=64, mode="routed", route=route, bucket=32,
                                want_selection=False)
        out.sum().backward()
    assert watch.seen == []


# ----- centroids: updated after the step, saved, seeded -------------------------------------------


def _centroids(model) -> list[torch.Tensor]:
    return [b.attn.router.centroids.clone() for b in model.blocks]


def test_centroids_move_only_after_the_optimizer_step():
    model = build().train()
    ids = torch.randint(0, V, (2, 33))
    before = _centroids(model)
    with torch.no_grad():
        model.eval()
        model(ids[:, :-1])  # eval: nothing is collected
        model.train()
    model.on_train_step_end(1, 10)
    assert all(torch.equal(a, b) for a, b in zip(before, _centroids(model)))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    out.loss.backward()
    assert all(torch.equal(a, b) for a, b in zip(before, _centroids(model)))  # forward: no move
    model.on_train_step_end(1, 10)
    after = _centroids(model)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.allclose(c.norm(dim=-1), torch.ones(c.shape[:2])) for c in after)
    assert all(not b.attn.router.centroids.requires_grad for b in model.blocks)


def test_centroids_are_saved_loaded_and_follow_the_seed(tmp_path):
    def trained(seed: int):
        torch.manual_seed(seed)
        model = build()
        testing.loss_curve(lambda: model, V, 16, steps=3, seed=seed)
        return model

    a, b, c = trained(0), trained(0), trained(1)
    assert all(torch.equal(x, y) for x, y in zip(_centroids(a), _centroids(b)))
    assert not all(torch.equal(x, y) for x, y in zip(_centroids(a), _centroids(c)))
    assert "blocks.0.attn.router.centroids" in a.state_dict()
    a.save_pretrained(tmp_path / "run")
    loaded = memlm.load(tmp_path / "run")
    assert all(torch.equal(x, y) for x, y in zip(_centroids(a), _centroids(loaded)))
    ids = torch.randint(0, V, (2, 20))
    assert testing.check_save_load(a, ids) == 0.0
    # the centroids matter: other centroids route differently and change the logits
    with torch.no_grad():
        a.eval()
        base = a(ids).logits
        a.blocks[0].attn.router.centroids.copy_(c.blocks[0].attn.router.centroids)
        assert (a(ids).logits - base).abs().max() > 1e-6


@pytest.mark.parametrize("dense_below", [0, 512])
def test_routed_trace_is_causal_and_gradients_reach_every_parameter(dense_below):
    model = build(mesh_dense_below=dense_below).eval()
    ids = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        out = model(ids, trace=True)
        plain = model(ids).logits
    assert torch.equal(out.logits, plain)
    assert out.trace["knn_idx.l1"].shape == (2, 4, 30, 5)
    summary = trace_summary(out.trace, 2)
    assert all(layer["future_edge_frac"] == 0.0 for layer in summary["layers"].values())
    assert testing.params_without_grad(build(), torch.randint(0, V, (2, 41))) == []


def test_routed_settings_are_checked():
    with pytest.raises(ConfigError, match="mesh_mode"):
        build(mesh_mode="lsh")
    with pytest.raises(ConfigError, match="mesh_bucket"):
        build(mesh_bucket=0)
    with pytest.raises(ConfigError, match="mesh_centroid_decay"):
        build(mesh_centroid_decay=1.0)
