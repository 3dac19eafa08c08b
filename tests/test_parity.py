"""Parity with the original implementations, proven by golden fixtures.

Each fixture in tests/fixtures/ was written by tools/parity_fixtures.py from a
checkout of the original repository (its commit id is in the file's metadata):
weights under the original's own key names, input ids, and what the original
code computed. These tests load the weights through memlm's importers only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from memlm.convert import convert, read_state_dict
from memlm.errors import CheckpointError
from memlm.models.gmt import GMT

FIXTURES = Path(__file__).parent / "fixtures"
ATOL = 1e-5


def fixture(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    weights = load_file(str(FIXTURES / f"{name}.safetensors"))
    expected = load_file(str(FIXTURES / f"{name}.expected.safetensors"))
    with safe_open(str(FIXTURES / f"{name}.safetensors"), "pt") as f:
        meta = f.metadata()
    return weights, expected, meta


def test_fixtures_name_the_original_commit():
    for path in sorted(FIXTURES.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert len(meta["commit"]) == 40 and int(meta["commit"], 16) >= 0, path.name
        assert "/" in meta["repo"], path.name


# ----- GMT v7 ----------------------------------------------------------------------------------
def gmt_model(weights, meta, **overrides) -> GMT:
    cfg = json.loads(meta["config"])
    return convert_gmt(weights, n_head=cfg["n_heads"], dropout=0.0, attn_dropout=0.0, **overrides)


def convert_gmt(weights, **overrides) -> GMT:
    from memlm.convert import build_gmt_v7

    model = build_gmt_v7(dict(weights), overrides)
    assert isinstance(model, GMT)
    return model


def test_gmt_v7_state_dict_has_the_real_layout():
    weights, _, _ = fixture("gmt_v7")
    # what made the old importer raise on every real checkpoint
    assert "blocks.0.cell.diag_mask" in weights and "temp" in weights
    assert "lm_head.weight" in weights


def test_gmt_v7_logits_match_the_original():
    weights, exp, meta = fixture("gmt_v7")
    model = gmt_model(weights, meta, eval_update_memory=False).eval()
    ids = exp["input_ids"]
    with torch.no_grad():
        out = model(ids[:, :-1], targets=ids[:, 1:])
    torch.testing.assert_close(out.logits, exp["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.lm_loss, exp["loss"], atol=ATOL, rtol=0)


def test_gmt_v7_faithful_eval_writes_back_like_the_original():
    weights, exp, meta = fixture("gmt_v7")
    model = gmt_model(weights, meta).eval()
    ids = exp["input_ids"][:, :-1]
    with torch.no_grad():
        first = model(ids).logits
        second = model(ids).logits
    torch.testing.assert_close(first, exp["logits_update_1"], atol=ATOL, rtol=0)
    torch.testing.assert_close(second, exp["logits_update_2"], atol=ATOL, rtol=0)
    assert (exp["logits_update_2"] - exp["logits_update_1"]).abs().max() > 1e-4
    for i, block in enumerate(model.decoder.blocks):
        torch.testing.assert_close(block.ffn.C.detach(), exp[f"C_after.{i}"], atol=ATOL, rtol=0)
        torch.testing.assert_close(block.ffn.usage, exp[f"usage_after.{i}"], atol=ATOL, rtol=0)


def test_gmt_v7_importer_refuses_a_wrong_diag_mask_and_unknown_keys():
    weights, _, meta = fixture("gmt_v7")
    bad = dict(weights)
    bad["blocks.0.cell.diag_mask"] = torch.zeros_like(bad["blocks.0.cell.diag_mask"])
    with pytest.raises(CheckpointError, match="diag_mask"):
        gmt_model(bad, meta)
    bad = dict(weights)
    bad["blocks.0.cell.centroids"] = bad.pop("blocks.0.cell.C")
    with pytest.raises(CheckpointError):
        gmt_model(bad, meta)
    bad = dict(weights)
    bad["lm_head.weight"] = bad["lm_head.weight"] + 1
    with pytest.raises(CheckpointError, match="lm_head"):
        gmt_model(bad, meta)


def test_gmt_v7_trainer_checkpoint_loads_through_convert(tmp_path):
    weights, exp, meta = fixture("gmt_v7")
    ckpt = tmp_path / "latest.pt"
    # the layout of the original's Trainer._save_checkpoint
    torch.save({"model": weights, "opt": {"state": {}, "param_groups": []}, "sched": {},
                "step": 4, "loss": 1.0, "epoch": 0, "batch_idx": 3}, ckpt)
    assert set(read_state_dict(ckpt)) == set(weights)
    cfg = json.loads(meta["config"])
    model = convert("gmt-v7", ckpt, {"n_head": cfg["n_heads"], "dropout": 0.0,
                                     "attn_dropout": 0.0, "eval_update_memory": False}).eval()
    with torch.no_grad():
        logits = model(exp["input_ids"][:, :-1]).logits
    torch.testing.assert_close(logits, exp["logits"], atol=ATOL, rtol=0)


def test_gmt_v7_faithful_training_loss_and_gradient_match_the_original():
    """Five aux losses with the original's weights and targets; ortho after write-back."""
    weights, exp, meta = fixture("gmt_v7")
    model = gmt_model(weights, meta).train()
    ids = exp["input_ids"]
    out = model(ids[:, :-1], targets=ids[:, 1:])
    out.loss.backward()
    torch.testing.assert_close(out.lm_loss, exp["train_task_loss"], atol=ATOL, rtol=0)
    lambdas = json.loads(meta["lambdas"])
    names = ("track", "ortho", "cluster", "edge", "contrast")
    ours = ("gmt_track", "gmt_ortho", "gmt_cluster", "gmt_edge_entropy", "gmt_edge_contrast")
    for i, (theirs, key) in enumerate(zip(names, ours)):
        expect = lambdas[theirs] * exp["train_aux_losses"][i]
        torch.testing.assert_close(out.aux_losses[key].detach(), expect, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss.detach(), exp["train_total_loss"], atol=ATOL, rtol=0)
    grad_norm = torch.stack([p.grad.norm() for p in model.parameters()
                             if p.grad is not None]).norm()
    torch.testing.assert_close(grad_norm, exp["train_grad_norm"], atol=ATOL, rtol=0)


