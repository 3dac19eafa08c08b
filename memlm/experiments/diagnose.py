"""`memlm diagnose ARCH`: train a tiny model on a synthetic task, then measure its recall.

Scoring a model that already exists is memlm/eval/diagnose.py; this experiment adds the
training step, so `memlm diagnose gpt --task mqar` answers "can this architecture learn
the task at all" in one command.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: task -> its two difficulty axes, as the synthetic source's option names
TASK_AXES = {"mqar": ("pairs", "distance"), "copy": ("length", "delay"),
             "needle": ("haystack", "depth")}


def train_for_task(arch: str, task: str, first: int, second: int, context_len: int,
                   seq_len: int, steps: int) -> Any:
    """A tiny `arch` (2 layers, d_model 64) trained on `task` at its hardest setting."""
    from memlm.config import DataConfig, RunConfig, TrainConfig
    from memlm.registry import ARCHITECTURES
    from memlm.train.trainer import train

    spec = ARCHITECTURES.get(arch)
    keys = TASK_AXES[task]
    second_value = second / 100 if task == "needle" else second
    source = f"{task}:{keys[0]}={first},{keys[1]}={second_value},vocab=64"
    model_cfg = spec.config_cls.from_dict({"arch": arch, "n_layer": 2, "d_model": 64,
                                           "n_head": 4, "context_len": context_len})
    cfg = RunConfig(model_cfg, TrainConfig(max_steps=steps, batch_size=16, lr=3e-3,
                                           eval_every=steps, save_every=steps),
                    DataConfig(source=source, tokenizer="byte", seq_len=seq_len))
    print(f"training a tiny {arch} on {source} for {steps} steps ...")
    return train(cfg, None, progress=True).model


def diagnose_run_or_arch(run: str, task: str, first: Sequence[int], second: Sequence[int],
                         n_samples: int = 20, seed: int = 0, context_len: int = 128,
                         seq_len: int | None = None, train_steps: int = 300) -> str:
    """Accuracy table of the model in folder `run`, or of a tiny `run` architecture
    trained first (when no such folder exists). Returns the printable report."""
    from memlm.eval.diagnose import diagnose, format_rows
    from memlm.train.run import load_any_model

    if Path(run).exists():
        model = load_any_model(run)
    else:
        model = train_for_task(run, task, max(first), max(second), context_len, seq_len,
                               train_steps)
    rows = diagnose(model, task, first, second, n_samples=n_samples, seed=seed)
    return (f"{task}: accuracy (all scored tokens right) vs difficulty; "
            f"model window {model.config.context_len} tokens\n" + format_rows(rows))
