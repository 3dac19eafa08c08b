"""benchmarks/babilong_memory_probe.py: a linear probe of what an RMT or ARMT writes (docs/babilong.md)."""

from __future__ import annotations

import pytest
import torch

import memlm
from memlm.errors import ConfigError
from memlm.train.run import load_run
from tests.conftest import load_script

probe = load_script("benchmarks/babilong_memory_probe.py")


def test_latest_places_keeps_each_persons_last_room_and_refuses_other_tasks():
    facts = ("Mary went to the kitchen.", "John moved to the office.",
             "Mary went back to the garden.")
    latest, last = probe.latest_places(facts)
    assert latest == {"Mary": probe.ROOMS.index("garden"), "John": probe.ROOMS.index("office")}
    assert last == "Mary"
    with pytest.raises(ConfigError, match="qa1 only"):
        probe.latest_places(("Mary picked up the apple.",))


def test_rows_spec_drops_the_training_only_options_and_adds_the_babi_folder():
    src = "babilong:qa1:segment=32:facts_per_segment=5:facts_last=0.3:min_segments=2"
    assert probe.rows_spec(src) == "babilong:qa1:segment=32:facts_per_segment=5:facts_last=0.3"
    assert (probe.rows_spec(src, drop=("min_segments", "facts_last"), babi="/b")
            == "babilong:qa1:segment=32:facts_per_segment=5:babi=/b")
    assert probe.rows_spec(src + ":babi=/a", babi="/b").endswith(":babi=/a")  # the run's own folder wins


def test_linear_probe_recovers_a_planted_label_and_not_a_random_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(900, 64, generator=g)
    planted = (x @ torch.randn(64, 6, generator=g)).argmax(-1)
    noise = torch.randint(0, 6, (900,), generator=g)
    for y, low, high in ((planted, 0.6, 1.0), (noise, 0.0, 0.3)):  # chance 1/6
        w = probe.fit_probe(x[:600], y[:600], 6)
        acc = (probe.predict(w, x[600:]) == y[600:]).float().mean().item()
        assert low <= acc <= high


def _tiny_run(tmp_path, preset: str, name: str, **over):
    from memlm.train.trainer import train

    cfg = memlm.config.load_run_config(preset).with_overrides({
        "train.init_from": None, "train.curriculum": [{"steps": 2, "seq_len": 128}],
        "train.max_steps": 2, "train.batch_size": 2, "train.eval_batches": 1,
        "model.n_layer": 1, "data.rename": False,
        "data.source": "babilong:synth-qa1:segment=64:facts_per_segment=5:min_segments=2",
        **over})
    train(cfg, tmp_path / name, progress=False)
    return tmp_path / name


def _check_row(row, rows: int = 64):
    assert row["n_last"] > 0 and row["n_earlier"] > 0
    # every test row asks one question: the model's cells count each row once
    assert row["n_model_last"] + row["n_model_earlier"] == rows
    for key in ("probe_last", "probe_earlier", "model_last", "model_earlier"):
        assert 0.0 <= row[key] <= 1.0


def test_probe_run_splits_probe_and_model_by_the_shortcut_and_refuses_non_memory(tmp_path):
    run = _tiny_run(tmp_path, "rmt-babilong-qa1", "rmt")
    row = probe.probe_run(run, rows=64, test_rows=64)
    _check_row(row)
    assert row["features"] == 16 * 128  # RMT: the memory vectors, m x d
    run = _tiny_run(tmp_path, "gpt-babilong-qa1", "gpt", **{
        "train.curriculum": [{"steps": 1, "seq_len": 128}], "train.max_steps": 1,
        "data.source": "babilong:synth-qa1:segment=64:window=64"})
    with pytest.raises(ConfigError, match="arch: rmt or armt"):
        probe.probe_run(run, rows=64, test_rows=64)
    # from the command line: one line naming the problem, exit status 2
    assert probe.run_cli(probe.main, "babilong_memory_probe.py", [str(run)]) == 2


def test_probe_reads_armt_associative_memory_after_two_context_segments(tmp_path):
    run = _tiny_run(tmp_path, "armt-babilong-qa1", "armt", **{  # the preset's 32-token rows
        "train.curriculum": [{"steps": 2, "seq_len": 64}],
        "data.source": "babilong:synth-qa1:segment=32:facts_per_segment=5:min_segments=2"})
    model, _ = load_run(run)
    state = model(torch.zeros(3, 64, dtype=torch.long)).state
    feats = probe.memory_features(state)
    # every layer's A and z, flattened per row: nothing dropped, rows kept apart
    want = sum(t[0].numel() for layer in state.layers for t in layer)
    assert feats.shape == (3, want)
    row = probe.probe_run(run, rows=64, test_rows=64, context_segments=2)
    assert row["arch"] == "armt" and row["context_segments"] == 2 and row["features"] == want
    _check_row(row)
    with pytest.raises(ConfigError, match="at least 1"):
        probe.probe_run(run, rows=64, test_rows=64, context_segments=0)
