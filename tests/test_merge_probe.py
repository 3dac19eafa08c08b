"""benchmarks/memory_merge_probe.py: its episodes ask what they claim, and it runs end to end."""
import json

import torch

from tests.conftest import load_script

probe = load_script("benchmarks/memory_merge_probe.py")


def test_episode_answer_is_the_asked_persons_latest_place_and_depth_its_segment():
    x, y, depth = probe.episodes(torch.Generator().manual_seed(0), 64, 3)
    S = probe.S
    assert x.shape == (64, 4 * S)
    for r in range(64):
        ctx, last = x[r, : 3 * S].tolist(), x[r, 3 * S:].tolist()
        assert last[0] == probe.QUERY and all(t == 0 for t in last[2:])
        person = last[1]
        hits = [i for i, t in enumerate(ctx) if t == person]
        assert hits, "the asked person was mentioned"
        i = hits[-1]
        assert y[r, 3 * S + 1] == ctx[i + 1]  # the place right after its latest mention
        assert probe.PLACE0 <= ctx[i + 1] < probe.PLACE0 + probe.N_PLACES
        assert depth[r] == 2 - i // S
        scored = (y[r] != probe.IGNORE_INDEX).nonzero()[:, 0].tolist()
        assert scored == [3 * S + 1]
    assert set(depth.tolist()) == {0, 1, 2}


def test_probe_trains_and_writes_accuracy_by_count_and_depth(tmp_path):
    out = tmp_path / "probe.jsonl"
    assert probe.cli(["--arch", "rmt", "--schedule", "1:2;1,2", "--steps", "3",
                      "--batch-size", "4", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["schedule"] == "1:2;1,2" and row["machine"]["cpu"]
    for n in probe.EVAL_COUNTS:
        assert 0.0 <= row[f"n{n}"] <= 1.0 and len(row[f"n{n}_by_depth"]) == n


def test_probe_set_changes_the_model_and_is_recorded(tmp_path, capsys):
    out = tmp_path / "probe.jsonl"
    assert probe.cli(["--arch", "rmt", "--steps", "2", "--batch-size", "4", "--eval-every", "1",
                      "--set", "n_layer=3", "--set", "memory_from=pre_norm",
                      "--out", str(out)]) == 0
    assert json.loads(out.read_text())["set"] == {"n_layer": 3, "memory_from": "pre_norm"}
    progress = json.loads(capsys.readouterr().err.strip().splitlines()[0])
    assert progress["step"] == 1 and 0.0 <= progress["n1"] <= 1.0
    assert len(probe.build("rmt", 0, n_layer=3).backbone.layers()) == 3


def test_dense_control_sees_the_whole_episode_and_runs(tmp_path):
    """`--arch gpt` attends over the longest evaluated episode: its facts are in its window."""
    model = probe.build("gpt", 0)
    assert model.config.context_len == (max(probe.EVAL_COUNTS) + 1) * probe.S
    assert not getattr(model, "is_stateful", False)
    out = tmp_path / "probe.jsonl"
    assert probe.cli(["--arch", "gpt", "--steps", "2", "--batch-size", "4",
                      "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["n8_by_depth"]) == 8


def test_probe_refuses_a_bad_schedule_or_arch_in_one_line(capsys):
    assert probe.cli(["--schedule", "1:x", "--steps", "2"]) == 2
    assert probe.cli(["--schedule", "1:1;2:2", "--steps", "5"]) == 2
    assert probe.cli(["--arch", "dnc", "--steps", "2"]) == 2
    assert probe.cli(["--set", "n_layer", "--steps", "2"]) == 2
    assert probe.cli(["--set", "no_such_field=1", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("memory_merge_probe.py: error:") for line in err)
