"""`memlm inspect` for RMT and ARMT: per segment and layer, what the memory wrote and read.

The numbers in the table must be the model's own: each test recomputes one of them
from the memory state or the forward pass and compares.
"""

from __future__ import annotations

import json

import pytest
import torch

import memlm
from memlm.cli import main
from memlm.data.tokenizers import make_tokenizer
from memlm.errors import ConfigError
from memlm.inspect.recurrent import segment_spans
from memlm.registry import INSPECTORS
from memlm.train.run import TOKENIZER

TEXT = "Albert Einstein was born in 1879 in Ulm. He developed the theory of relativity."
SEG, LAYERS, MEM = 32, 2, 4  # TEXT is 79 bytes: segments 0-32, 32-64, 64-79


def tiny(arch: str) -> memlm.MemLM:
    torch.manual_seed(0)
    model = memlm.build(arch, vocab_size=256, n_layer=LAYERS, d_model=32, n_head=2,
                        context_len=SEG, num_mem_tokens=MEM)
    if arch == "armt":  # W_V starts at 0 (nothing stored); random values make writes visible
        with torch.no_grad():
            for layer in model.backbone.layers():
                torch.nn.init.normal_(layer.memory.w_v.weight, std=0.3)
    return model.eval()


def inspect(arch: str, out_dir=None, layer=None):
    model, tok = tiny(arch), make_tokenizer("byte")
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        out = model(ids, state=model.init_state(1), trace=True)
    text = INSPECTORS.get(arch)(model, tok.token_strings(ids[0].tolist()), ids, out, out_dir,
                                layer, False)
    return model, ids, out, text


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_both_wrappers_have_an_inspector():
    assert "armt" in INSPECTORS and "rmt" in INSPECTORS


def test_trace_has_one_entry_per_segment_and_layer():
    model, ids, out, _ = inspect("armt")
    spans = segment_spans(model, ids.shape[1])
    assert spans == [(0, 32), (32, 64), (64, 79)]
    for key in ("armt_write_norm", "armt_z_write", "armt_memory_norm"):
        assert out.trace[key].shape == (1, 3, LAYERS), key
    assert out.trace["armt_beta"].shape == out.trace["armt_gamma"].shape == (3, LAYERS)
    _, _, rmt_out, _ = inspect("rmt")
    for key in ("rmt_read_norm", "rmt_write_norm", "rmt_write_delta"):
        assert rmt_out.trace[key].shape == (1, 3, MEM), key


def test_armt_write_strength_is_the_change_of_each_layers_matrix(tmp_path):
    model, ids, out, text = inspect("armt", tmp_path)
    rows = read_rows(tmp_path / "armt_inspect.jsonl")
    assert len(rows) == 3 * LAYERS
    # replay the segments one call at a time and measure |A_after - A_before| per layer
    state = model.init_state(1)
    for s, (a, e) in enumerate(segment_spans(model, ids.shape[1])):
        with torch.no_grad():
            new = model(ids[:, a:e], state=state).state
        for layer in range(LAYERS):
            row = rows[s * LAYERS + layer]
            assert (row["segment"], row["layer"], row["start"], row["end"]) == (s, layer, a, e)
            delta = (new.layers[layer].A - state.layers[layer].A).norm()
            assert row["write_norm"] == pytest.approx(float(delta), rel=1e-4, abs=1e-6)
            assert row["memory_norm"] == pytest.approx(float(new.layers[layer].A.norm()),
                                                       rel=1e-4)
        state = new
    # the first segment reads an empty memory; later ones read what was written
    assert all(r["read_norm"] == 0.0 for r in rows if r["segment"] == 0)
    assert all(r["read_norm"] > 0.0 for r in rows if r["segment"] > 0)
    assert "write|dA|" in text and "Albert Einstein" in text
    assert (tmp_path / "armt_memory.png").stat().st_size > 0


@torch.no_grad()
def test_rmt_memory_norms_are_the_memory_tokens_passed_on(tmp_path):
    model, ids, out, text = inspect("rmt", tmp_path)
    rows = read_rows(tmp_path / "rmt_inspect.jsonl")
    assert len(rows) == 3 * LAYERS
    state = model.init_state(1)
    for s, (a, e) in enumerate(segment_spans(model, ids.shape[1])):
        new = model(ids[:, a:e], state=state).state
        row = rows[s * LAYERS]
        assert row["read_mem"] == pytest.approx(float(state.memory.norm(dim=-1).mean()), rel=1e-5)
        assert row["write_mem"] == pytest.approx(float(new.memory.norm(dim=-1).mean()), rel=1e-5)
        assert row["mem_delta"] == pytest.approx(
            float((new.memory - state.memory).norm(dim=-1).mean()), rel=1e-5)
        state = new
    # per-layer hidden norms come from hooks on the backbone layers: present and positive
    assert all(r["read_hidden"] > 0 and r["write_hidden"] > 0 for r in rows)
    assert len({r["write_hidden"] for r in rows}) > 1
    assert "|m| out" in text and (tmp_path / "rmt_memory.png").stat().st_size > 0
    # the inspector's hooks are removed again
    assert all(not layer._forward_hooks for layer in model.backbone.layers())


def test_layer_option_keeps_one_layer_and_checks_its_range():
    _, _, _, text = inspect("armt", layer=1)
    table = text.splitlines()[6:]  # 4 header lines, column names, rule
    assert len(table) == 3 and all(line.split()[-7] == "1" for line in table)
    with pytest.raises(ConfigError, match="out of range"):
        inspect("rmt", layer=LAYERS)


@pytest.mark.parametrize("arch", ["armt", "rmt"])
def test_cli_inspect_prints_the_table_and_writes_the_heatmap(arch, tmp_path, capsys):
    tiny(arch).save_pretrained(tmp_path / "model")
    make_tokenizer("byte").save(tmp_path / "model" / TOKENIZER)
    assert main(["inspect", str(tmp_path / "model"), "--text", TEXT,
                 "--out", str(tmp_path / "pics")]) == 0
    printed = capsys.readouterr().out
    assert f"{arch.upper()} memory: 79 tokens in 3 segment(s)" in printed
    assert (tmp_path / "pics" / f"{arch}_memory.png").is_file()
