"""GMT (Graph Memory Transformer): the acceptance checklist of docs/gmt.md, one test per item.

The design the tests check is written out in docs/gmt.md ("The cell in detail"). Models are
tiny (d 64, 2 blocks, K 16) except where the reference fixes a size (gmt-v7-base's count).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import memlm
from memlm import testing
from memlm.errors import CheckpointError, ConfigError
from memlm.inspect.gmt import block_summaries, gini, inspect_gmt, routing_records
from memlm.memory.graph_cell import (
    CellRun,
    GraphCellConfig,
    GraphMemoryCell,
    cluster_loss,
    edge_contrast_loss,
    edge_entropy_loss,
    orthogonality_loss,
    routing_temperature,
)
from memlm.models.base import MemLM
from memlm.models.gmt import GMT, GMTContext
from memlm.types import IGNORE_INDEX

V = 97
SMALL = dict(vocab_size=V, n_layer=2, d_model=64, n_head=4, context_len=32,
             memory_slots=16, nav_dim=16)
AUX_NAMES = {"gmt_track", "gmt_ortho", "gmt_cluster", "gmt_edge_entropy", "gmt_edge_contrast"}


def small(**kw) -> GMT:
    return memlm.build("gmt", **{**SMALL, **kw})


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} changed"


def train_step(model, opt, ids, step=1, max_steps=10):
    out = model(ids[:, :-1], targets=ids[:, 1:])
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    model.on_train_step_end(step, max_steps)
    return out


def run_cell(cell, x, **run_kw):
    ctx = GMTContext(False, CellRun(**run_kw))
    return cell(x, ctx), ctx


# ----- structure ----------------------------------------------------------------------------
def test_every_ffn_is_a_graph_memory_cell_and_no_mlp_exists():
    model = memlm.build("gmt", vocab_size=97, n_layer=2, d_model=64, n_head=4)
    assert all(isinstance(b.ffn, GraphMemoryCell) for b in model.decoder.blocks)
    assert not [n for n, m in model.named_modules() if type(m).__name__ == "MLP"]
    widths = {m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert 4 * 64 not in widths  # no d -> 4d expansion anywhere
    attn = model.decoder.blocks[0].attn
    assert attn.qkv.bias is None and attn.proj.bias is None
    assert isinstance(attn.resid_dropout, torch.nn.Identity)


def test_gmt_v7_base_has_the_reference_parameter_count_and_frozen_momenta():
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = memlm.build("gmt", vocab_size=50257, n_layer=16, d_model=768, n_head=12,
                            context_len=1024)
    assert model.num_params() == 82_213_152
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 82_213_136
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen) == 16 and all(n.endswith("ffn.write_momentum") for n in frozen)
    assert sum(p.numel() for p in model.cells[0].parameters()) == 314_370
    # faithful mode learns the 16 momentum logits too: all 82,213,152 trainable
    assert small(faithful=True).cells[0].write_momentum.requires_grad


def test_config_errors_name_the_bad_value():
    with pytest.raises(ConfigError, match="graph_logits"):
        small(graph_logits="linear")
    with pytest.raises(ConfigError, match="temp_min"):
        small(temp_min=2.0)
    with pytest.raises(ConfigError, match="memory_slots"):
        small(memory_slots=1)


# ----- causality, cache, save/load, determinism, gradients ------------------------------------
@pytest.mark.parametrize("faithful", [False, True])
def test_no_position_sees_a_later_token_in_train_eval_or_generation(faithful):
    model = small(faithful=faithful)
    with model.frozen_memory():  # a faithful forward would otherwise rewrite C between runs
        testing.assert_causal(model, V, 24)
    if not faithful:
        assert testing.check_generation_causality(model, V) < 1e-5


def test_cached_greedy_generation_equals_uncached():
    model = small()
    prompt = torch.randint(0, V, (2, 5))
    assert torch.equal(model.generate(prompt, 20, use_cache=True),
                       model.generate(prompt, 20, use_cache=False))
    assert testing.check_cache_equivalence(model, V) < 1e-5


def test_save_load_keeps_memory_buffers_and_rejects_renamed_keys(tmp_path):
    model = small()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, opt, torch.randint(0, V, (4, 17)))  # usage/age/C away from init
    model.set_temperature(0.37)
    assert testing.check_save_load(model, torch.randint(0, V, (2, 16))) == 0.0
    model.save_pretrained(tmp_path / "m")
    loaded = MemLM.from_pretrained(tmp_path / "m")
    assert_same_state(snapshot(model), snapshot(loaded))
    assert loaded._steps_done == 1
    # a default checkpoint loads into a faithful model (same keys) and vice versa
    from memlm.io import load_weights, save_weights

    faithful = small(faithful=True)
    load_weights(faithful, tmp_path / "m" / "model.safetensors")
    assert torch.equal(faithful.cells[0].C, model.cells[0].C)
    save_weights(faithful, tmp_path / "f.safetensors")
    load_weights(small(), tmp_path / "f.safetensors")
    # a renamed key is rejected and named
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "f.safetensors"))
    tensors["decoder.blocks.0.ffn.centroids"] = tensors.pop("decoder.blocks.0.ffn.C")
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="decoder.blocks.0.ffn.C"):
        load_weights(small(), tmp_path / "bad.safetensors")


def test_training_is_deterministic():
    assert testing.loss_curve(small, V, 16, steps=3) == testing.loss_curve(small, V, 16, steps=3)


@pytest.mark.parametrize("faithful", [False, True])
def test_gradient_reaches_every_trainable_parameter(faithful):
    model = small(faithful=faithful)
    assert testing.params_without_grad(model, torch.randint(0, V, (2, 17))) == []
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in ("C", "E", "q_proj.weight", "k_proj.weight", "gate", "norm_c.weight"):
        assert f"decoder.blocks.0.ffn.{name}" in trainable
    # the write-momentum logit is frozen by default and learned only in faithful mode (G7)
    assert ("decoder.blocks.0.ffn.write_momentum" in trainable) == faithful


# ----- purity of evaluation (G1) ----------------------------------------------------------------
def test_eval_forward_no_grad_forward_and_generation_leave_memory_identical():
    model = small()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, opt, torch.randint(0, V, (4, 17)))
    before = snapshot(model)
    ids = torch.randint(0, V, (2, 16))
    model.eval()
    with torch.no_grad():
        model(ids, targets=ids, trace=True)
    model.train()
    with torch.no_grad():
        model(ids, targets=ids)
    model.generate(ids[:, :4], 12)
    model.generate(ids[:, :4], 12, use_cache=False)
    assert_same_state(before, snapshot(model))


def test_faithful_eval_forward_mutates_memory_unless_switched_off():
    ids = torch.randint(0, V, (2, 16))
    model = small(faithful=True).eval()
    c0, u0 = model.cells[0].C.detach().clone(), model.cells[0].usage.clone()
    with torch.no_grad():
        model(ids)
    assert not torch.equal(model.cells[0].C, c0)
    assert not torch.equal(model.cells[0].usage, u0)
    assert model.cells[0].age[0] == 1  # one write-back per forward call
    clean = small(faithful=True, eval_update_memory=False).eval()
    before = snapshot(clean)
    with torch.no_grad():
        clean(ids, targets=ids)
    assert_same_state(before, snapshot(clean))


def test_faithful_training_forward_rewrites_C_before_backward_and_keeps_no_statistics():
    model = small(faithful=True)
    c0 = model.cells[1].C.detach().clone()
    ids = torch.randint(0, V, (2, 17))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    assert not torch.equal(model.cells[1].C, c0)  # written inside forward (G2)
    out.loss.backward()  # no version-counter error, as in the reference
    assert float(model.cells[1].stat_ntok) == 0.0
    assert model.cells[0].cfg.graph_logits == "prob" and not model.cells[0].cfg.routing_fp32


# ----- routing equations ---------------------------------------------------------------------
def tiny_cell(**kw) -> GraphMemoryCell:
    torch.manual_seed(0)
    return GraphMemoryCell(GraphCellConfig(**{"d_model": 32, "n_slots": 8, "nav_dim": 8, **kw}))


def test_routing_rows_are_distributions_and_source_routing_is_float32():
    cell = tiny_cell()
    x = torch.randn(40, 32)
    c_hat = cell.centroids()
    p_src, _ = cell.source_routing(x, c_hat)
    A = cell.edge_probs()
    p_tgt = cell.target_routing(p_src, cell.query_scores(x, c_hat), A)
    ones = torch.ones(40)
    assert torch.allclose(p_src.sum(-1), ones, atol=1e-5)
    assert torch.allclose(p_tgt.sum(-1), ones, atol=1e-5)
    assert torch.allclose(A.sum(-1), torch.ones(8), atol=1e-5)
    assert torch.all(A.diagonal() == 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p_auto, _ = cell.source_routing(x, cell.centroids())
        assert p_auto.dtype == torch.float32
    assert torch.equal(p_auto, p_src)  # autocast does not touch memlm's routing (G13)
    faithful = tiny_cell(routing_fp32=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p_bf16, _ = faithful.source_routing(x, faithful.centroids())
    assert not torch.equal(p_bf16.float(), p_src)  # the reference routes in bf16


def test_graph_term_is_added_as_log_or_prob_as_configured():
    x = torch.randn(30, 32)
    for mode in ("log", "prob"):
        cell = tiny_cell(graph_logits=mode)
        with torch.no_grad():
            cell.q_proj.weight.zero_()
            c_hat = cell.centroids()
            p_src, _ = cell.source_routing(x, c_hat)
            pi = p_src @ cell.edge_probs()
            p_tgt = cell.target_routing(p_src, cell.query_scores(x, c_hat), cell.edge_probs())
        expected = pi if mode == "log" else pi.softmax(-1)
        assert torch.allclose(p_tgt, expected, atol=1e-6), mode


def test_initial_routing_is_near_uniform_and_edges_broad():
    k = 128
    cell = GraphMemoryCell(GraphCellConfig(d_model=256, n_slots=k, nav_dim=32))
    p_src, _ = cell.source_routing(torch.randn(512, 256), cell.centroids())
    h_src = -(p_src * p_src.log()).sum(-1).mean()
    assert h_src > math.log(k) - 0.05
    A = cell.edge_probs()
    h_edge = -(A * A.clamp_min(1e-12).log()).sum(-1).mean()
    assert math.log(k) - 0.8 <= h_edge <= math.log(k)


def test_displacement_norm_is_bounded_by_the_gate():
    cell = tiny_cell()
    with torch.no_grad():
        cell.gate.fill_(0.3)
        delta, _ = run_cell(cell, torch.randn(3, 10, 32))
    bound = torch.sigmoid(torch.tensor(0.3)) * math.sqrt(32) + 1e-4
    assert torch.all(delta.norm(dim=-1) <= bound)


def test_temperature_follows_the_schedule_and_changes_only_per_step():
    for p, tau in [(0.0, 1.0), (0.25, 0.439), (0.5, 0.240), (1.0, 0.100)]:
        assert abs(routing_temperature(p) - tau) < 1e-3
    model = small()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    assert all(float(c.temp) == 1.0 for c in model.cells)
    ids = torch.randint(0, V, (2, 17))
    model(ids[:, :-1], targets=ids[:, 1:])  # micro-batches of one step see the same tau
    assert all(float(c.temp) == 1.0 for c in model.cells)
    train_step(model, opt, ids, step=5, max_steps=20)
    assert all(abs(float(c.temp) - 0.439) < 1e-3 for c in model.cells)


# ----- write-back and usage (default mode) ---------------------------------------------------
def test_writeback_moves_the_routed_slot_by_the_momentum_and_renormalises():
    cell = tiny_cell()
    u = F.normalize(cell.centroids()[3].detach(), dim=0)  # a direction that routes to slot 3
    x = torch.stack([u * s for s in (0.5, 2.0, 7.0)])  # same direction, different norms
    with torch.no_grad():
        p_src, _ = cell.source_routing(x, cell.centroids())
    assert torch.all(p_src.argmax(-1) == 3)
    run_cell(cell, x, collect_stats=True)
    with torch.no_grad():  # stands in for optimizer.step(): rows leave the unit sphere
        cell.C.add_(0.1 * torch.randn_like(cell.C))
    after_step = cell.C.detach().clone()
    cell.apply_writeback()
    assert torch.allclose(cell.C.norm(dim=-1), torch.ones(8), atol=1e-5)
    expected3 = F.normalize(0.99 * after_step[3] + 0.01 * u, dim=0)
    assert torch.allclose(cell.C[3], expected3, atol=1e-6)
    others = [k for k in range(8) if k != 3]
    assert torch.allclose(cell.C[others], F.normalize(after_step[others], dim=-1), atol=1e-6)
    assert float(cell.stat_ntok) == 0.0 and torch.all(cell.age == 1)


def test_one_step_is_the_same_with_1_or_4_micro_batches():
    ids = torch.randint(0, V, (8, 17))
    results = []
    for n_micro in (4, 1):
        torch.manual_seed(0)
        model = small(lambda_cluster=0.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for chunk in ids.chunk(n_micro):
            out = model(chunk[:, :-1], targets=chunk[:, 1:])
            (out.loss / n_micro).backward()
        opt.step()
        model.on_train_step_end(1, 10)
        results.append(snapshot(model))
    for key, value in results[0].items():
        assert torch.allclose(value.float(), results[1][key].float(), atol=1e-5), key


def test_usage_ema_counts_only_non_pad_tokens():
    model = small()
    ids = torch.randint(0, V, (3, 17))
    targets = ids[:, 1:].clone()
    targets[0, 10:] = IGNORE_INDEX  # padding must not count
    with torch.no_grad():
        trace = model(ids[:, :-1], trace=True).trace
    keep = (targets != IGNORE_INDEX)
    usage_old = [c.usage.clone() for c in model.cells]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    out = model(ids[:, :-1], targets=targets)
    out.loss.backward()
    opt.step()
    model.on_train_step_end(1, 10)
    for i, cell in enumerate(model.cells):
        mean_p = trace["src_probs"][:, :, i][keep].mean(0)
        assert torch.allclose(cell.usage, 0.99 * usage_old[i] + 0.01 * mean_p, atol=1e-6)


# ----- auxiliary losses ------------------------------------------------------------------------
def test_auxiliary_losses_values_weights_and_sum():
    assert float(orthogonality_loss(torch.eye(8, 32))) == 0.0
    assert abs(float(edge_contrast_loss(torch.full((6, 6), 1 / 6))) - 1.0) < 1e-6
    broad = torch.full((128, 128), 1 / 127).fill_diagonal_(0.0)  # entropy ln 127 > 4.0
    assert float(edge_entropy_loss(broad, 4.0)) == 0.0
    assert float(cluster_loss(torch.full((64,), 1 / 64), 32.0)) == 0.0
    eight = torch.zeros(64)
    eight[:8] = 1 / 8  # N_eff = 8
    assert abs(float(cluster_loss(eight, 32.0)) - (32 / 8 - 1)) < 1e-4
    # every term is reported separately, already weighted, and summed into the loss
    model = small()
    ids = torch.randint(0, V, (2, 17))
    out = model(ids[:, :-1], targets=ids[:, 1:])
    assert set(out.aux_losses) == AUX_NAMES
    assert torch.allclose(out.loss, out.lm_loss + sum(out.aux_losses.values()))
    # tracking with a learnable momentum: descent raises sigma(mu) (documents G7)
    faithful = small(faithful=True)
    with faithful.frozen_memory():
        faithful(ids[:, :-1], targets=ids[:, 1:]).aux_losses["gmt_track"].backward()
    assert all(float(c.write_momentum.grad) < 0 for c in faithful.cells)
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    assert all(c.write_momentum.grad is None for c in model.cells)


# ----- maintenance ------------------------------------------------------------------------------
def test_dead_slot_is_reseeded_from_the_pool_with_fresh_adam_moments():
    model = small(maintenance_every=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.attach_optimizer(opt)
    ids = torch.randint(0, V, (4, 17))
    train_step(model, opt, ids, step=1)
    cell = model.cells[0]
    with torch.no_grad():
        cell.usage[5] = 1e-5  # slot 5 is dead
    train_step(model, opt, ids, step=2)  # this step collects a pool and ends with maintenance
    assert float(cell.usage[5]) == pytest.approx(1 / 16)
    assert float(cell.age[5]) == 0.0
    assert abs(float(cell.C[5].detach().norm()) - 1.0) < 1e-5
    state = opt.state[cell.C]
    assert torch.all(state["exp_avg"][5] == 0) and torch.all(state["exp_avg_sq"][5] == 0)
    assert torch.any(state["exp_avg"][4] != 0)


def test_reseeded_dead_slot_takes_a_pool_vector():
    cell = tiny_cell()
    pool = F.normalize(torch.randn(5, 32), dim=-1)
    with torch.no_grad():
        cell.usage[2] = 0.0
    reset = cell.maintain(torch.Generator().manual_seed(0), pool=pool)
    assert reset.tolist() == [k == 2 for k in range(8)]
    assert torch.isclose((pool @ cell.C[2]).max(), torch.tensor(1.0), atol=1e-5)


def test_duplicate_slots_merge_only_when_old_enough():
    cell = tiny_cell(centroid_cooldown=100)
    pool = F.normalize(torch.randn(5, 32), dim=-1)
    with torch.no_grad():
        cell.C[6] = cell.C[1] + 0.01 * torch.randn(32)
        cell.usage[1], cell.usage[6] = 0.2, 0.1
        cell.age.fill_(100.0)
        cell.age[6] = 99.0  # young: not merged
    assert not cell.maintain(torch.Generator().manual_seed(0), pool=pool).any()
    with torch.no_grad():
        cell.age[6] = 100.0
    reset = cell.maintain(torch.Generator().manual_seed(0), pool=pool)
    assert reset.tolist() == [k == 6 for k in range(8)]  # the less used of the pair
    assert torch.isclose((pool @ cell.C[6]).max(), torch.tensor(1.0), atol=1e-5)
    assert float(cell.age[6]) == 0.0 and float(cell.usage[6]) == pytest.approx(1 / 8)


def test_more_than_half_dead_reseeds_from_random_vectors():
    cell = tiny_cell()
    pool = F.normalize(torch.randn(3, 32), dim=-1)
    with torch.no_grad():
        cell.usage[:5] = 0.0
    cell.maintain(torch.Generator().manual_seed(0), pool=pool)
    assert (pool @ cell.C[:5].T).max() < 0.99
    assert torch.allclose(cell.C[:5].norm(dim=-1), torch.ones(5), atol=1e-5)


# ----- padding, DDP -------------------------------------------------------------------------------
def test_padding_changes_neither_loss_statistics_nor_metrics():
    ids = torch.randint(1, V, (2, 13))
    padded_ids = torch.cat([ids, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    targets = ids[:, 1:]
    padded_targets = torch.cat([targets, torch.full((2, 6), IGNORE_INDEX)], dim=1)
    results = []
    for inp, tgt in ((ids[:, :-1], targets), (padded_ids[:, :-1], padded_targets)):
        torch.manual_seed(0)
        model = small()
        out = model(inp, targets=tgt)
        stats = [torch.cat([getattr(c, n).reshape(-1) for n in GraphMemoryCell.STAT_BUFFERS])
                 for c in model.cells]
        model.eval()
        with torch.no_grad():
            metrics = model(inp, targets=tgt).metrics
        results.append((out.loss.detach(), stats, metrics))
    (l0, s0, m0), (l1, s1, m1) = results
    assert torch.allclose(l0, l1, atol=1e-6)
    for a, b in zip(s0, s1):
        assert torch.allclose(a, b, atol=1e-5)
    assert m0.keys() == m1.keys()
    for key in m0:
        assert torch.allclose(m0[key], m1[key], atol=1e-5), key


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from memlm.train.distributed import DistEnv, wrap_model

    torch.manual_seed(0)
    model = small(maintenance_every=1)
    ddp = wrap_model(model, DistEnv(rank=rank, world_size=world))  # as the trainer wraps it
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.attach_optimizer(opt)
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    local_stats_kept = True
    for step in (1, 2):
        ids = torch.randint(0, V, (2, 17), generator=g)
        alone = copy.deepcopy(model)  # the same micro-batches without DDP
        for _ in range(2):  # synced micro-batches: DDP broadcasts rank 0's buffers before
            ddp(ids[:, :-1], targets=ids[:, 1:]).loss.backward()  # the 2nd; stats must survive
            alone(ids[:, :-1], targets=ids[:, 1:])
        local_stats_kept &= all(torch.equal(a.stat_sum, b.stat_sum)
                                for a, b in zip(alone.cells, model.cells))
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            model.cells[0].usage[3] = 0.0  # force a reset: pools differ across ranks
        model.on_train_step_end(step, 2)
    memory = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
              if k.endswith(("ffn.C", "ffn.usage", "ffn.age"))}  # plain pickles
    queue.put((rank, (local_stats_kept, memory)))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_hold_identical_memory_and_keep_local_statistics():
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")  # fork after torch threads can deadlock
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=180) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    assert results[0][0] and results[1][0], "DDP overwrote a rank's write-back statistics"
    states = {rank: memory for rank, (_, memory) in results.items()}
    assert states[0].keys() == states[1].keys() and states[0]
    for key in states[0]:
        assert (states[0][key] == states[1][key]).all(), key


def test_collectives_come_from_the_trainer_side():
    """GMT syncs its memory only through the hooks it is handed; no torch.distributed inside."""
    import re
    from pathlib import Path

    from memlm.train.distributed import hand_collectives

    uses = re.compile(r"(import|from) torch\.distributed|torch\.distributed\.\w+\(|\bdist\.\w+\(")
    models_dir = Path(memlm.__file__).parent / "models"
    assert not [p.name for p in models_dir.glob("*.py") if uses.search(p.read_text())]
    torch.manual_seed(0)
    model = small(maintenance_every=1)
    assert not hasattr(model, "_ddp_params_and_buffers_to_ignore")  # set by the trainer side
    reduced, broadcast = [], []
    model.attach_collectives(lambda t: reduced.append(t), lambda t: broadcast.append(t.clone()))
    ids = torch.randint(0, V, (2, 9))
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    model.on_train_step_end(1, 2)  # write-back (reduced), then maintenance (broadcast)
    stats = [getattr(c, n) for c in model.cells for n in GraphMemoryCell.STAT_BUFFERS]
    assert len(reduced) == len(stats) and all(a is b for a, b in zip(reduced, stats))
    assert len(broadcast) == 4 * len(model.cells)  # C, usage, age and the reset flags per cell
    # the trainer's hook reaches a GMT wrapped inside another model, with DDP names prefixed
    rmt = memlm.build("rmt", vocab_size=V, n_layer=1, n_head=2, d_model=16, context_len=16,
                      segment_len=8, num_mem_tokens=2, backbone="gmt")
    hand_collectives(rmt)
    gmt = rmt.backbone.model
    assert gmt._reduce is not None and gmt._broadcast is not None
    assert rmt._ddp_params_and_buffers_to_ignore == [
        f"backbone.model.{name}" for name in gmt.rank_local_buffers()]
    assert set(gmt.rank_local_buffers()) <= set(dict(gmt.named_buffers()))


# ----- reference import -----------------------------------------------------------------------
# Proven against the original GMT v7 code with a golden fixture: tests/test_parity.py.


# ----- traces and inspection -------------------------------------------------------------------
def test_trace_holds_per_token_and_per_layer_records():
    model = small()
    ids = torch.randint(0, V, (1, 12))
    trace = model(ids, trace=True).trace
    assert trace["src_slot"].shape == (1, 12, 2) and trace["src_probs"].shape == (1, 12, 2, 16)
    assert torch.equal(trace["src_slot"], trace["src_probs"].argmax(-1))
    assert torch.allclose(trace["tgt_prob"], trace["tgt_probs"].max(-1).values)
    assert trace["usage"].shape == (2, 16) and trace["edges"].shape == (2, 16, 16)
    assert torch.all(trace["disp_norm"] > 0)
    assert model(ids).trace is None


def test_inspection_writes_routing_records_summaries_and_pictures(tmp_path):
    model = small()
    ids = torch.randint(0, V, (1, 10))
    tokens = [f"t{i}" for i in ids[0].tolist()]
    out = model(ids, trace=True)
    records = routing_records(out.trace, tokens)
    assert len(records) == 10 * 2
    probs = out.trace["src_probs"][0]
    for rec in records:
        assert rec["src_slot"] == int(probs[rec["position"], rec["block"] - 1].argmax())
        assert 0 <= rec["src_entropy"] <= math.log(16) + 1e-6
        assert 0 <= rec["tgt_entropy"] <= math.log(16) + 1e-6
    assert gini([7] + [0] * 15) == pytest.approx(1 - 1 / 16)
    assert gini([3] * 16) == 0.0
    collapsed = {k: v.clone() for k, v in out.trace.items()}
    collapsed["tgt_probs"][:] = F.one_hot(torch.tensor(4), 16).float()
    assert block_summaries(collapsed, tokens)[0]["collapse"]
    text = inspect_gmt(model, tokens, ids, out, tmp_path, layer=1, graph=True)
    assert "block 1" in text and "->" in text
    for name in ("gmt_path_block1.png", "gmt_usage_block1.png", "gmt_transitions_block1.png",
                 "gmt_routing.jsonl", "gmt_edges_block1.safetensors"):
        assert (tmp_path / name).stat().st_size > 0, name
    with pytest.raises(ConfigError, match="1..2"):
        inspect_gmt(model, tokens, ids, out, None, layer=3, graph=False)
    from memlm.registry import INSPECTORS

    assert INSPECTORS.get("gmt") is inspect_gmt


def test_eval_metrics_report_memory_diagnostics():
    model = small().eval()
    ids = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        metrics = model(ids, targets=ids).metrics
    for key in ("gmt_src_entropy", "gmt_tgt_top1_share", "gmt_graph_influence", "gmt_disp_norm",
                "gmt_n_eff", "gmt_dead", "gmt_edge_ent"):
        assert torch.isfinite(metrics[key]), key
    with torch.no_grad():  # the evaluator passes no targets: metrics still come back
        assert "gmt_src_entropy" in model(ids).metrics and "gmt_n_eff" in model(ids).metrics
    diag = model.memory_diagnostics()
    assert len(diag) == 2 and diag[0]["dead"] == 0 and diag[0]["gate"] == pytest.approx(0.731, 1e-3)


# ----- training through the shared trainer ----------------------------------------------------
def tiny_run(tmp_path, **train):
    from memlm.config import load_run_config

    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. the dog sat on the log. " * 200)
    cfg = load_run_config("gmt-tiny").with_overrides({
        "data.source": str(text), "data.tokenizer": "char", "data.cache_dir": str(tmp_path),
        "data.seq_len": 32, "train.batch_size": 8, "train.precision": "fp32",
        "model.maintenance_every": 3, **{f"train.{k}": v for k, v in train.items()}})
    return cfg


@pytest.mark.slow
def test_tiny_training_lowers_validation_loss(tmp_path):
    from memlm.train.trainer import train

    cfg = tiny_run(tmp_path, max_steps=200, eval_every=200, save_every=1000, eval_batches=4)
    before = train(cfg.with_overrides({"train.max_steps": 1}), progress=False).final["nll"]
    result = train(cfg, progress=False)
    assert result.final["nll"] < before - 0.5
    logged = [h for h in result.history if h["kind"] == "train"][-1]
    for name in AUX_NAMES:
        assert math.isfinite(logged[name]), name
    assert all(torch.isfinite(c.usage).all() for c in result.model.cells)


def test_resume_through_the_trainer_is_exact(tmp_path):
    """Write-back statistics, usage, age, tau and the step counter live in the checkpoint."""
    from memlm.train.trainer import train

    cfg = tiny_run(tmp_path, max_steps=6, eval_every=100, save_every=3, eval_batches=1,
                   log_every=1)
    full = train(cfg, tmp_path / "full", progress=False).model

    def crash_at_step_4(record):
        if record["kind"] == "train" and record["step"] == 4:
            raise KeyboardInterrupt  # killed after the step-3 checkpoint

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, callbacks=(crash_at_step_4,))
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False).model
    assert_same_state(snapshot(full), snapshot(resumed))
    assert float(resumed.cells[0].temp) == pytest.approx(routing_temperature(6 / 6))


def test_maintenance_is_seeded():
    def run():
        torch.manual_seed(0)
        model = small(maintenance_every=1)
        with torch.no_grad():
            for c in model.cells:
                c.usage[:3] = 0.0
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(model, opt, torch.randint(0, V, (4, 17), generator=torch.Generator().manual_seed(1)))
        return snapshot(model)

    assert_same_state(run(), run())


def test_faithful_copy_is_independent():
    model = small(faithful=True)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        model(torch.randint(0, V, (1, 8)))
    assert not torch.equal(model.cells[0].C, twin.cells[0].C)
