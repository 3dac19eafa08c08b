"""The trainer: exact resume after SIGKILL, atomic checkpoints, clear failures."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import memlm
from memlm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from memlm.errors import CheckpointError, ConfigError, RunExistsError, TrainingDivergedError
from memlm.train.trainer import Trainer, train

TEXT = "the quick brown fox jumps over the lazy dog. " * 400


def tiny_config(data_path: Path, **train_kw) -> RunConfig:
    train_cfg = dict(max_steps=12, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=6,
                     eval_batches=2, save_every=4, log_every=2, precision="fp32", seed=7)
    train_cfg.update(train_kw)
    return RunConfig(
        model=ModelConfig(arch="gpt", n_layer=1, n_head=2, d_model=32, context_len=16,
                          dropout=0.1),
        train=TrainConfig(**train_cfg),
        data=DataConfig(source=str(data_path), tokenizer="char"),
    )


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "LATEST").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def test_training_writes_metrics_curve_and_checkpoint(tmp_path, text_file):
    res = train(tiny_config(text_file), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "val"}
    assert all(r["tokens_per_sec"] > 0 for r in records if r["kind"] == "train")
    assert (run / "curve.png").stat().st_size > 1000
    assert (run / "LATEST").read_text().strip() == "step-0000012"
    assert res.final["ppl"] < 40  # far below the char vocabulary size: it learned
    model = memlm.load(run)
    assert isinstance(model, memlm.models.GPT)


def test_same_seed_same_loss_curve(tmp_path, text_file):
    a = train(tiny_config(text_file), progress=False).history
    b = train(tiny_config(text_file), progress=False).history
    strip = [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in b]


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)  # same as the test process: float sums depend on the split
    sys.path.insert(0, {tests!r})
    from test_trainer import tiny_config
    from memlm.train.trainer import train

    def kill_after(record):
        if record.get("kind") == "train" and record["step"] == 10:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a real crash

    train(tiny_config(Path({data!r})), {out!r}, progress=False, callbacks=(kill_after,))
""")


