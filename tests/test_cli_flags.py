"""The command line's contract: help with defaults, one meaning per flag, no silent ignores."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest

from memlm.cli import build_parser, main, parse_seeds
from memlm.config import TrainConfig
from memlm.errors import ConfigError
from memlm.train.budget import steps_with_curriculum

CONFIGS = Path(__file__).resolve().parents[1] / "memlm" / "configs"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_flag_has_help_that_states_its_default(name):
    sub = subcommands()[name]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"memlm {name} {action.dest}: no help"
        if not action.option_strings:
            continue  # a positional argument is always given
        text = formatter._expand_help(action) if action.help else ""
        assert "default" in text or "required" in text, f"memlm {name} {action.option_strings}"
        if action.default not in (None, False, [], argparse.SUPPRESS):
            assert str(action.default) in text, (name, action.option_strings, text)


def test_commands_in_config_comments_are_accepted():
    """A config documents how to run it; those command lines must parse."""
    found = 0
    for path in sorted(CONFIGS.glob("*.yaml")):
        for line in path.read_text().splitlines():
            m = re.match(r"#\s+memlm (train|eval|compare|demo) (.+)$", line)
            if m:
                found += 1
                build_parser().parse_args([m.group(1), *shlex.split(m.group(2))])
    assert found >= 1


def test_seeds_is_a_list_of_seeds_everywhere():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("3") == [3]  # one run with seed 3, in demo and compare alike
    for bad in ("", "a", "0,0"):
        with pytest.raises(ConfigError, match="--seeds takes a comma list of integers"):
            parse_seeds(bad)
    for name in ("demo", "compare"):
        action = next(a for a in subcommands()[name]._actions if a.dest == "seeds")
        assert action.type is None and isinstance(action.default, str)


def test_compare_passes_the_listed_seeds(monkeypatch, tmp_path):
    import memlm.experiments.compare as compare

    seen = {}

    def fake(archs, data, base_model, train_cfg, seeds, out_dir, **kwargs):
        seen["seeds"] = list(seeds)
        raise ConfigError("stop here")

    monkeypatch.setattr(compare, "run_comparison", fake)
    assert main(["compare", "gpt", "--seeds", "4,7", "--out", str(tmp_path)]) == 2
    assert seen["seeds"] == [4, 7]


def test_steps_cuts_or_lengthens_a_curriculum():
    cfg = TrainConfig(curriculum=[{"steps": 5, "seq_len": 8}, {"steps": 5, "seq_len": 16}])
    assert [s.steps for s in steps_with_curriculum(cfg, 3).curriculum] == [3]
    assert [s.steps for s in steps_with_curriculum(cfg, 7).curriculum] == [5, 2]
    assert [s.steps for s in steps_with_curriculum(cfg, 12).curriculum] == [5, 7]
    assert steps_with_curriculum(cfg, 7).curriculum[1].seq_len == 16
    assert [s.steps for s in cfg.curriculum] == [5, 5]  # the original is not changed
    assert steps_with_curriculum(TrainConfig(), 9).max_steps == 9
    with pytest.raises(ConfigError, match="--steps must be >= 1"):
        steps_with_curriculum(cfg, 0)


def test_train_steps_is_honoured_with_a_curriculum(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    config = tmp_path / "cur.yaml"
    config.write_text(f"""
model: {{arch: gpt, n_layer: 1, n_head: 2, d_model: 32, context_len: 16}}
train:
  batch_size: 2
  eval_every: 100
  save_every: 100
  log_every: 1
  precision: fp32
  warmup_steps: 0
  curriculum: [{{steps: 50, seq_len: 8}}, {{steps: 50, seq_len: 16}}]
data: {{source: {json.dumps(str(corpus))}, tokenizer: char}}
""")
    run = tmp_path / "run"
    assert main(["train", str(config), "--steps", "3", "--out", str(run), "--quiet"]) == 0
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [1, 2, 3]


def test_compare_scores_every_architecture_on_the_same_positions(tmp_path):
    out = tmp_path / "cmp"
    code = main(["compare", "gpt", "armt", "--steps", "2", "--seeds", "0", "--batch-size", "4",
                 "--n-layer", "1", "--d-model", "32", "--context-len", "32",
                 "--data", "builtin:stories:chars=20000", "--tokenizer", "byte",
                 "--out", str(out), "--quiet"])
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    positions = payload["setup"]["eval_positions"]
    assert positions["first"] == 1 and positions["tokens"] == positions["last"] > 0
    counts = {row["arch"]: row["metrics"]["val_tokens"]["values"] for row in payload["rows"]}
    assert counts == {"gpt": [positions["tokens"]], "armt": [positions["tokens"]]}
