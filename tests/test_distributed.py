"""torchrun with 2 gloo processes on CPU reaches the single-process result.

Same global batch: one process with batch 8, or two with batch 4 each (rank r reads
rows r*4 .. r*4+3 of the same seeded draw). DDP averages the gradients, so the
weights after training must agree up to float summation order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TEXT = "a stitch in time saves nine. many hands make light work. " * 300


def _config(tmp: Path, arch: str, batch: int, extra_model: dict | None = None) -> Path:
    cfg = {
        "model": {"arch": arch, "n_layer": 1, "n_head": 2, "d_model": 32, "context_len": 16,
                  **(extra_model or {})},
        "train": {"max_steps": 6, "batch_size": batch, "lr": 3e-3, "warmup_steps": 1,
                  "eval_every": 6, "save_every": 3, "eval_batches": 2, "log_every": 1,
                  "precision": "fp32", "seed": 3},
        "data": {"source": str(tmp / "text.txt"), "tokenizer": "char"},
    }
    path = tmp / f"{arch}-{batch}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "LATEST").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


def _run(args: list[str], nproc: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "memlm", "train", *args, "--quiet"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("arch, extra", [("gpt", None), ("dnc", {"mem_slots": 8})])
def test_two_processes_match_one_process(tmp_path, arch, extra):
    from memlm.registry import ARCHITECTURES

    if arch not in ARCHITECTURES:
        pytest.skip(f"architecture {arch!r} is not available")
    fields = ARCHITECTURES.get(arch).config_cls.__dataclass_fields__
    extra = {k: v for k, v in (extra or {}).items() if k in fields}
    (tmp_path / "text.txt").write_text(TEXT)
    single, double = tmp_path / "single", tmp_path / "double"
    _run([str(_config(tmp_path, arch, 8, extra)), "--out", str(single)], nproc=1)
    _run([str(_config(tmp_path, arch, 4, extra)), "--out", str(double)], nproc=2)
    a, b = _weights(single), _weights(double)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    # only rank 0 wrote: one metrics line per logged step
    steps = [ln for ln in (double / "metrics.jsonl").read_text().splitlines()
             if '"kind": "train"' in ln]
    assert len(steps) == 6


def test_fsdp2_run_trains_and_resumes(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    cfg = _config(tmp_path, "gpt", 4)
    out = tmp_path / "fsdp"
    _run([str(cfg), "--out", str(out), "--fsdp", "--steps", "3"], nproc=2)
    assert (out / "LATEST").read_text().strip() == "step-0000003"
    _run([str(cfg), "--out", str(out), "--fsdp", "--resume"], nproc=2)
    assert (out / "LATEST").read_text().strip() == "step-0000006"
    import memlm

    model = memlm.load(out)
    assert model.num_params() > 0
