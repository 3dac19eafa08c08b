"""benchmarks/demo_robustness.py: the grid's rows and its markdown table."""

from __future__ import annotations

import json

from conftest import load_script


def _load():
    return load_script("benchmarks/demo_robustness.py")


def test_markdown_marks_runs_over_z3_and_counts_them(tmp_path, capsys):
    rows = [{"arch": a, "seed": s, "precision": "fp32", "threads": 1, "recall_far": r,
             "baseline_recall_far": 0.11, "z": z}
            for s in (0, 1) for a, r, z in (("armt", 0.6, 20.0 + s), ("rmt", 0.12, 0.5 * s))]
    out = tmp_path / "grid.json"
    out.write_text(json.dumps({"rows": rows}))
    assert _load().main(["--markdown", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| seed | precision | threads | dense | armt | rmt |" in text
    assert "| 1 | fp32 | 1 | 0.11 | 0.6 (z 21) ** | 0.12 (z 0.5) |" in text
    assert "armt 2/2, rmt 0/2 (of 2 runs measured)" in text


def test_a_rerun_skips_the_runs_already_measured(tmp_path, capsys):
    out = tmp_path / "grid.json"
    module = _load()
    out.write_text(json.dumps({"setup": module.task_setup(None), "rows": [{"arch": "armt", "seed": 0, "precision": "fp32",
                                         "threads": 1, "recall_far": 0.5,
                                         "baseline_recall_far": 0.1, "z": 9.0}]}))
    assert module.main(["--seeds", "0", "--precisions", "fp32", "--threads", "1",
                        "--archs", "armt", "--out", str(out)]) == 0
    assert "0 run(s) to do, 1 already" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["rows"]) == 1


def test_a_run_measured_for_some_architectures_trains_only_the_missing_ones(tmp_path,
                                                                             monkeypatch):
    out = tmp_path / "grid.json"
    module = _load()
    armt = {"arch": "armt", "seed": 0, "precision": "fp32", "threads": 1, "recall_far": 0.5,
            "baseline_recall_far": 0.1, "z": 9.0}
    out.write_text(json.dumps({"setup": module.task_setup(None), "rows": [armt]}))
    calls = []

    def fake_run(seed, precision, threads, archs, work, steps):
        calls.append((seed, archs))
        return [{**armt, "arch": a, "seed": seed, "run_wall_s": 1.0} for a in archs]

    monkeypatch.setattr(module, "one_run", fake_run)
    assert module.main(["--seeds", "0,1", "--precisions", "fp32", "--threads", "1",
                        "--archs", "armt,rmt", "--out", str(out)]) == 0
    assert sorted(calls) == [(0, ["rmt"]), (1, ["armt", "rmt"])]
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["seed"], r["arch"]) for r in rows) == [(0, "armt"), (0, "rmt"),
                                                            (1, "armt"), (1, "rmt")]


def test_rows_of_another_demo_setup_are_moved_aside_and_the_grid_reruns(tmp_path, capsys,
                                                                        monkeypatch):
    out = tmp_path / "grid.json"
    old = {"setup": {"source": "builtin:recall:chars=20000"},
           "rows": [{"arch": "armt", "seed": 0, "precision": "fp32", "threads": 1,
                     "recall_far": 0.5, "baseline_recall_far": 0.1, "z": 9.0}]}
    out.write_text(json.dumps(old))
    module = _load()
    calls = []

    def fake_run(seed, precision, threads, archs, work, steps):
        calls.append((seed, precision, threads))
        return [{"arch": a, "seed": seed, "precision": precision, "threads": threads,
                 "recall_far": 0.3, "baseline_recall_far": 0.1, "z": 5.0, "run_wall_s": 1.0}
                for a in archs]

    monkeypatch.setattr(module, "one_run", fake_run)
    assert module.main(["--seeds", "0", "--precisions", "fp32", "--threads", "1",
                        "--archs", "armt", "--out", str(out)]) == 0
    assert calls == [(0, "fp32", 1)]  # the old row does not count for the new setup
    assert json.loads((tmp_path / "grid.previous.json").read_text()) == old
    new = json.loads(out.read_text())
    assert new["setup"] == module.task_setup(None)
    assert [r["recall_far"] for r in new["rows"]] == [0.3]
    # a third setup sets the second aside without overwriting the first
    monkeypatch.setattr(module, "task_setup", lambda steps: {"another": True})
    assert module.main(["--seeds", "0", "--precisions", "fp32", "--threads", "1",
                        "--archs", "armt", "--out", str(out)]) == 0
    assert json.loads((tmp_path / "grid.previous.json").read_text()) == old
    assert json.loads((tmp_path / "grid.previous-2.json").read_text()) == new


def test_explore_script_patches_the_training_text_and_scores_the_local_skill(monkeypatch, capsys):
    import memlm.experiments.demo as demo

    # the script patches the module's option dicts in place: give it copies to patch
    monkeypatch.setattr(demo, "TRAIN_RECALL", dict(demo.TRAIN_RECALL))
    monkeypatch.setattr(demo, "EVAL_RECALL", dict(demo.EVAL_RECALL))
    module = load_script("benchmarks/demo_explore.py")
    run = json.dumps({"steps": 2, "eval_batches": 1, "recall_rows": 4, "recall_chars": 400})
    assert module.main(["pytest-explore", "0", "gpt", "3000", '{"near_fraction": 1.0}',
                        '{"near_fraction": 0.5}', run]) == 0
    assert demo.TRAIN_RECALL["near_fraction"] == 1.0
    assert demo.EVAL_RECALL["near_fraction"] == 0.5 and demo.EVAL_RECALL["gap_range"] == (60, 140)
    assert "near=1.0" in demo.recall_source(3000)
    out = capsys.readouterr().out
    assert "pytest-explore gpt {" in out and "'recall_near':" in out and "'n_near':" in out
