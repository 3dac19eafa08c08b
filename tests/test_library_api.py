"""The library functions the CLI commands call (each `cmd_*` is a thin wrapper over one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import memlm
from memlm.cli import main
from memlm.config import TrainConfig
from memlm.errors import ConfigError, DataError, UnknownNameError
from memlm.eval.tasks import EvalOptions, format_results, run_tasks
from memlm.memory.early_exit import calibrate_on_tokens, format_calibration
from memlm.train.budget import budget_train_config, total_steps
from memlm.train.run import load_any_model, save_model_folder

TEXT = "the quick brown fox jumps over the lazy dog. " * 120


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("api")
    (tmp / "text.txt").write_text(TEXT)
    out = tmp / "run"
    assert main(["train", "gpt-char-tiny", "--data", str(tmp / "text.txt"), "--out", str(out),
                 "--quiet", "--set", "train.max_steps=6", "--set", "train.warmup_steps=1",
                 "--set", "train.eval_every=3", "--set", "train.save_every=6",
                 "--set", "model.n_layer=1", "--set", "model.d_model=32",
                 "--set", "model.context_len=32"]) == 0
    return out


def test_trainer_checkpoints_carry_the_runs_validation_in_their_card(run_dir):
    """The run-folder reading moved out of the model card into the trainer."""
    vals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in vals if r.get("kind") == "val"][-1]
    card = next((run_dir / "checkpoints").glob("step-*")).joinpath("README.md").read_text()
    assert f"## Evaluation (step {last_val['step']})" in card and "val_ppl" in card


def test_any_model_loader_and_model_folder_round_trip(run_dir, tmp_path):
    model = load_any_model(run_dir)
    assert isinstance(model, memlm.models.MemLM) and model.config.arch == "gpt"
    from memlm.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(run_dir / "memlm_tokenizer.json")
    save_model_folder(model, tokenizer, tmp_path / "m")
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "memlm_tokenizer.json", "tokenizer.json"} <= names
    assert "tokenizer_fingerprint" in json.loads((tmp_path / "m" / "config.json").read_text())


def test_eval_tasks_dispatch_by_kind_and_read_tokens_only_for_ppl(run_dir):
    model = load_any_model(run_dir)
    from memlm.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(run_dir / "memlm_tokenizer.json")
    calls = []

    def tokens():
        calls.append(1)
        return torch.tensor(tokenizer.encode(TEXT[:400]))

    results = run_tasks(model, tokenizer, None, EvalOptions(max_batches=1), tokens)
    assert list(results) == ["ppl"] and calls == [1] and results["ppl"]["ppl"] > 1
    assert format_results(results).startswith("== ppl\n  tokens                 256\n  nll ")
    for bad in ("babilong", "ppl:x", "mmlu:abc"):
        with pytest.raises(UnknownNameError, match="Valid eval tasks: babilong:TASK@LENGTHS, ppl, zeroshot:NAME"):
            run_tasks(model, tokenizer, bad, EvalOptions(), tokens)
    assert calls == [1]


def test_eval_options_read_matching_attributes_only():
    class Flags:
        batch_size, samples, unrelated = 4, 9, "x"

    assert EvalOptions.from_object(Flags()) == EvalOptions(batch_size=4, samples=9)


def test_calibration_checks_its_input_and_formats_its_table():
    gpt = memlm.build("gpt", vocab_size=32, n_layer=1, d_model=16, n_head=2, context_len=8)
    with pytest.raises(ConfigError, match="runs/x holds a 'gpt' model, which has no early exit"):
        calibrate_on_tokens(gpt, list(range(64)), where="runs/x")
    tmt = memlm.build("tmt", vocab_size=32, n_layer=2, d_model=16, n_head=2, context_len=8)
    with pytest.raises(ConfigError, match="--eps"):
        calibrate_on_tokens(tmt, list(range(64)), eps=1.5)
    with pytest.raises(DataError, match="held.txt holds 5 tokens, fewer than one 8-token"):
        calibrate_on_tokens(tmt, list(range(5)), source="held.txt")
    result = calibrate_on_tokens(tmt, [i % 32 for i in range(40)], windows=3)
    assert result["windows"] == 3 and result["window"] == 8
    text = format_calibration(result, 2)
    assert text.startswith("3 windows of 8 tokens") and "lambda | argmax agreement" in text


def test_token_budget_sets_steps_and_cadence():
    cfg = budget_train_config(TrainConfig(batch_size=4, grad_accum=2), 16, tokens="1k")
    assert cfg.max_steps == 1000 // (4 * 2 * 16) and cfg.save_every == cfg.max_steps
    assert cfg.eval_every == max(cfg.max_steps // 5, 1)
    assert budget_train_config(TrainConfig(), 16, tokens="1M", steps=10).max_steps == 10
    curriculum = TrainConfig(curriculum=[{"steps": 5, "seq_len": 8}, {"steps": 5, "seq_len": 16}])
    assert total_steps(budget_train_config(curriculum, 16, steps=7)) == 7