# ----- ARMT and RMT (wrapped GPT-2) -------------------------------------------------------------
def wrapped_model(name: str, weights, meta):
    """Through the importer, with every setting the fixture's original used passed explicitly."""
    from memlm.convert import build_armt, build_rmt

    cfg = json.loads(meta["config"])
    overrides = {"n_head": cfg["gpt2"]["n_head"], "segment_len": cfg["segment_size"]}
    if name.startswith("armt"):
        overrides.update(correction=cfg["correction"], key_norm=cfg["key_norm"],
                         first_write_whole=True,
                         dpfp_order=cfg["nu"], use_denom=True, mem_heads=1)
        return build_armt(dict(weights), overrides)
    return build_rmt(dict(weights), {**overrides, "memory_from": "final_norm"})


@pytest.mark.parametrize("name", ["armt", "armt_correction",
                                  "rmt"])
def test_recurrent_logits_loss_and_gradient_match_the_original(name):
    weights, exp, meta = fixture(name)
    model = wrapped_model(name, weights, meta).eval()
    ids = exp["input_ids"]
    assert ids.shape[1] == 3 * json.loads(meta["config"])["segment_size"]  # three segments
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    out = model(ids, targets=targets)
    torch.testing.assert_close(out.logits.detach(), exp["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss.detach(), exp["loss"], atol=ATOL, rtol=0)
    out.loss.backward()
    grad_norm = torch.stack([p.grad.norm() for p in model.parameters()
                             if p.grad is not None]).norm()
    torch.testing.assert_close(grad_norm, exp["grad_norm"], atol=ATOL, rtol=0)


def test_armt_fixture_needs_the_memory():
    """The fixture would prove nothing if W_V were still zero (ARMT = its backbone)."""
    weights, exp, meta = fixture("armt")
    assert weights["memory_cell.model.transformer.h.0.W_mv.weight"].abs().max() > 1e-3
    model = wrapped_model("armt", weights, meta).eval()
    with torch.no_grad():
        for layer in model.backbone.layers():
            layer.memory.w_v.weight.zero_()
        logits = model(exp["input_ids"]).logits
    seg = json.loads(meta["config"])["segment_size"]
    assert (logits[:, seg:] - exp["logits"][:, seg:]).abs().max() > 1e-3


def test_armt_paper_settings_are_what_the_fixture_proves():
    """memlm's default key_norm 'l2' is not the paper code: it changes the logits."""
    weights, exp, meta = fixture("armt")
    model = wrapped_model("armt", weights, meta)
    assert model.config.key_norm == "none" and model.config.dpfp_order == 3
    from memlm.convert import build_armt

    l2 = build_armt(dict(weights), {"n_head": 4, "segment_len": 8, "correction": False,
                                    "key_norm": "l2"}).eval()
    with torch.no_grad():
        assert (l2(exp["input_ids"]).logits - exp["logits"]).abs().max() > 1e-3


def test_wrapped_importer_refuses_inconsistent_checkpoints():
    weights, _, meta = fixture("armt")
    bad = dict(weights)
    bad["memory_cell.layers.0.W_mq.weight"] = bad["memory_cell.layers.0.W_mq.weight"] + 1
    with pytest.raises(CheckpointError, match="memory_cell.layers.0.W_mq.weight"):
        wrapped_model("armt", bad, meta)
    bad = {("encoder." + k): v for k, v in weights.items()}
    with pytest.raises(CheckpointError, match="memory_cell"):
        wrapped_model("armt", bad, meta)
    weights, _, meta = fixture("rmt")
    bad = {k: v for k, v in weights.items() if k != "memory_cell.memory"}
    with pytest.raises(CheckpointError, match="memory"):
        wrapped_model("rmt", bad, meta)


# ----- memlm convert ------------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memlm", *args], capture_output=True, text=True,
                          timeout=300)


def test_convert_cli_gmt_v7_folder_works_with_eval_inspect_and_transformers(tmp_path):
    weights, exp, meta = fixture("gmt_v7")
    ckpt = tmp_path / "latest.pt"
    torch.save({"model": weights, "step": 4, "loss": 1.0}, ckpt)
    out = tmp_path / "converted"
    proc = run_cli("convert", "--from", "gmt-v7", str(ckpt), "--out", str(out),
                   "--tokenizer", "byte", "--set", "n_head=4", "--set", "dropout=0.0",
                   "--set", "attn_dropout=0.0")
    assert proc.returncode == 0, proc.stderr
    from memlm.models.base import MemLM

    ids = exp["input_ids"][:, :-1]
    model = MemLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, exp["logits"], atol=ATOL, rtol=0)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, exp["logits"], atol=ATOL, rtol=0)
    text = tmp_path / "text.txt"
    text.write_text("the graph memory routes every token. " * 8)
    proc = run_cli("eval", str(out), "--data", str(text), "--seq-len", "16")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("inspect", str(out), "--text", "memory")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name,fmt", [("armt", "bin"), ("rmt", "safetensors")])
