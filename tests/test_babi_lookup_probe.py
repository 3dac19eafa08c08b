"""benchmarks/babi_lookup_probe.py: the backbone's bAbI lookup, isolated (docs/babilong.md)."""

from __future__ import annotations

import json

import torch

from memlm.data import babi as babi_mod
from memlm.data.tokenizers import make_tokenizer
from memlm.types import IGNORE_INDEX
from tests.conftest import load_script

probe = load_script("benchmarks/babi_lookup_probe.py")


def test_story_rows_score_exactly_the_answers_and_count_statements_after_the_support():
    tok = make_tokenizer("word")
    x, y, after = probe.story_rows("synth-qa1", "test", tok, None)
    items = babi_mod.questions("synth-qa1", "test")
    assert len(x) == items[-1].story_index + 1 and len(after) == len(items)
    assert tok.decode(y[y != IGNORE_INDEX].tolist()).split() == [q.answer for q in items]
    # each target is the next input: the rows are language-model rows, scored at answers
    keep = y[:, :-1] != IGNORE_INDEX
    assert torch.equal(y[:, :-1][keep], x[:, 1:][keep])
    assert after == [len(q.facts) - 1 - max(q.support) for q in items]


def test_probe_trains_and_reports_the_split(tmp_path, capsys):
    out = tmp_path / "probe.jsonl"
    assert probe.main(["--task", "synth-qa1", "--steps", "4", "--eval-every", "2",
                       "--set", "n_layer=1", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["rename"] and row["score"] == "answers" and row["set"] == {"n_layer": 1}
    assert row["n"] == sum(row["n_by_after"]) == len(babi_mod.questions("synth-qa1", "test"))
    assert 0 <= row["accuracy"] <= 1 and all(0 <= a <= 1 for a in row["by_after"])
    assert '"step": 2' in capsys.readouterr().err
    assert probe.cli(["--steps", "0"]) == 2


def test_eval_run_scores_a_trained_backbone_and_refuses_other_tokens(tmp_path):
    from memlm.config import RunConfig
    from memlm.train.trainer import train

    cfg = RunConfig.from_dict({
        "model": {"arch": "gpt", "n_layer": 1, "n_head": 2, "d_model": 16, "context_len": 128},
        "train": {"max_steps": 2, "batch_size": 2, "eval_batches": 1},
        "data": {"source": "babi:synth-qa1", "tokenizer": "word", "score": "answers",
                 "rename": True, "cache_dir": str(tmp_path / "c")}})
    train(cfg, tmp_path / "bb", progress=False)
    out = tmp_path / "rows.jsonl"
    assert probe.main(["--task", "synth-qa1", "--eval-run", str(tmp_path / "bb"),
                       "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["eval_run"] == str(tmp_path / "bb") and row["n"] == sum(row["n_by_after"])
    byte = cfg.with_overrides({"data.tokenizer": "byte", "data.rename": False,
                               "model.context_len": 16})
    train(byte, tmp_path / "bytes", progress=False)
    assert probe.cli(["--task", "synth-qa1", "--eval-run", str(tmp_path / "bytes")]) == 2
