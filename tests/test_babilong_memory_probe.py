"""benchmarks/babilong_memory_probe.py: a linear probe of what an RMT writes (docs/babilong.md)."""

from __future__ import annotations

import pytest
import torch

import memlm
from memlm.errors import ConfigError
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


def test_linear_probe_recovers_a_planted_label_and_not_a_random_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(900, 64, generator=g)
    planted = (x @ torch.randn(64, 6, generator=g)).argmax(-1)
    noise = torch.randint(0, 6, (900,), generator=g)
    for y, low, high in ((planted, 0.6, 1.0), (noise, 0.0, 0.3)):  # chance 1/6
        w = probe.fit_probe(x[:600], y[:600], 6)
        acc = (probe.predict(w, x[600:]) == y[600:]).float().mean().item()
        assert low <= acc <= high


def test_probe_run_splits_probe_and_model_by_the_shortcut_and_refuses_non_rmt(tmp_path):
    from memlm.train.trainer import train

    cfg = memlm.config.load_run_config("rmt-babilong-qa1").with_overrides({
        "train.init_from": None, "train.curriculum": [{"steps": 2, "seq_len": 128}],
        "train.max_steps": 2, "train.batch_size": 2, "train.eval_batches": 1,
        "model.n_layer": 1, "data.rename": False,
        "data.source": "babilong:synth-qa1:segment=64:facts_per_segment=5:min_segments=2"})
    train(cfg, tmp_path / "rmt", progress=False)
    row = probe.probe_run(tmp_path / "rmt", rows=64, test_rows=64)
    assert row["n_last"] > 0 and row["n_earlier"] > 0
    # every test row asks one question: the model's cells count each row once
    assert row["n_model_last"] + row["n_model_earlier"] == 64
    for key in ("probe_last", "probe_earlier", "model_last", "model_earlier"):
        assert 0.0 <= row[key] <= 1.0
    gpt = memlm.config.load_run_config("gpt-babilong-qa1").with_overrides({
        "train.init_from": None, "train.curriculum": [{"steps": 1, "seq_len": 128}],
        "train.max_steps": 1, "train.batch_size": 2, "train.eval_batches": 1,
        "data.source": "babilong:synth-qa1:segment=64:window=64"})
    train(gpt, tmp_path / "gpt", progress=False)
    with pytest.raises(ConfigError, match="arch: rmt"):
        probe.probe_run(tmp_path / "gpt", rows=64, test_rows=64)
    # from the command line: one line naming the problem, exit status 2
    assert probe.run_cli(probe.main, "babilong_memory_probe.py", [str(tmp_path / "gpt")]) == 2