def test_convert_cli_wrapped_checkpoints(tmp_path, name, fmt):
    weights, exp, meta = fixture(name)
    folder = tmp_path / "model_100"  # the trainer's save folder, with its other files
    folder.mkdir()
    (folder / "trainer.pckl").write_bytes(b"not read")
    if fmt == "bin":
        torch.save(weights, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(weights, str(folder / "model.safetensors"))
    cfg = json.loads(meta["config"])
    sets = ["--set", "n_head=4", "--set", f"segment_len={cfg['segment_size']}"]
    if name == "armt":
        sets += ["--set", "correction=false"]
    out = tmp_path / "converted"
    proc = run_cli("convert", "--from", name, str(folder), "--out", str(out), "--tokenizer",
                   "byte", *sets)
    assert proc.returncode == 0, proc.stderr
    from memlm.models.base import MemLM

    model = MemLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(exp["input_ids"]).logits, exp["logits"], atol=ATOL,
                                   rtol=0)


class NotATensor:
    """Stands for arbitrary pickled objects, which weights_only loading refuses."""


def test_convert_refuses_pickled_code_and_bad_input(tmp_path):
    weights, _, _ = fixture("gmt_v7")
    evil = tmp_path / "evil.pt"
    torch.save({"model": weights, "extra": NotATensor()}, evil)
    cases = [
        (evil, "refusing to load"),
        (tmp_path / "absent.pt", "does not exist"),
        (tmp_path / "ckpt.pkl", "not a checkpoint memlm can read safely"),
        (tmp_path / "junk.safetensors", "cannot read"),
    ]
    (tmp_path / "ckpt.pkl").write_bytes(b"x")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    for path, message in cases:
        proc = run_cli("convert", "--from", "gmt-v7", str(path), "--out", str(tmp_path / "o"))
        assert proc.returncode == 2, (path, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    # a state dict of another architecture: one line, exit 2
    proc = run_cli("convert", "--from", "armt", str(evil.with_name("g.pt")), "--out",
                   str(tmp_path / "o"))
    assert proc.returncode == 2
    torch.save(weights, tmp_path / "g.pt")
    proc = run_cli("convert", "--from", "armt", str(tmp_path / "g.pt"), "--out",
                   str(tmp_path / "o"))
    assert proc.returncode == 2 and "memory_cell" in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_original_gmt_v7_weights_audit_as_causal_and_mutating():
    """The original's behaviour, loaded from its own weights: no leak, but eval writes back."""
    from memlm.testing.audit import all_passed, audit, format_audit

    weights, _, meta = fixture("gmt_v7")
    results = audit(gmt_model(weights, meta), seq_len=16, floor=False)
    assert all_passed(results), format_audit(results)
    assert [r.name for r in results if r.finding] == ["evaluation mutates memory"]


def test_gmt_faithful_weight_decay_covers_every_parameter_like_the_original():
    """The original's trainer builds AdamW(model.parameters(), weight_decay=0.1)."""
    from memlm.train.optim import param_groups

    weights, _, meta = fixture("gmt_v7")
    faithful = gmt_model(weights, meta)
    decay, no_decay = param_groups(faithful, 0.1)
    trainable = [p for p in faithful.parameters() if p.requires_grad]
    assert len(decay["params"]) == len(trainable) and not no_decay["params"]
    cell = faithful.decoder.blocks[0].ffn
    ids = {id(p) for p in decay["params"]}
    for p in (cell.gate, cell.write_momentum, cell.norm_c.weight, cell.C, cell.E):
        assert id(p) in ids
    default = GMT(faithful.config.replace(faithful=False))
    decay, _ = param_groups(default, 0.1)
    ids = {id(p) for p in decay["params"]}
    cell = default.decoder.blocks[0].ffn
    assert not {id(cell.gate), id(cell.C), id(cell.E), id(cell.norm_c.weight)} & ids


def test_convert_never_overwrites_a_folder(tmp_path):
    weights, _, _ = fixture("gmt_v7")
    torch.save(weights, tmp_path / "g.pt")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli("convert", "--from", "gmt-v7", str(tmp_path / "g.pt"), "--out", str(out),
                   "--tokenizer", "byte", "--set", "n_head=4")
    assert proc.returncode == 2 and "not empty" in proc.stderr, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# ----- DNC (memoryllm): the memory ----------------------------------------------------------------
def test_dnc_faithful_memory_matches_the_original():
    """memlm's faithful DNC memory, fed the original's controller states, gives its logits."""
    from memlm.convert import convert_dnc_memory, dnc_memory_from_original

    weights, exp, meta = fixture("dnc_gpt2")
    cfg = json.loads(meta["config"])
    memory = dnc_memory_from_original(weights, cfg)
    hidden = exp["hidden"]
    with torch.no_grad():
        result = memory(hidden, memory.init_state(hidden.shape[0]))
        logits = (hidden + result.out) @ weights["lm_head.weight"].T
    torch.testing.assert_close(logits, exp["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(result.state.memory, exp["memory"], atol=ATOL, rtol=0)
    torch.testing.assert_close(result.state.usage, exp["usage"], atol=ATOL, rtol=0)
    # the original's collapse, which faithful mode reproduces: every memory row identical
    assert (exp["memory"] - exp["memory"][:, :1]).abs().max() < 1e-6
    assert exp["memory"].abs().max() > 1e-3
    with pytest.raises(CheckpointError, match="memory.write_key_proj.weight"):
        convert_dnc_memory({k: v for k, v in weights.items() if "write_key" not in k})


# ----- DNC (memoryllm): the whole model ------------------------------------------------------------
def dnc_gpt2_model(weights, meta, **overrides):
    from memlm.convert import build_dnc_gpt2

    cfg = json.loads(meta["config"])
    return build_dnc_gpt2(dict(weights), {"n_head": cfg["num_heads"],
                                          "mem_slots": cfg["mem_slots"], "dropout": 0.0,
                                          **overrides})


def test_dnc_gpt2_whole_model_matches_the_original():
    """GPT-2 backbone (tanh GELU, Conv1D weights) + faithful memory: logits, memory, loss."""
    weights, exp, meta = fixture("dnc_gpt2")
    model = dnc_gpt2_model(weights, meta).eval()
    assert model.config.activation == "gelu_tanh" and not model.config.tie_embeddings
    ids = exp["input_ids"]
    # the original's lm_loss: next-token CE over positions 0..T-2
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    with torch.no_grad():
        out = model(ids, targets=targets)
    torch.testing.assert_close(out.logits, exp["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.lm_loss, exp["loss"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.state.memory, exp["memory"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.state.usage, exp["usage"], atol=ATOL, rtol=0)
    # the activation is what makes it exact: memlm's default erf GELU misses the tolerance
    erf = dnc_gpt2_model(weights, meta, activation="gelu").eval()
    with torch.no_grad():
        assert (erf(ids).logits - exp["logits"]).abs().max() > ATOL


def test_dnc_gpt2_importer_refuses_wrong_checkpoints():
    weights, _, meta = fixture("dnc_gpt2")
    with pytest.raises(CheckpointError, match="transformer.wte.weight"):
        dnc_gpt2_model({k: v for k, v in weights.items() if k != "transformer.wte.weight"}, meta)
    bad = dict(weights)
    bad["transformer.h.0.mlp.c_gate.weight"] = bad["transformer.h.0.mlp.c_fc.weight"]
    with pytest.raises(CheckpointError, match="c_gate"):
        dnc_gpt2_model(bad, meta)
    with pytest.raises(CheckpointError, match="shape"):  # 3 read heads: another interface size
        dnc_gpt2_model(weights, meta, num_reads=3)


def test_convert_cli_dnc_gpt2_trainer_checkpoint(tmp_path):
    """`ckpt["model_state"]` as memoryllm's trainer saves it, optimizer state included."""
    weights, exp, meta = fixture("dnc_gpt2")
    ckpt = tmp_path / "dnc_llm.pt"
    torch.save({"epoch": 1, "model_state": weights,
                "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-3}]}}, ckpt)
    out = tmp_path / "converted"
    proc = run_cli("convert", "--from", "dnc-gpt2", str(ckpt), "--out", str(out), "--tokenizer",
                   "byte", "--set", "n_head=4", "--set", "mem_slots=8", "--set", "dropout=0.0")
    assert proc.returncode == 0, proc.stderr
    from memlm.models.base import MemLM

    model = MemLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(exp["input_ids"]).logits, exp["logits"], atol=ATOL,
                                   rtol=0)
    proc = run_cli("convert", "--from", "dnc-gpt2", str(ckpt), "--out", str(tmp_path / "o2"),
                   "--tokenizer", "byte", "--set", "activation=relu")
    assert proc.returncode == 2 and "activation" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ----- TMT (TemporalMesh-Transformer): the whole original model, leaks included ------------------
def tmt_model(weights, meta, **overrides):
    from memlm.convert import build_tmt

    cfg = json.loads(meta["config"])
    return build_tmt(dict(weights), {"mesh_k": cfg["graph_k"],
                                     "exit_threshold": cfg["exit_threshold"],
                                     "context_len": cfg["max_seq_len"], "dropout": 0.0,
                                     **overrides})


def test_tmt_whole_model_matches_the_original():
    """Positions, leaky mesh, dual FFN, exit gate (with real exits) and anchors: logits to 1e-5."""
    weights, exp, meta = fixture("tmt")
    model = tmt_model(weights, meta).eval()
    assert model.config.attn_mode == "tmt_faithful_leaky" and not model.causal
    ids = exp["input_ids"]
    with torch.no_grad():
        out = model(ids[:, :-1], targets=ids[:, 1:], trace=True)
    torch.testing.assert_close(out.logits, exp["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.lm_loss, exp["loss"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, exp["total_loss"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.trace["confidence"], exp["confidences"], atol=ATOL, rtol=0)
    # the fixture exercises the exit path: some tokens, not all, leave at each layer
    exited = exp["exit_masks"][-1]
    assert 0 < exited.float().mean() < 1
    assert torch.equal(out.trace["exit_layer"] < model.config.n_layer, exited)


def test_tmt_faithful_training_step_matches_the_original():
    """A training forward: total loss (CE + 0.1 gate loss), gradient norm, EMA anchor write."""
    weights, exp, meta = fixture("tmt")
    model = tmt_model(weights, meta).train()
    ids = exp["input_ids"]
    out = model(ids[:, :-1], targets=ids[:, 1:])
    torch.testing.assert_close(out.loss.detach(), exp["train_total_loss"], atol=ATOL, rtol=0)
    out.loss.backward()
    grad_norm = torch.stack([p.grad.norm() for p in model.parameters()
                             if p.grad is not None]).norm()
    torch.testing.assert_close(grad_norm, exp["train_grad_norm"], atol=ATOL, rtol=0)
    for i, block in enumerate(model.blocks):
        assert not torch.equal(block.anchors.memory.detach(), weights[f"layers.{i}.memory_cross.memory"])
        torch.testing.assert_close(block.anchors.memory.detach(), exp[f"memory_after_train.{i}"],
                                   atol=ATOL, rtol=0)


def test_tmt_fixture_needs_each_original_piece():
    """Each piece memlm's old faithful mode lacked moves the logits far beyond the tolerance."""
    weights, exp, meta = fixture("tmt")
    ids = exp["input_ids"][:, :-1]

    def deviation(model) -> float:
        with torch.no_grad():
            return float((model.eval()(ids).logits - exp["logits"]).abs().max())

    no_exits = tmt_model(weights, meta, exit_threshold=None)
    assert deviation(no_exits) > 1e-3
    flat = tmt_model(weights, meta)
    with torch.no_grad():
        flat.temporal_decay.zero_()  # position scale sigmoid(0) everywhere
    assert deviation(flat) > 1e-3
    no_anchor = tmt_model(weights, meta)
    with torch.no_grad():
        for block in no_anchor.blocks:
            block.anchors.proj.weight.zero_()
    assert deviation(no_anchor) > 1e-3


def test_tmt_import_is_flagged_leaky_by_the_audit():
    from memlm.testing.audit import audit, format_audit

    weights, _, meta = fixture("tmt")
    results = {r.name: r for r in audit(tmt_model(weights, meta), seq_len=16, floor=False)}
    assert not results["future perturbation (eval)"].passed, format_audit(list(results.values()))


def test_tmt_importer_refuses_wrong_checkpoints():
    weights, _, meta = fixture("tmt")
    with pytest.raises(CheckpointError, match="layers.1.attn.k_proj.weight"):
        tmt_model({k: v for k, v in weights.items() if k != "layers.1.attn.k_proj.weight"}, meta)
    bad = dict(weights)
    bad["output_proj.weight"] = bad["output_proj.weight"] + 1
    with pytest.raises(CheckpointError, match="ties"):
        tmt_model(bad, meta)
    bad = {**weights, "layers.0.extra.weight": weights["pos_encoder.w_decay"]}
    with pytest.raises(CheckpointError, match="unexpected"):
        tmt_model(bad, meta)


def test_convert_cli_tmt_trainer_checkpoint(tmp_path):
    """`ckpt["model_state"]` as the original Trainer._save writes it; eval and inspect read it."""
    weights, exp, meta = fixture("tmt")
    ckpt = tmp_path / "ckpt_step500.pt"
    torch.save({"step": 500, "model_state": weights,
                "optimizer_state": {"state": {}, "param_groups": [{"lr": 3e-4}]}}, ckpt)
    out = tmp_path / "converted"
    cfg = json.loads(meta["config"])
    proc = run_cli("convert", "--from", "tmt", str(ckpt), "--out", str(out), "--tokenizer", "byte",
                   "--set", f"mesh_k={cfg['graph_k']}", "--set",
                   f"exit_threshold={cfg['exit_threshold']}", "--set",
                   f"context_len={cfg['max_seq_len']}", "--set", "dropout=0.0")
    assert proc.returncode == 0, proc.stderr
    import warnings

    from memlm.models.base import MemLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MemLM.from_pretrained(out).eval()
    ids = exp["input_ids"][:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, exp["logits"], atol=ATOL, rtol=0)
    text = tmp_path / "text.txt"
    text.write_text("the mesh reads the future. " * 8)
    proc = run_cli("eval", str(out), "--data", str(text), "--seq-len", "16")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("inspect", str(out), "--text", "mesh")
    assert proc.returncode == 0, proc.stderr
