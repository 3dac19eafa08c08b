"""The `memlm` command line: the README's commands, and clear one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memlm.cli import main

TEXT = "ROMEO: what light through yonder window breaks? it is the east.\n" * 200


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "text.txt"
    data.write_text(TEXT)
    out = tmp / "run"
    code = main(["train", "gpt-char-tiny", "--data", str(data), "--out", str(out), "--quiet",
                 "--set", "train.max_steps=30", "--set", "train.warmup_steps=3",
                 "--set", "train.lr=3e-3", "--set", "train.eval_every=30",
                 "--set", "train.save_every=30", "--set", "model.n_layer=1",
                 "--set", "model.d_model=32", "--set", "model.context_len=32"])
    assert code == 0
    return out, data


def test_train_eval_generate_round_trip(trained_run, capsys, tmp_path):
    out, data = trained_run
    assert (out / "curve.png").exists() and (out / "metrics.jsonl").exists()
    assert main(["eval", str(out), "--data", str(data), "--json", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())["ppl"]
    assert res["ppl"] < 15 and 0 <= res["top1"] <= res["top5"] <= 1
    assert "bits_per_byte" in res
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20",
                 "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text.strip()) >= 20


def test_eval_on_the_runs_own_validation_split(trained_run, capsys):
    out, _ = trained_run
    assert main(["eval", str(out)]) == 0
    assert "ppl" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "no-such-config"], "not found"),
        (["train", "gpt-char-tiny", "--data", "/nonexistent/file.txt"], "/nonexistent/file.txt"),
        (["train", "gpt-char-tiny", "--set", "model.n_layers=2"], "Did you mean 'n_layer'"),
        (["train", "gpt-char-tiny", "--set", "model.arch=gtp"], "unknown architecture 'gtp'"),
        (["train", "gpt-char-tiny", "--tokenizer", "wordpiece"], "unknown tokenizer"),
        (["eval", "/nonexistent/run"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_empty_and_binary_data_files_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 10)
    for path, word in ((empty, "empty"), (binary, "binary")):
        assert main(["train", "gpt-char-tiny", "--data", str(path), "--out",
                     str(tmp_path / "r"), "--quiet"]) == 2
        assert word in capsys.readouterr().err


def test_tokenizer_vocabulary_mismatch_is_reported(trained_run, tmp_path, capsys):
    out, _ = trained_run
    from memlm.data.tokenizers import make_tokenizer
    from memlm.train import run as runlayout

    bad = tmp_path / "bad_run"
    import shutil

    shutil.copytree(out, bad)
    for tok in bad.rglob(runlayout.TOKENIZER):
        make_tokenizer("byte").save(tok)  # 256 ids, the model has only the char vocabulary
    assert main(["generate", str(bad), "--prompt", "hi"]) == 2
    assert "vocab" in capsys.readouterr().err.lower()


def test_console_script_and_module_entry_point_work():
    proc = subprocess.run([sys.executable, "-m", "memlm", "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0
    for command in ("train", "eval", "generate", "inspect", "stream", "demo", "compare",
                    "audit", "report", "diagnose", "calibrate"):
        assert command in proc.stdout
