"""`train.init_from`: a run starts from another run's weights (the BABILong recipe's
backbone stage), every source tensor in its place, and bad sources refused in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import memlm
from memlm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from memlm.errors import ConfigError, TokenizerMismatchError
from memlm.train.trainer import Trainer, train
from memlm.train.warm_start import canonical_name

TEXT = "the quick brown fox jumps over the lazy dog. " * 300


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def run_config(text_file: Path, arch: str = "gpt", d_model: int = 32, tokenizer: str = "char",
               **train_kw) -> RunConfig:
    train_cfg = dict(max_steps=3, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=3,
                     eval_batches=1, save_every=3, precision="fp32", seed=3)
    train_cfg.update(train_kw)
    fields = dict(arch=arch, n_layer=2, n_head=2, d_model=d_model, context_len=16)
    if arch == "gpt":
        model = ModelConfig(**fields)
    else:
        cls = memlm.registry.ARCHITECTURES.get(arch).config_cls
        model = cls.from_dict({**fields, "num_mem_tokens": 2, "segment_len": 8})
    return RunConfig(model=model, train=TrainConfig(**train_cfg),
                     data=DataConfig(source=str(text_file), tokenizer=tokenizer))


@pytest.fixture
def gpt_run(tmp_path, text_file) -> Path:
    train(run_config(text_file), tmp_path / "gpt", progress=False)
    return tmp_path / "gpt"


def saved(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "LATEST").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


@pytest.mark.parametrize("arch", ["armt", "rmt"])
def test_a_dense_gpt_starts_the_backbone_of_a_memory_model(gpt_run, text_file, arch):
    trainer = Trainer(run_config(text_file, arch, init_from=str(gpt_run)), None, progress=False)
    model = trainer.model
    source = saved(gpt_run)
    target = {canonical_name(k): v for k, v in model.state_dict().items()}
    for name, tensor in source.items():
        assert torch.equal(target[canonical_name(name)], tensor), name
    # the memory is not in the GPT: it keeps a fresh init (ARMT's memory projections,
    # the memory tokens), and differs from a GPT-free build only in the backbone
    fresh = build_same(run_config(text_file, arch)).state_dict()
    loaded = {target[canonical_name(s)].data_ptr() for s in source}  # tied aliases too
    memory = [k for k, v in model.state_dict().items() if v.data_ptr() not in loaded]
    assert memory and any("mem" in k for k in memory)
    for k in memory:
        assert torch.equal(model.state_dict()[k], fresh[k]), k
    if arch == "armt":
        # an empty associative memory reads nothing: the first segment is the GPT's own
        gpt = memlm.load(gpt_run).eval()
        ids = torch.randint(0, model.config.vocab_size, (2, 8))
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, gpt(ids).logits, atol=1e-5, rtol=1e-5)


def build_same(cfg: RunConfig) -> torch.nn.Module:
    """The model a run without init_from starts from (same seed, same vocabulary)."""
    return Trainer(cfg, None, progress=False).model


def test_init_from_refuses_another_size(gpt_run, text_file):
    with pytest.raises(ConfigError, match=r"sizes differ.*n_layer, d_model"):
        Trainer(run_config(text_file, d_model=48, init_from=str(gpt_run)), None, progress=False)


def test_init_from_refuses_a_source_with_weights_the_model_lacks(tmp_path, text_file):
    train(run_config(text_file, "armt"), tmp_path / "armt", progress=False)
    with pytest.raises(ConfigError, match="no place in this model.*another architecture"):
        Trainer(run_config(text_file, init_from=str(tmp_path / "armt")), None, progress=False)


def test_init_from_refuses_another_tokenizer(gpt_run, text_file):
    with pytest.raises(TokenizerMismatchError, match="wrong ids"):
        Trainer(run_config(text_file, tokenizer="byte", init_from=str(gpt_run)), None,
                progress=False)


def test_resume_continues_from_the_checkpoint_not_from_the_source(gpt_run, tmp_path, text_file):
    cfg = run_config(text_file, "armt", init_from=str(gpt_run), max_steps=4, save_every=2,
                     eval_every=2)
    train(cfg, tmp_path / "whole", progress=False)
    train(RunConfig(cfg.model, cfg.train.replace(max_steps=2), cfg.data), tmp_path / "split",
          progress=False)
    train(cfg, tmp_path / "split", resume=True, progress=False)
    a, b = saved(tmp_path / "whole"), saved(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_names_a_missing_source_in_one_line(tmp_path, text_file):
    out = subprocess.run(
        [sys.executable, "-m", "memlm", "train", "gpt-tiny", "--data", str(text_file),
         "--steps", "1", "--set", f"train.init_from={tmp_path / 'nowhere'}"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.init_from" in lines[0] and "does not exist" in lines[0]
