"""Where training metrics go: metrics.jsonl always, TensorBoard and W&B on request.

    train:
      loggers: [jsonl, tensorboard, wandb]

Every record the trainer emits (`{"kind": "train" | "val", "step": ..., ...}`,
documented key by key in docs/metrics.md) goes to each logger:

- **jsonl**: one JSON object per line in RUN/metrics.jsonl. Always on, whether
  listed or not: memlm reads this file back (resume, the model card, the loss
  curve, `memlm compare`).
- **tensorboard**: scalars `train/loss`, `val/val_ppl`, ... in RUN/tensorboard/
  (`tensorboard --logdir RUN/tensorboard`). Needs the `tensorboard` package
  (`pip install "memlm[tensorboard]"`). A resumed run purges the events logged
  after its checkpoint, as metrics.jsonl forgets them.
- **wandb**: the same scalars in a Weights & Biases run named after the run
  folder, its files under RUN/wandb/, the run config as the W&B config. The id
  is kept in RUN/wandb_run_id so a resumed run continues the same W&B run.
  Needs `wandb` (`pip install "memlm[wandb]"`); set WANDB_MODE=offline to log
  without an account (what the tests do), WANDB_PROJECT to pick the project.

The optional packages are imported when the trainer starts, so a missing one
stops a run before any training with a one-line error saying what to install.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Protocol

# the logger names are config vocabulary: config.py validates them without importing train/
from memlm.config import check_logger_names
from memlm.errors import ConfigError

METRICS = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID = "wandb_run_id"


class MetricsLogger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {"train/loss": ...}) for the finite numbers of a record."""
    kind = record.get("kind", "train")
    out = {}
    for key, value in record.items():
        if key in ("kind", "step") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[f"{kind}/{key}"] = float(value)
    return int(record.get("step", 0)), out


class JsonlLogger:
    """Appends each record to RUN/metrics.jsonl (opened per record: a crash loses nothing)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / METRICS

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Scalars into RUN/tensorboard with torch's SummaryWriter."""

    def __init__(self, out_dir: Path, start_step: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError("train.loggers names tensorboard but the tensorboard package is "
                              "not installed: pip install 'memlm[tensorboard]'.") from e
        # purge_step drops events a crashed run logged after the checkpoint it resumes from
        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / TENSORBOARD_DIR),
                                    purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict[str, Any]) -> None:
        step, scalars = _scalars(record)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """Scalars into a W&B run that lives as long as the run folder (same id on resume)."""

    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("train.loggers names wandb but the wandb package is not "
                              "installed: pip install 'memlm[wandb]'.") from e
        out_dir = Path(out_dir)
        id_file = out_dir / WANDB_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "memlm"),
                              name=out_dir.resolve().name, id=run_id, resume="allow",
                              dir=str(out_dir), config=config, reinit="create_new",
                              settings=wandb.Settings(console="off", x_disable_stats=True))

    def log(self, record: dict[str, Any]) -> None:
        step, scalars = _scalars(record)
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def make_loggers(names: list[str] | tuple[str, ...], out_dir: str | Path,
                 config: dict[str, Any], start_step: int = 0) -> list[MetricsLogger]:
    """The loggers for a run folder: jsonl first (always), then the ones `names` asks for."""
    check_logger_names(names)
    out_dir = Path(out_dir)
    loggers: list[MetricsLogger] = [JsonlLogger(out_dir)]
    if "tensorboard" in names:
        loggers.append(TensorBoardLogger(out_dir, start_step))
    if "wandb" in names:
        loggers.append(WandbLogger(out_dir, config))
    return loggers
