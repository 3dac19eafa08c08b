"""benchmarks/babilong.py --tasks: the qa1 recipe run on qa2-qa5 (issue 14).

Each task gets its own backbone run (gpt-babi-qaN), its own model runs ({arch}-qaN-s{seed})
and rows that say its name; qa1 keeps the names it always had. The plumbing test trains a
few steps only and scores 6 questions: it checks where things go, not how well they learn.
Tests that need bAbI files skip when ../shared/data/babi is absent.
"""

from __future__ import annotations

import json
import sys

import pytest

from memlm.config import load_run_config
from memlm.data.babi import find_task_file
from memlm.data.tokenizers import make_tokenizer
from memlm.errors import ConfigError
from tests.conftest import load_script


def _bench(results_dir, monkeypatch):
    """A fresh copy of the benchmark that writes its results under `results_dir`."""
    bench = load_script("benchmarks/babilong.py")
    monkeypatch.setattr(bench, "RESULTS_DIR", results_dir)
    monkeypatch.setattr(sys.modules["_common"], "RESULTS", results_dir)
    return bench


@pytest.fixture(scope="module")
def qa2_quick(tmp_path_factory, babi_dir):
    """`--quick --tasks qa2` for RMT, cut to a few steps: (runs folder, results, stdout)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("qa2")
    mp = pytest.MonkeyPatch()
    try:
        bench = _bench(root / "results", mp)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = bench.cli(["--quick", "--tasks", "qa2", "--archs", "rmt", "--seeds", "0",
                            "--runs", str(root / "runs"), "--babi", str(babi_dir),
                            "--backgrounds", "filler", "--lengths", "0k,1k",
                            "--steps-scale", "0.002", "--no-progress", "--name", "t_qa2"])
        assert rc == 0, out.getvalue()[-2000:]
        data = json.loads((root / "results" / "t_qa2.json").read_text())
    finally:
        mp.undo()
    return root / "runs", data, out.getvalue()


def test_tasks_qa2_trains_its_own_runs_and_scores_qa2(qa2_quick, babi_dir):
    runs, data, printed = qa2_quick
    assert sorted(p.name for p in runs.iterdir()) == ["gpt-babi-qa2", "rmt-qa2-s0"]
    # the same recipe: only the task in the data sources changed
    backbone = load_run_config(runs / "gpt-babi-qa2" / "run.yaml")
    assert backbone.data.source == f"babi:qa2:dir={babi_dir}"
    rmt = load_run_config(runs / "rmt-qa2-s0" / "run.yaml")
    assert rmt.data.source == (f"babilong:qa2:segment=64:facts_per_segment=5:facts_last=0.3:"
                               f"min_segments=2:babi={babi_dir}")
    assert rmt.train.init_from == str(runs / "gpt-babi-qa2")
    preset = load_run_config("rmt-babilong-qa1")
    assert (rmt.model.segment_len, rmt.model.num_mem_tokens, rmt.train.lr) == (
        preset.model.segment_len, preset.model.num_mem_tokens, preset.train.lr)
    rows = data["rows"]
    assert {r["task"] for r in rows} == {"qa2"} and data["task"] == "qa2"
    assert {(r["model"], r["length"]) for r in rows} == {
        (m, n) for m in ("rmt", "rmt (memory reset)") for n in ("0k", "1k")}
    assert all(r["n"] == 6 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert set(data["runs_full"]) == {"rmt:0:qa2"}
    assert {r["task"] for r in data["lengths"]} == {"qa2"}
    header = data["table"].splitlines()[0].split(" | ")
    assert [h.strip() for h in header[:2]] == ["task", "model"]
    assert "BABILong qa2 exact match" in printed


def test_eval_only_reads_the_task_from_the_run_and_refuses_a_mismatch(qa2_quick, babi_dir,
                                                                      tmp_path, monkeypatch,
                                                                      capsys):
    runs, _, _ = qa2_quick
    bench = _bench(tmp_path, monkeypatch)
    run = runs / "rmt-qa2-s0"
    assert bench.eval_task(run, None) == "qa2"
    assert bench.eval_task(run, ["qa1", "qa2"]) == "qa2"
    with pytest.raises(ConfigError, match="trained on qa2"):
        bench.eval_task(run, ["qa3"])
    assert bench.eval_task(tmp_path, None) == "qa1"  # no run.yaml: --tasks, default qa1
    with pytest.raises(ConfigError, match="exactly one"):
        bench.eval_task(tmp_path, ["qa1", "qa2"])
    assert bench.cli(["--eval-only", f"rmt:0={run}", "--tasks", "qa4", "--babi", str(babi_dir),
                      "--name", "never"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("babilong.py: error:") and "trained on qa2" in err and "\n" not in err
    assert not (tmp_path / "never.json").exists()
    assert bench.cli(["--eval-only", f"rmt:0={run}", "--babi", str(babi_dir), "--lengths", "0k",
                      "--n-samples", "6", "--backgrounds", "filler", "--no-control",
                      "--no-progress", "--name", "t_eval"]) == 0
    rows = json.loads((tmp_path / "t_eval.json").read_text())["rows"]
    assert [(r["model"], r["task"], r["length"], r["n"]) for r in rows] == [
        ("rmt", "qa2", "0k", 6)]


@pytest.mark.parametrize("argv, words", [
    (["--quick", "--tasks", "qa21"], "unknown bAbI task 'qa21'"),
    (["--quick", "--tasks", ","], "no bAbI task"),
    (["--quick", "--tasks", "qa2", "--babi", "/no/such/babi"], "task qa2 needs the bAbI files"),
    (["--quick", "--archs", "rmt,lstm"], "--archs: unknown lstm"),
    (["--quick", "--steps-scale", "0"], "--steps-scale"),
])
def test_a_bad_task_is_refused_in_one_line_before_training(argv, words, tmp_path, monkeypatch,
                                                           capsys):
    bench = _bench(tmp_path, monkeypatch)
    assert bench.cli([*argv, "--runs", str(tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("babilong.py: error:") and words in err
    assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_task_missing_from_the_babi_folder_is_refused_before_training(tmp_path, monkeypatch,
                                                                         capsys, babi_dir):
    partial = tmp_path / "babi" / "en-10k"
    partial.mkdir(parents=True)
    for f in (babi_dir / "en-10k").glob("qa1_*"):
        (partial / f.name).symlink_to(f)
    bench = _bench(tmp_path, monkeypatch)
    assert bench.cli(["--quick", "--tasks", "qa1,qa3", "--babi", str(tmp_path / "babi"),
                      "--runs", str(tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "qa3" in err and "\n" not in err and not (tmp_path / "runs").exists()


def test_qa1_default_keeps_its_names_and_sources(tmp_path, monkeypatch, babi_dir):
    bench = _bench(tmp_path, monkeypatch)
    assert bench.backbone_name() == bench.backbone_name("qa1") == "gpt-babi-qa1"
    assert bench.backbone_name("synth-qa1") == "gpt-babi-qa1"
    assert bench.run_name("rmt", 2) == bench.run_name("rmt", 2, "synth-qa1") == "rmt-qa1-s2"
    assert bench.run_name("gpt", 0, "qa5") == "gpt-qa5-s0"
    assert bench.backbone_name("qa3") == "gpt-babi-qa3"
    b = str(babi_dir)
    assert bench.preset_config("backbone", 0, babi=b).data.source == f"babi:qa1:dir={b}"
    rows = "segment=64:facts_per_segment=5:facts_last=0.3:min_segments=2"
    assert bench.preset_config("rmt", 0, babi=b).data.source == f"babilong:qa1:{rows}:babi={b}"
    assert bench.preset_config("gpt", 0, babi=b, task="qa4").data.source == (
        f"babilong:qa4:{rows}:window=64:babi={b}")
    assert bench.preset_config("rmt", 0).data.source.startswith("babilong:synth-qa1:")
    with pytest.raises(ConfigError, match="qa2 needs the bAbI files"):
        bench.preset_config("rmt", 0, task="qa2")


def test_qa2_to_qa5_fit_one_segment_and_a_longer_question_is_refused(babi_dir, tmp_path,
                                                                     monkeypatch):
    bench = _bench(tmp_path, monkeypatch)
    tok = make_tokenizer(f"word:512:{babi_dir}")
    for task in ("qa1", "qa2", "qa3", "qa4", "qa5"):
        bench.check_segment_fit(tok, task, str(babi_dir), 64, "rmt")
    # qa5's longest test question + marker + answer + eos is 11 word tokens
    with pytest.raises(ConfigError, match=r"longest qa5 test question .* 11 tokens"):
        bench.check_segment_fit(tok, "qa5", str(babi_dir), 10, "rmt")


def test_qa3_trains_on_the_1k_stories_when_en_10k_lacks_it(babi_dir):
    """memlm reads train stories from en-10k/ and falls back to en/ (1k), as qa3 does here."""
    train = find_task_file("qa3", "train", babi_dir)
    assert train.parent.name == ("en-10k" if list((babi_dir / "en-10k").glob("qa3_*")) else "en")
    assert find_task_file("qa3", "test", babi_dir).parent.name == "en"


def test_task_info_names_the_file_and_the_questions_each_stage_may_ask(babi_dir, tmp_path,
                                                                       monkeypatch, capsys):
    bench = _bench(tmp_path, monkeypatch)
    assert bench.cli(["--task-info", "--tasks", "qa3,qa4", "--babi", str(babi_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = [c.strip() for c in lines[1].split("|")]
    rows = {c[0]: dict(zip(head, c)) for c in
            ([x.strip() for x in line.split("|")] for line in lines[3:])}
    assert set(rows) == {"qa3", "qa4"}
    assert rows["qa3"]["train_file"].startswith(
        "en-10k/" if list((babi_dir / "en-10k").glob("qa3_*")) else "en/")
    # qa4 stories are two lines: every train question fits the first (2-segment) stage;
    # qa3's long stories leave only a few for it, more as the samples grow
    assert rows["qa4"]["n@128"] == rows["qa4"]["train"]
    qa3 = [int(rows["qa3"][f"n@{n}"]) for n in (128, 192, 256, 384)]
    assert qa3 == sorted(qa3) and qa3[0] < qa3[-1] <= int(rows["qa3"]["train"])
    assert rows["qa4"]["chance_%"] == "16.7" and int(rows["qa3"]["max_tail"]) <= 64


def _part(results_dir, name: str, length: str, correct: int) -> None:
    """A results file holding one model's qa1 cell at one length (as --eval-only writes)."""
    depth_n, depth_c = [1] * 10, [1] * correct + [0] * (10 - correct)
    table_row = {"task": "qa1", "length": {"1k": 1000, "4k": 4000}[length], "length_name": length,
                 "C": 700, "accuracy": 10.0 * correct, "label_accuracy": 10.0 * correct,
                 "n_evaluated": 10, "n_skipped": 0, "depth_n": depth_n, "depth_correct": depth_c,
                 "recency_n": [5, 3, 2], "recency_correct": [5, 3, 2] if correct == 10 else [0, 0, 0]}
    data = {"command": f"part {name}", "commands": [f"part {name}"], "task": "qa1", "lengths": [],
            "rows": [{"model": "armt", "seed": 0, "task": "qa1", "length": length,
                      "background": "filler", "accuracy": correct / 10, "n": 10}],
            "runs_full": {"armt:0": {"tables": {"armt|filler": {
                "model": "armt", "background": "filler", "seed": 0,
                "by_length": {length: 10.0 * correct}, "rows": [table_row]}}}}}
    results_dir.mkdir(exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(data))