def test_sigkill_then_resume_gives_bit_identical_weights(tmp_path, text_file):
    ref = tmp_path / "ref"
    train(tiny_config(text_file), ref, progress=False)
    crashed = tmp_path / "crashed"
    script = KILLER.format(tests=str(Path(__file__).parent), data=str(text_file), out=str(crashed))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert (crashed / "LATEST").read_text().strip() == "step-0000008"  # last complete one
    train(tiny_config(text_file), crashed, resume=True, progress=False)
    a, b = final_weights(ref), final_weights(crashed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics log holds every step once, as the uninterrupted run's does
    steps = [json.loads(x)["step"] for x in (crashed / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == sorted(set(steps))


def test_existing_run_is_refused_without_resume_or_overwrite(tmp_path, text_file):
    cfg = tiny_config(text_file, max_steps=2, save_every=2, eval_every=2)
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(RunExistsError, match="--resume.*--overwrite"):
        train(cfg, tmp_path / "run", progress=False)
    other = cfg.with_overrides(["model.d_model=64"])
    with pytest.raises(RunExistsError, match="different run"):
        train(other, tmp_path / "run", resume=True, progress=False)
    train(other, tmp_path / "run", overwrite=True, progress=False)
    assert memlm.load(tmp_path / "run").config.d_model == 64


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path, text_file):
    trainer = Trainer(tiny_config(text_file), tmp_path / "run", progress=False)
    real_forward = trainer.forward_model

    def poisoned(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        if trainer.step >= 5:
            out.loss = out.loss * float("nan")
        return out

    trainer.forward_model = poisoned
    with pytest.raises(TrainingDivergedError,
                       match=r"loss became nan at step 6.*checkpoint .*step-0000004 was kept"):
        trainer.fit()
    assert (tmp_path / "run" / "LATEST").read_text().strip() == "step-0000004"
    weights = final_weights(tmp_path / "run")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_corrupt_or_truncated_checkpoint_is_reported(tmp_path, text_file):
    cfg = tiny_config(text_file, max_steps=2, save_every=2, eval_every=2)
    train(cfg, tmp_path / "run", progress=False)
    weights = tmp_path / "run" / "checkpoints" / "step-0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        memlm.load(tmp_path / "run")
    state = tmp_path / "run" / "checkpoints" / "step-0000002" / "trainer_state.pt"
    state.write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        train(cfg.with_overrides(["train.max_steps=4"]), tmp_path / "run", resume=True,
              progress=False)


def test_gradient_accumulation_matches_a_big_batch(tmp_path, text_file):
    """Two accumulated micro-batches of 4 give the update of one batch of the same 8 rows."""

    def make(**kw):
        cfg = tiny_config(text_file, max_steps=1, **kw).with_overrides(["model.dropout=0.0"])
        return Trainer(cfg, progress=False)

    big, small = make(batch_size=8), make(batch_size=4, grad_accum=2)
    batch = big.source.next_batch()
    halves = iter([type(batch)(batch.input_ids[i : i + 4], batch.targets[i : i + 4])
                   for i in (0, 4)])
    big.source.next_batch = lambda: batch
    small.source.next_batch = lambda: next(halves)
    big.train_step()
    small.train_step()
    for p, q in zip(big.model.parameters(), small.model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_run_folder_is_locked_while_training_and_released_after(tmp_path, text_file):
    cfg = tiny_config(text_file, max_steps=4, save_every=2, eval_every=2)
    seen = []

    def second_writer(record):
        if record.get("kind") == "train" and not seen:
            with pytest.raises(RunExistsError, match="another memlm process"):
                Trainer(cfg, tmp_path / "run", resume=True, progress=False)
            seen.append(record["step"])

    train(cfg, tmp_path / "run", progress=False, callbacks=(second_writer,))
    assert seen, "the callback never ran"
    # released: the same process can resume the finished run at once
    train(cfg.with_overrides(["train.max_steps=6"]), tmp_path / "run", resume=True,
          progress=False)
    assert (tmp_path / "run" / "LATEST").read_text().strip() == "step-0000006"


def test_weights_that_give_a_nan_loss_are_never_checkpointed(tmp_path, text_file):
    trainer = Trainer(tiny_config(text_file, max_steps=6, save_every=2, eval_every=6),
                      tmp_path / "run", progress=False)
    real_step = trainer.optimizer.step

    def blow_up(*args, **kwargs):
        real_step(*args, **kwargs)
        if trainer.step >= 2:  # finite but huge: the loss of these weights is not finite
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.mul_(1e30)

    trainer.optimizer.step = blow_up
    with pytest.raises(TrainingDivergedError, match="step-0000002 was kept"):
        trainer.fit()
    assert (tmp_path / "run" / "LATEST").read_text().strip() == "step-0000002"
    assert all(torch.isfinite(w).all() for w in final_weights(tmp_path / "run").values())


@pytest.mark.parametrize("arch", ["rmt", "armt"])
def test_memory_wrapper_run_resumes_from_its_own_run_yaml(tmp_path, text_file, arch):
    """Building RMT/ARMT must not write what it resolved (layers_attr) into the run's config:
    run.yaml would then differ from the same preset given again, and --resume would refuse."""
    from memlm.models.recurrent import RecurrentConfig

    base = tiny_config(text_file, max_steps=2, save_every=2, eval_every=2)
    fields = {k: v for k, v in base.model.to_dict().items() if k != "arch"}
    model_cfg = memlm.registry.ARCHITECTURES.get(arch).config_cls.from_dict(
        {**fields, "arch": arch, "num_mem_tokens": 2})
    assert isinstance(model_cfg, RecurrentConfig) and model_cfg.layers_attr is None
    cfg = RunConfig(model=model_cfg, train=base.train, data=base.data)
    train(cfg, tmp_path / "run", progress=False)
    assert cfg.model.layers_attr is None
    again = RunConfig(model=type(model_cfg).from_dict(model_cfg.to_dict()),
                      train=base.train.replace(max_steps=3), data=base.data)
    train(again, tmp_path / "run", resume=True, progress=False)
    assert memlm.load(tmp_path / "run").config.layers_attr == "decoder.blocks"


def test_a_stage_lr_holds_while_the_schedule_spans_the_other_stages(tmp_path, text_file):
    """`{steps, lr}` stages hold their rate; warmup + cosine run over the rest only."""
    from memlm.config import CurriculumStage
    from memlm.train.optim import lr_at, stage_lr_at

    stages = [CurriculumStage(4, seq_len=16), CurriculumStage(4, seq_len=16, lr=5e-4),
              CurriculumStage(2, seq_len=16)]
    cfg = TrainConfig(lr=3e-3, min_lr=1e-4, warmup_steps=2, curriculum=stages)
    plain = cfg.replace(curriculum=[])
    expect = [lr_at(s, plain, 6) for s in range(4)] + [5e-4] * 4 \
        + [lr_at(s, plain, 6) for s in (4, 5)]
    assert [stage_lr_at(s, cfg) for s in range(10)] == pytest.approx(expect)
    assert stage_lr_at(5, cfg.replace(curriculum=[CurriculumStage(10)])) == lr_at(5, plain, 10)
    assert expect[3] > expect[8] > expect[9] > 1e-4  # the decay goes on after the held stage
    # and the trainer logs the rate it applied
    res_cfg = tiny_config(text_file, max_steps=10, log_every=1, lr=3e-3, min_lr=1e-4,
                          curriculum=stages)
    train(res_cfg, tmp_path / "run", progress=False)
    logged = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl")
                                              .read_text().splitlines()) if r["kind"] == "train"}
    assert [logged[s] for s in sorted(logged)] == pytest.approx(expect)


def test_stage_source_options_on_a_text_source_are_refused_before_training(tmp_path, text_file):
    cfg = tiny_config(text_file, curriculum=[{"steps": 2}, {"steps": 2,
                                                            "source_options": ":prefix=2"}])
    with pytest.raises(ConfigError, match="stage 2 has source_options, but data.source"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
