"""train.loggers: metrics.jsonl always, TensorBoard and W&B (offline) when asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memlm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from memlm.errors import ConfigError
from memlm.train.trainer import train

TEXT = "the quick brown fox jumps over the lazy dog. " * 200


def config(tmp_path: Path, loggers: list[str], steps: int = 4) -> RunConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    return RunConfig(
        model=ModelConfig(arch="gpt", n_layer=1, n_head=2, d_model=32, context_len=16),
        train=TrainConfig(max_steps=steps, batch_size=2, eval_every=2, eval_batches=1,
                          save_every=2, log_every=1, precision="fp32", warmup_steps=0,
                          loggers=loggers),
        data=DataConfig(source=str(corpus), tokenizer="char"),
    )


def jsonl_scalars(run: Path) -> dict[str, dict[int, float]]:
    """{"train/loss": {step: value}, ...}: the numbers of metrics.jsonl, as loggers name them."""
    out: dict[str, dict[int, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec.items():
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(f"{rec['kind']}/{k}", {})[rec["step"]] = float(v)
    return out


def test_unknown_logger_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="unknown logger 'tensorbord'.*tensorboard"):
        TrainConfig(loggers=["jsonl", "tensorbord"])
    with pytest.raises(ConfigError, match="must be a list"):
        TrainConfig(loggers="tensorboard")


def test_jsonl_is_written_even_when_not_listed(tmp_path):
    train(config(tmp_path, []), tmp_path / "run", progress=False)
    assert jsonl_scalars(tmp_path / "run")["train/loss"].keys() == {1, 2, 3, 4}


def test_tensorboard_gets_every_scalar_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'memlm[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(config(tmp_path, ["jsonl", "tensorboard"]), run, progress=False)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    want = jsonl_scalars(run)
    assert set(acc.Tags()["scalars"]) == set(want)
    for tag, by_step in want.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got == pytest.approx(by_step, rel=1e-6), tag


def test_wandb_offline_logs_the_same_scalars_and_keeps_its_id_on_resume(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="pip install 'memlm[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logged: list[tuple[int, dict]] = []
    real_init = wandb.init

    def spy_init(*args, **kwargs):
        run = real_init(*args, **kwargs)
        real_log = run.log

        def log(data, step=None, **kw):
            logged.append((step, dict(data)))
            return real_log(data, step=step, **kw)

        run.log = log
        return run

    monkeypatch.setattr(wandb, "init", spy_init)
    run = tmp_path / "run"
    train(config(tmp_path, ["wandb"], steps=2), run, progress=False)
    run_id = (run / "wandb_run_id").read_text().strip()
    assert any(p.name.startswith("offline-run-") and p.name.endswith(run_id)
               for p in (run / "wandb").iterdir())
    want = jsonl_scalars(run)
    got: dict[str, dict[int, float]] = {}
    for step, data in logged:
        for k, v in data.items():
            got.setdefault(k, {})[step] = v
    assert got == want
    # a resumed run continues the same W&B run
    train(config(tmp_path, ["wandb"], steps=4), run, resume=True, progress=False)
    assert (run / "wandb_run_id").read_text().strip() == run_id
    assert max(step for step, _ in logged) == 4


def test_a_missing_optional_package_stops_the_run_before_training(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match=r"pip install 'memlm\[tensorboard\]'"):
        train(config(tmp_path, ["tensorboard"]), tmp_path / "run", progress=False)
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))