def test_merge_joins_one_models_lengths_from_several_parts(tmp_path, monkeypatch):
    """Parts written in parallel (say 0k-16k, then 64k) must add up: the merged heat map and the
    recency split hold every length, not only the last part's."""
    bench = _bench(tmp_path, monkeypatch)
    _part(tmp_path, "p1k", "1k", 10)
    _part(tmp_path, "p4k", "4k", 0)
    assert bench.cli(["--merge", "p1k", "p4k", "--rename", "armt:0=armt-x", "--name", "m"]) == 0
    data = json.loads((tmp_path / "m.json").read_text())
    assert [r["length"] for r in data["rows"]] == ["1k", "4k"]
    table = data["runs_full"]["armt-x:0"]["tables"]["armt|filler"]
    assert [r["length_name"] for r in table["rows"]] == ["1k", "4k"]
    assert table["by_length"] == {"1k": 100.0, "4k": 0.0}
    assert data["heatmaps"]["armt-x:0|armt|filler"] == {"1k": [1.0] * 10, "4k": [0.0] * 10}
    assert data["recency"]["armt-x:0|armt|filler"] == {"n": [10, 6, 4], "correct": [5, 3, 2]}


def test_merge_refuses_a_part_merged_twice_in_one_line(tmp_path, monkeypatch, capsys):
    """Merging the same part twice (or two parts holding the same cell) would count its
    questions twice in every mean: refused, naming the cell, and nothing is written."""
    bench = _bench(tmp_path, monkeypatch)
    _part(tmp_path, "p1k", "1k", 10)
    _part(tmp_path, "q1k", "1k", 3)
    assert bench.cli(["--merge", "p1k", "q1k", "--name", "m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "armt seed 0 qa1 filler 1k" in err[0] and "--rename" in err[0]
    assert not (tmp_path / "m.json").exists()
    assert bench.cli(["--merge", "p1k", "q1k", "--rename", "armt:0=armt-x", "--name", "m"]) == 2
    _part(tmp_path, "p4k", "4k", 10)
    assert bench.cli(["--merge", "p1k", "p4k", "--name", "m"]) == 0


def test_aging_probe_puts_the_facts_right_before_the_question_after_the_asked_background(
        babi_dir, monkeypatch):
    """benchmarks/babilong_aging.py: at every --before the same questions are asked, the
    facts form one block that ends where the question starts, and at least `before`
    segments of background come first; the score counts exact answers."""
    import numpy as np
    import torch

    from memlm.data.babilong import BabilongBuilder
    from memlm.data.background import load_background

    aging = load_script("benchmarks/babilong_aging.py")
    tok = make_tokenizer(f"word:512:{babi_dir}")
    builder = BabilongBuilder(tok, load_background(None, tok, seed=0), seed=0, babi_dir=babi_dir)
    asked = None
    for before in (0, 3, 40):
        C, samples = aging.aging_samples(builder, before, 32, n=12)
        assert len(samples) == 12 and C == before * 32 + aging.FACT_ROOM
        ids = [s.babi.sample_index for s in samples]
        assert asked is None or ids == asked
        asked = ids
        for s in samples:
            facts = builder.fact_ids(s.babi)
            assert s.fact_offsets[0] >= before * 32  # the background comes first
            block = np.concatenate(facts)
            assert np.array_equal(s.context[C - len(block):], block)  # facts end at C

    class Model:  # only what aging_rows reads; generation is replaced below
        is_stateful = True
        config = type("Cfg", (), {"segment_len": 32, "context_len": 32})()

    def answer(model, prompt, C, eos, max_new_tokens):  # right for even questions only
        out = []
        for row in prompt.tolist():
            q = next(s for s in samples_by_prompt if s[0] == row)[1]
            right = q.babi.sample_index % 2 == 0
            ans = list(builder.answer_ids(q.babi)) if right else [builder.eos - 1]
            out.append(ans + [builder.eos])
        return torch.tensor([o + [builder.eos] * (4 - len(o)) for o in out])

    _, samples = aging.aging_samples(builder, 3, 32, n=12)
    samples_by_prompt = [(s.prompt().tolist(), s) for s in samples]
    monkeypatch.setattr(aging, "_generate", answer)
    monkeypatch.setattr(aging, "segment_length", lambda model: 32)
    rows = aging.aging_rows(Model(), builder, [3], n=12, batch_size=1)
    even = sum(s.babi.sample_index % 2 == 0 for s in samples)
    assert 0 < even < 12
    assert rows[0]["n"] == 12 and rows[0]["correct"] == even
    assert rows[0]["accuracy"] == round(100 * even / 12, 1)
