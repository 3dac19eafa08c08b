"""The trainer: one loop for every architecture.

It talks to a model only through the interface in `memlm.models.base`: it
sums `out.loss` (LM + weighted aux losses), logs `out.aux_losses` and
`out.metrics`, carries `out.state` between consecutive segments when the model
is stateful (truncated BPTT over `train.bptt_window` segments), and calls
`model.on_train_step_end` after each optimizer step. It never names an
architecture.

Exact resume: the learning rate is a pure function of the step, batches are a
pure function of (seed, position), and a checkpoint holds weights, optimizer,
RNG states, data position and live memory state. A run killed with SIGKILL and
resumed ends with the same weights as an uninterrupted run (bit-identical on
CPU; tested).

Nothing is lost on failure: the run folder is locked for the whole run (a second
writer stops at once), everything (config, device, data, model) is checked before
an existing run is touched, `--overwrite` moves the old run aside and restores it
if the new one fails before its first checkpoint, and a checkpoint is written only
from finite weights that give a finite loss, so a diverged run keeps its last good
checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from memlm import io as memlm_io
from memlm.config import RunConfig, save_run_config
from memlm.data.batches import (
    Batch,
    BatchSource,
    RandomEpisodes,
    RandomWindows,
    RenameRows,
    StreamRows,
)
from memlm.data.tokenizer_export import write_tokenizer_files
from memlm.errors import ConfigError, RunExistsError, TrainingDivergedError
from memlm.eval.perplexity import evaluate
from memlm.nn.precision import autocast_context
from memlm.registry import DATASETS, build_from_config
from memlm.train import checkpoint as ckpt
from memlm.train import run as runlayout
from memlm.train.distributed import DistEnv, wrap_model
from memlm.train.loggers import TENSORBOARD_DIR, WANDB_ID, make_loggers
from memlm.train.optim import build_optimizer, set_lr, stage_lr_at
from memlm.train.warm_start import init_from
from memlm.types import IGNORE_INDEX, evaluating, tree_to

Callback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    model: Any
    tokenizer: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    tokens_per_sec: float = 0.0
    wall_time: float = 0.0
    run_dir: Path | None = None


def resolve_device(name: str) -> torch.device:
    """The torch device for train.device; ConfigError when it is not usable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto.") from e
    available = {
        "cpu": lambda: True,
        "cuda": lambda: torch.cuda.is_available(),
        "mps": lambda: torch.backends.mps.is_available(),
        "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
    }
    if not available.get(device.type, lambda: False)():
        raise ConfigError(
            f"device {name!r} is not available: this PyTorch {torch.__version__} sees no "
            f"{device.type} device. Use --device cpu or --device auto."
        )
    if device.type == "cuda" and device.index is not None and \
            device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA "
                          "device(s) are visible. Use cuda:0 or auto.")
    return device


# ----- data -------------------------------------------------------------------------------


@dataclass
class DataBundle:
    tokenizer: Any
    #: (seq_len, batch_size[, segments][, options=]) -> source; segments: an episode's
    #: length (layout episodes), the stage's bptt_window under a curriculum; options: a
    #: stage's `source_options` (dataset sources only)
    make_train: Callable[..., BatchSource]
    val_tokens: np.ndarray | None = None
    make_val: Callable[[int, int], BatchSource] | None = None
    val_bytes: int | None = None
    #: `data.score: answers`: the validation tokens that are scored (None: all)
    val_scored: np.ndarray | None = None


def _dataset_name(source: str) -> str | None:
    prefix = source.split(":", 1)[0]
    return prefix if ":" in source and prefix in DATASETS else None


def _rename_groups(cfg: RunConfig, tokenizer) -> list[np.ndarray] | None:
    """`data.rename`: the entity id classes (persons, rooms) of the run's bAbI tasks."""
    if not cfg.data.rename:
        return None
    from memlm.data.babi import entity_token_groups

    source = cfg.data.source
    if source.startswith("babi:"):
        from memlm.data.corpus import parse_babi_source

        tasks, babi_dir, _ = parse_babi_source(source)
    elif source.startswith("babilong:"):
        from memlm.data.babilong import parse_source_spec

        tasks, options = parse_source_spec(source)
        babi_dir = options.get("babi")
    else:
        raise ConfigError(f"data.rename renames bAbI persons and rooms; it needs a babi: or "
                          f"babilong: source, not {source!r}. Remove data.rename.")
    return entity_token_groups(tasks, tokenizer, babi_dir)


def prepare_bundle(cfg: RunConfig, stateful: bool, tokenizer=None, dist: DistEnv | None = None,
                   progress: bool = True) -> DataBundle:
    """Tokenizer + train batch-source factory + validation data for a run config."""
    dist = dist or DistEnv()
    seed = cfg.train.seed
    name = _dataset_name(cfg.data.source)
    if name is not None:
        from memlm.data.tokenizers import make_tokenizer

        if cfg.data.score != "all":
            raise ConfigError(f"data.score applies to text sources; the {name}: dataset decides "
                              "its own targets (it scores answers only); remove data.score.")

        tok = tokenizer or make_tokenizer(cfg.data.tokenizer)
        factory = DATASETS.get(name)

        groups = _rename_groups(cfg, tok)

        def make(split: str, seed_: int):
            def build(seq_len: int, batch_size: int, segments: int | None = None,
                      options: str | None = None) -> BatchSource:
                source = factory(cfg.data.source + (options or ""), tokenizer=tok,
                                 batch_size=batch_size,
                                 seq_len=seq_len, seed=seed_, split=split,
                                 rank=dist.rank, world_size=dist.world_size)
                if groups and split == "train":
                    source = RenameRows(source, groups, tok.vocab_size, seed_, dist.rank)
                return source
            return build

        return DataBundle(tok, make("train", seed), make_val=make("val", seed + 1))

    from memlm.data.corpus import prepare_data

    data = prepare_data(cfg.data, tokenizer=tokenizer, seed=seed, progress=progress)
    layout = cfg.data.layout
    if layout == "auto":
        layout = "stream" if stateful else "random"
    if layout == "episodes" and not stateful:
        layout = "random"  # without a memory an episode is just a random window
    if layout == "sliding" and data.train_scored is not None:
        raise ConfigError("data.score: answers works with the random, stream and episodes "
                          "layouts; the sliding layout scores by data.sliding_score.")
    scored = data.train_scored
    groups = _rename_groups(cfg, data.tokenizer)

    def make_train(seq_len: int, batch_size: int, segments: int | None = None) -> BatchSource:
        source = make_rows(seq_len, batch_size, segments)
        if groups:
            source = RenameRows(source, groups, data.tokenizer.vocab_size, seed, dist.rank)
        return source

    def make_rows(seq_len: int, batch_size: int, segments: int | None = None) -> BatchSource:
        if layout == "sliding":  # the originals' sliding-window LM samples
            from memlm.data.sliding import SlidingWindows

            stride = cfg.data.stride or min(getattr(cfg.model, "segment_len", None) or seq_len,
                                             seq_len)
            return SlidingWindows(data.train, batch_size, seq_len, stride,
                                  cfg.data.sliding_score, seed=seed, rank=dist.rank,
                                  world_size=dist.world_size)
        if layout == "episodes":
            return RandomEpisodes(data.train, batch_size, seq_len,
                                  segments or cfg.train.bptt_window,
                                  seed=seed, rank=dist.rank, world_size=dist.world_size,
                                  scored=scored)
        cls = StreamRows if layout == "stream" else RandomWindows
        return cls(data.train, batch_size, seq_len, seed=seed, rank=dist.rank,
                   world_size=dist.world_size, scored=scored)

    val_bytes = None
    try:
        val_bytes = len(data.tokenizer.decode(np.asarray(data.val[1:]).tolist()).encode("utf-8"))
    except Exception:  # a tokenizer that cannot decode arbitrary ids: no bits-per-byte
        val_bytes = None
    return DataBundle(data.tokenizer, make_train, val_tokens=data.val, val_bytes=val_bytes,
                      val_scored=data.val_scored)


# ----- run folder ---------------------------------------------------------------------------


#: what a run writes into its folder; --overwrite moves exactly these aside
RUN_FILES = (runlayout.RUN_CONFIG, runlayout.TOKENIZER, runlayout.LATEST, runlayout.METRICS,
             runlayout.CKPT_DIR, "curve.png", "summary.json", TENSORBOARD_DIR, WANDB_ID, "wandb")
#: where --overwrite keeps the old run until the new one has its first checkpoint
ASIDE = ".replaced-run"


def _move_run(src: Path, dst: Path) -> None:
    """Move the run files present in `src` into `dst` (same file system: renames)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (src / name).exists() or (src / name).is_symlink():
            (src / name).rename(dst / name)


def _remove_run_files(folder: Path) -> None:
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _restore_aside(out_dir: Path) -> None:
    """Put back a run that --overwrite moved aside (the new one never got a checkpoint)."""
    aside = out_dir / ASIDE
    if not aside.is_dir():
        return
    _remove_run_files(out_dir)
    for name in RUN_FILES:
        if (aside / name).exists() or (aside / name).is_symlink():
            (aside / name).rename(out_dir / name)
    shutil.rmtree(aside)


def _prepare_out_dir(out_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> bool:
    """Return True when an existing run should be resumed. Changes nothing on disk."""
    existing = out_dir / runlayout.RUN_CONFIG
    if not existing.exists():
        return False
    if overwrite:
        return False
    if not resume:
        raise RunExistsError(
            f"{out_dir} already holds a run (run.yaml). Pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out folder."
        )
    from memlm.config import load_run_config

    try:
        old = load_run_config(existing)
    except ConfigError as e:
        raise RunExistsError(f"cannot resume {out_dir}: its {runlayout.RUN_CONFIG} is damaged "
                             f"({e}). Use --overwrite or another --out.") from e

    def model_key(c: RunConfig) -> dict[str, Any]:  # vocab_size comes from the tokenizer
        return {k: v for k, v in c.model.to_dict().items() if k != "vocab_size"}

    if model_key(old) != model_key(cfg) or old.data.to_dict() != cfg.data.to_dict():
        raise RunExistsError(
            f"{out_dir} holds a different run (its model or data config differs from the one "
            "given), so it cannot be resumed with this config. Use --overwrite or another --out."
        )
    return runlayout.latest_checkpoint(out_dir) is not None


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----- the loop -----------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: RunConfig, out_dir: str | Path | None = None, resume: bool = False,
                 overwrite: bool = False, progress: bool = True,
                 callbacks: tuple[Callback, ...] = (), fsdp: bool = False):
        self.cfg = cfg
        self.tcfg = cfg.train
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.callbacks = callbacks
        self.dist = DistEnv.from_env()
        self.device = self.dist.device if self.dist.world_size > 1 else resolve_device(
            self.tcfg.device)
        self.history: list[dict[str, Any]] = []
        self.resuming = False
        self._lock: runlayout.RunLock | None = None
        self._created_dir = False  # this process made out_dir (remove it if the run fails)
        self._new_run = False  # this process starts a fresh run in out_dir
        self._checkpoints_written = 0
        if self.out_dir is not None and self.dist.is_main:
            self._lock_out_dir()
            try:
                self.resuming = _prepare_out_dir(self.out_dir, cfg, resume, overwrite)
            except BaseException:
                self._abandon()
                raise
        elif self.out_dir is not None:
            self.resuming = resume and runlayout.latest_checkpoint(self.out_dir) is not None
        self.dist.barrier()
        try:
            self._setup(cfg, fsdp)
        except BaseException:
            self._abandon()
            raise

    def _lock_out_dir(self) -> None:
        """Create (if needed) and lock out_dir; recover an interrupted --overwrite."""
        assert self.out_dir is not None
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise RunExistsError(f"--out {self.out_dir} is a file, not a folder; choose a "
                                 "folder for the run.")
        if not self.out_dir.exists():
            self.out_dir.mkdir(parents=True)
            self._created_dir = True
        elif not os.access(self.out_dir, os.W_OK | os.X_OK):
            raise RunExistsError(f"--out {self.out_dir} is not writable; fix its permissions or "
                                 "choose another folder.")
        self._lock = runlayout.RunLock(self.out_dir)
        if (self.out_dir / ASIDE).is_dir():  # a previous --overwrite died before its 1st save
            _restore_aside(self.out_dir)
            print(f"memlm: note: restored the run in {self.out_dir} that an interrupted "
                  "--overwrite had moved aside", file=sys.stderr)

    def _abandon(self) -> None:
        """The run failed: undo a new run that has no checkpoint yet, then unlock.

        A resumed run, or a new one with a checkpoint, is left as it is (it is a valid
        run). A new one without a checkpoint is removed; the run --overwrite moved aside
        comes back; a folder this process created is removed when empty.
        """
        if self._lock is None:
            return
        assert self.out_dir is not None
        try:
            if self._new_run and self._checkpoints_written == 0:
                _remove_run_files(self.out_dir)
                _restore_aside(self.out_dir)
            if self._created_dir and not any(self.out_dir.iterdir()):
                self.out_dir.rmdir()
        finally:
            self._lock.release()
            self._lock = None

    def _start_new_run(self) -> None:
        """Everything was checked: move an old run aside and write the new run's files."""
        assert self.out_dir is not None
        self._new_run = True
        if any((self.out_dir / name).exists() for name in RUN_FILES):
            _move_run(self.out_dir, self.out_dir / ASIDE)  # back if we fail before a save
        save_run_config(self.cfg, self.out_dir / runlayout.RUN_CONFIG)
        self.data.tokenizer.save(self.out_dir / runlayout.TOKENIZER)

    def _setup(self, cfg: RunConfig, fsdp: bool) -> None:
        progress = self.progress

        # tokenizer first: the model's vocabulary comes from it
        tokenizer = None
        if self.resuming:
            from memlm.data.tokenizers import load_tokenizer

            tokenizer = load_tokenizer(self.out_dir / runlayout.TOKENIZER)
            latest = runlayout.latest_checkpoint(self.out_dir)
            assert latest is not None
            runlayout.check_tokenizer_fingerprint(tokenizer, latest,
                                                  self.out_dir / runlayout.TOKENIZER)
        from memlm.registry import ARCHITECTURES

        stateful = bool(getattr(ARCHITECTURES.get(cfg.model.arch).model_cls, "is_stateful",
                                False))
        if not self.dist.is_main:
            self.dist.barrier()  # rank 0 tokenises first and fills the cache
        self.data = prepare_bundle(cfg, stateful, tokenizer, self.dist,
                                   progress and self.dist.is_main)
        if self.dist.is_main:
            self.dist.barrier()
        if cfg.model.vocab_size != self.data.tokenizer.vocab_size:
            self.cfg = cfg = RunConfig(cfg.model.replace(vocab_size=self.data.tokenizer.vocab_size),
                                       cfg.train, cfg.data)

        torch.manual_seed(self.tcfg.seed)
        random.seed(self.tcfg.seed)
        self.model = build_from_config(cfg.model).to(self.device)
        if self.tcfg.init_from and not self.resuming:
            started = init_from(self.model, self.tcfg.init_from, self.data.tokenizer)
            if self.dist.is_main:
                print(f"memlm: {started.summary()}", file=sys.stderr)
        self.stateful = self.model.is_stateful
        self.fsdp = fsdp and self.dist.world_size > 1
        # wrap before building the optimizer: FSDP2 swaps parameters for sharded ones
        self.forward_model = wrap_model(self.model, self.dist, fsdp=self.fsdp,
                                        compile=self.tcfg.compile)
        self.optimizer = build_optimizer(self.model, self.tcfg)
        # memory maintenance may reset optimizer moments of re-seeded slots (GMT)
        self.model.attach_optimizer(self.optimizer)

        self.stages = self._stages()
        self.max_steps = sum(s["steps"] for s in self.stages)
        self.step = 0
        self.stage_idx = 0
        self.stage_best: dict[str, Any] | None = None  # the current stage's best validation
        self._best_weights: dict[str, torch.Tensor] | None = None  # its weights, no run folder
        if self.tcfg.stage_handover == "best" and self.fsdp:
            raise ConfigError("train.stage_handover: best is not supported with --fsdp; use "
                              "DDP (the default) or stage_handover: continue.")
        self._check_stage_sources()
        self.source = self._make_source(0)
        self.state = None
        self.prefix_state = None  # the memory after the last prefix (data prefix=K)
        self.tokens_seen = 0
        if self.resuming:
            self._load_checkpoint()
        elif self.out_dir is not None and self.dist.is_main:
            self._start_new_run()
        self.loggers = (make_loggers(self.tcfg.loggers, self.out_dir, self.cfg.to_dict(),
                                     self.step)
                        if self.out_dir is not None and self.dist.is_main else [])

    def close_loggers(self) -> None:
        """Flush and close TensorBoard/W&B (idempotent: fit and train() both call it)."""
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            logger.close()

    # ----- pieces -----
    def _stages(self) -> list[dict[str, Any]]:
        seq_len = self.cfg.data.seq_len or self.cfg.model.context_len
        if not self.tcfg.curriculum:
            return [{"steps": self.tcfg.max_steps, "seq_len": seq_len,
                     "batch_size": self.tcfg.batch_size, "bptt_window": self.tcfg.bptt_window}]
        # stages are CurriculumStage, checked by the config; null fields keep the run's values.
        # grad_accum per stage keeps the total batch while long stages shrink the micro batch
        # (the originals' BS x accumulation = 64 at every stage)
        return [{"steps": st.steps, "seq_len": st.seq_len or seq_len,
                 "batch_size": st.batch_size or self.tcfg.batch_size,
                 "grad_accum": st.grad_accum or self.tcfg.grad_accum,
                 "bptt_window": st.bptt_window or self.tcfg.bptt_window,
                 "source_options": st.source_options}
                for st in self.tcfg.curriculum]

    def _stage_for_step(self, step: int) -> int:
        total = 0
        for i, st in enumerate(self.stages):
            total += st["steps"]
            if step < total:
                return i
        return len(self.stages) - 1

    def _make_source(self, stage_idx: int) -> BatchSource:
        st = self.stages[stage_idx]
        if st.get("source_options"):
            return self.data.make_train(st["seq_len"], st["batch_size"], st["bptt_window"],
                                        options=st["source_options"])
        return self.data.make_train(st["seq_len"], st["batch_size"], st["bptt_window"])

    def _check_stage_sources(self) -> None:
        """Build every stage's source that has its own options now: a typo in the last
        stage's options must fail before the first stage's hour of training, not after."""
        for i, st in enumerate(self.stages):
            if st.get("source_options"):
                if _dataset_name(self.cfg.data.source) is None:
                    raise ConfigError(f"train.curriculum stage {i + 1} has source_options, but "
                                      f"data.source {self.cfg.data.source!r} is a text source; "
                                      "source_options add options to a dataset source such as "
                                      "babilong:qa1")
                self._make_source(i)

    def _emit(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        for logger in self.loggers:  # metrics.jsonl, TensorBoard, W&B (memlm/train/loggers.py)
            logger.log(record)
        for cb in self.callbacks:
            cb(record)

    # ----- one optimizer step -----
    def _micro_step(self, scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """Forward/backward over the stage's `bptt_window` segments (1 for stateless models)."""
        n_seg = self.stages[self.stage_idx]["bptt_window"] if self.stateful else 1
        host: list[Batch] = [self.source.next_batch() for _ in range(n_seg)]
        # count scored tokens while the targets are still on the host: counting them on a
        # GPU would wait for the device once per batch (no host sync inside a step)
        counts = [max(b.n_tokens, 0) for b in host]
        batches = [b.to(self.device) for b in host]
        total_tokens = sum(counts)
        loss_sum = torch.zeros((), device=self.device)
        logs: dict[str, torch.Tensor] = {}
        for batch, count in zip(batches, counts):
            extra: dict[str, torch.Tensor] = {}
            if self.stateful and batch.prefix is not None:
                self.state = self._read_prefix(batch)
            elif self.stateful:
                self.state = self._continued(self.state, batch)
                if batch.attention_mask is not None:  # padding must not write the memory
                    extra["attention_mask"] = batch.attention_mask
            elif batch.attention_mask is not None or batch.prefix is not None:
                raise ConfigError(f"the data source hands memory to the rows (carry=P or "
                                  f"prefix=K), but {self.cfg.model.arch} has no memory; drop "
                                  "them from data.source or train a memory model (armt, rmt)")
            with autocast_context(self.device, self.tcfg.precision):
                out = self.forward_model(batch.input_ids, targets=batch.targets, state=self.state,
                                         **extra)
            weight = count / max(total_tokens, 1)
            loss_sum = loss_sum + out.loss * weight
            for name, value in {**out.aux_losses, **out.metrics}.items():
                logs[name] = logs.get(name, 0) + value.detach().float() * weight
            logs["lm_loss"] = logs.get("lm_loss", 0) + out.lm_loss.detach().float() * weight
            if self.stateful:
                self.state = out.state
        (loss_sum * scale).backward()
        if self.stateful:
            self.state = self.model.detach_state(self.state)
        n_tokens = sum(b.input_ids.numel() for b in batches)
        return loss_sum.detach(), logs, n_tokens

    def _continued(self, state: Any, batch: Batch) -> Any:
        """`state` carried into `batch`: the initial memory when there is none yet, and
        reset on the rows the batch marks `new_stream`."""
        if state is None:
            state = self.model.init_state(batch.input_ids.shape[0], self.device)
        if batch.new_stream is not None:
            state = self.model.reset_state_rows(state, batch.new_stream)
        return state

    def _read_prefix(self, batch: Batch) -> Any:
        """The memory a row with a `prefix` starts from: the previous step's prefix memory
        (fresh where `new_stream`), after reading this step's prefix without gradient
        (an empty memory where `empty_rows`). The prefix memory is kept apart from
        `self.state`, so what is carried is the prefix stream only."""
        state = self._continued(self.prefix_state, batch)
        with torch.no_grad(), autocast_context(self.device, self.tcfg.precision):
            state = self.model(batch.prefix, state=state).state
        self.prefix_state = self.model.detach_state(state)
        if batch.empty_rows is not None:  # these rows start empty; their stream goes on
            return self.model.reset_state_rows(self.prefix_state, batch.empty_rows)
        return self.prefix_state

    # ----- curriculum stage hand-over -----
    def _stage_end(self, step: int) -> bool:
        """True when `step` is the last step of a curriculum stage (not of the run)."""
        ends = np.cumsum([st["steps"] for st in self.stages])[:-1]
        return step in set(ends.tolist())

    def _best_dir(self, stage: int) -> Path:
        assert self.out_dir is not None
        return self.out_dir / runlayout.CKPT_DIR / f"best-stage-{stage}"

    def _track_best(self, val: dict[str, Any]) -> None:
        """Keep the stage's best weights (stage_handover: best): a model folder per stage."""
        from memlm.config import STAGE_METRICS

        metric = self.tcfg.stage_metric
        value = val.get(metric)
        if value is None or not math.isfinite(value):
            return
        best = self.stage_best
        higher = STAGE_METRICS[metric]
        if best is not None and best["stage"] == self.stage_idx and not (
                value > best["value"] if higher else value < best["value"]):
            return
        self.stage_best = {"stage": self.stage_idx, "value": float(value), "step": self.step}
        if self.out_dir is None:
            self._best_weights = {k: v.detach().clone()
                                  for k, v in self.model.state_dict().items()}
        elif self.dist.is_main:
            final = self._best_dir(self.stage_idx)
            tmp = final.with_name(f".{final.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save_pretrained(
                tmp, **{runlayout.TOKENIZER_FINGERPRINT: self.data.tokenizer.fingerprint(),
                        "stage_best": self.stage_best})
            write_tokenizer_files(self.data.tokenizer, tmp, self.cfg.model.context_len)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        self.dist.barrier()

    def _hand_over(self, finished: int) -> None:
        """Start the next stage from the finished stage's best weights, fresh optimizer."""
        best = self.stage_best
        if best is None or best["stage"] != finished:
            return  # the stage was never validated: go on with the current weights
        if self.out_dir is None:
            assert self._best_weights is not None
            self.model.load_state_dict(self._best_weights)
        else:
            memlm_io.load_weights(self.model, self._best_dir(finished) / "model.safetensors",
                              map_location=str(self.device))
        self.optimizer = build_optimizer(self.model, self.tcfg)
        self.model.attach_optimizer(self.optimizer)
        self._emit({"kind": "handover", "step": self.step, "stage": finished + 1,
                    "from_step": best["step"], f"best_{self.tcfg.stage_metric}": best["value"]})

    def train_step(self) -> dict[str, torch.Tensor]:
        stage = self._stage_for_step(self.step)
        if stage != self.stage_idx:
            if self.tcfg.stage_handover == "best":
                self._hand_over(self.stage_idx)
            self.stage_idx = stage
            self.source = self._make_source(stage)
            self.state = self.prefix_state = None
        lr = stage_lr_at(self.step, self.tcfg)
        set_lr(self.optimizer, lr)
        self.model.train()
        accum = self.stages[self.stage_idx].get("grad_accum", self.tcfg.grad_accum)
        loss_total = torch.zeros((), device=self.device)
        logs: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            with self.dist.no_sync(self.forward_model, last=micro == accum - 1):
                loss, micro_logs, n_tok = self._micro_step(1.0 / accum)
            loss_total += loss / accum
            for k, v in micro_logs.items():
                logs[k] = logs.get(k, 0) + v / accum
            self.tokens_seen += n_tok * self.dist.world_size
        if self.tcfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.grad_clip)
            logs["grad_norm"] = grad_norm.detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        with torch.no_grad():
            self.model.on_train_step_end(self.step, self.max_steps)
        logs["loss"] = loss_total
        logs["lr"] = torch.tensor(lr)
        return logs

    # ----- evaluation -----
    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, Any]:
        max_batches = max_batches or self.tcfg.eval_batches
        st = self.stages[self.stage_idx]
        if self.data.val_tokens is not None:
            return evaluate(self.model, self.data.val_tokens, seq_len=st["seq_len"],
                            batch_size=st["batch_size"], max_batches=max_batches,
                            precision=self.tcfg.precision, rows=1,
                            n_bytes=None, scored=self.data.val_scored)
        # task datasets: mean loss over a fixed set of validation batches
        from memlm.eval.metrics import TokenMetrics

        source = self.data.make_val(st["seq_len"], st["batch_size"])
        metrics = TokenMetrics()
        with evaluating(self.model):
            for _ in range(max_batches):
                batch = source.next_batch().to(self.device)
                state = self.model.init_state(batch.input_ids.shape[0], self.device)
                with autocast_context(self.device, self.tcfg.precision):
                    out = self.model(batch.input_ids, state=state)
                # models that return only the last segment's logits score the matching targets
                metrics.update(out.logits, batch.targets[:, -out.logits.shape[1]:])
        return metrics.compute()

    # ----- checkpoints -----
    def _weights_problem(self) -> str | None:
        """Why the current weights must not be checkpointed (None when they are fine).

        Finite weights are not enough: a huge learning rate leaves finite but enormous
        weights whose loss is NaN, so one validation batch must give a finite loss too.
        """
        bad = None
        for name, tensor in self.model.state_dict().items():
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # FSDP shard
            if local.is_floating_point() and not bool(torch.isfinite(local).all()):
                bad = name
                break
        # every rank must reach the same verdict (each sees only its shard under FSDP)
        flag = torch.tensor(0.0 if bad is None else 1.0, device=self.device)
        if float(self.dist.all_reduce_mean(flag)) > 0:
            return f"weight {bad!r} holds NaN or inf" if bad else "a weight holds NaN or inf"
        nll = self.evaluate(max_batches=1).get("nll", float("nan"))
        if not math.isfinite(nll):
            return f"the weights give a validation loss of {nll}"
        return None

    def _diverged(self, what: str) -> TrainingDivergedError:
        """The error for a diverged run, naming the checkpoint that really is on disk."""
        if self.out_dir is None:
            kept = "nothing was saved (no run folder)"
        else:
            latest = runlayout.latest_checkpoint(self.out_dir)
            if latest is not None and self._checkpoints_written + int(self.resuming) > 0:
                kept = f"the last good checkpoint {latest} was kept"
            elif (self.out_dir / ASIDE).is_dir():
                kept = (f"no checkpoint was written, so the previous run in {self.out_dir} "
                        "was restored")
            else:
                kept = "no checkpoint was written (it diverged before the first save)"
        return TrainingDivergedError(
            f"{what} at step {self.step}; training stopped and {kept}. Lower train.lr, raise "
            "warmup_steps, keep grad_clip on, or use precision: fp32."
        )

    def save_checkpoint(self) -> None:
        if self.out_dir is None:
            return
        problem = self._weights_problem()
        if problem is not None:
            raise self._diverged(problem)
        from memlm.train.distributed import full_model_state, full_optimizer_state

        # collectives first (FSDP2 gathers shards on every rank), then rank 0 writes
        model_state = full_model_state(self.model, self.fsdp)
        optim_state = full_optimizer_state(self.model, self.optimizer, self.fsdp)
        if self.dist.is_main:
            self._write_checkpoint(model_state, optim_state)
        self.dist.barrier()

    def _write_checkpoint(self, model_state: dict[str, torch.Tensor], optim_state) -> None:
        name = f"step-{self.step:07d}"
        final = self.out_dir / runlayout.CKPT_DIR / name
        tmp = self.out_dir / runlayout.CKPT_DIR / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        # the tokenizer's fingerprint goes into config.json: loading checks it (runlayout)
        stamp = {runlayout.TOKENIZER_FINGERPRINT: self.data.tokenizer.fingerprint(),
                 # the model card shows the run's latest validation numbers
                 "eval_results": runlayout.eval_results_from_run(self.out_dir)}
        if self.fsdp:  # write through a plain copy of the model holding the full weights
            plain = build_from_config(self.cfg.model)
            plain.load_state_dict(model_state, strict=False)
            plain.save_pretrained(tmp, **stamp)
        else:
            self.model.save_pretrained(tmp, **stamp)
        write_tokenizer_files(self.data.tokenizer, tmp, self.cfg.model.context_len)
        trainer_state = {
            "step": self.step,
            "stage_idx": self.stage_idx,
            "tokens_seen": self.tokens_seen,
            "optimizer": optim_state,
            "rng": _rng_state(),
            "data": self.source.state_dict(),
            "memory_state": ckpt.pack_state(self.state),
            "prefix_state": ckpt.pack_state(self.prefix_state),
            "stage_best": self.stage_best,
        }
        ckpt.save_trainer_state(trainer_state, tmp / runlayout.TRAINER_STATE)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        memlm_io.atomic_write_text(self.out_dir / runlayout.LATEST, name + "\n")
        self._checkpoints_written += 1
        # the new run now stands on its own: the run --overwrite moved aside can go
        shutil.rmtree(self.out_dir / ASIDE, ignore_errors=True)
        for old in (self.out_dir / runlayout.CKPT_DIR).glob("step-*"):  # best-stage-K stay
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self) -> None:
        from memlm.train.distributed import load_full_model_state, load_full_optimizer_state

        path = runlayout.latest_checkpoint(self.out_dir)
        if self.fsdp:
            plain = build_from_config(self.cfg.model)
            memlm_io.load_weights(plain, path / "model.safetensors")
            load_full_model_state(self.model, plain.state_dict(), fsdp=True)
        else:
            memlm_io.load_weights(self.model, path / "model.safetensors",
                              map_location=str(self.device))
        st = ckpt.load_trainer_state(path / runlayout.TRAINER_STATE)
        load_full_optimizer_state(self.model, self.optimizer, st["optimizer"], self.fsdp)
        self.step = int(st["step"])
        self.stage_idx = int(st["stage_idx"])
        self.tokens_seen = int(st["tokens_seen"])
        self.stage_best = st.get("stage_best")
        self.source = self._make_source(self.stage_idx)
        self.source.load_state_dict(st["data"])
        self.state = ckpt.unpack_state(st["memory_state"])
        self.prefix_state = ckpt.unpack_state(st.get("prefix_state"))
        if self.state is not None:
            self.state = tree_to(self.state, self.device)
        _set_rng_state(st["rng"])
        # forget metrics logged after the checkpoint (they will be produced again)
        metrics_path = self.out_dir / runlayout.METRICS
        if metrics_path.exists() and self.dist.is_main:
            kept, records = [], []
            for i, line in enumerate(metrics_path.read_text(errors="replace").splitlines()):
                try:
                    record = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    record = None
                    print(f"memlm: warning: skipped a damaged line {i + 1} of {metrics_path} "
                          "(cut by a crash?)", file=sys.stderr)
                if isinstance(record, dict) and record.get("step", 0) <= self.step:
                    kept.append(line)
                    records.append(record)
            memlm_io.atomic_write_text(metrics_path, "".join(k + "\n" for k in kept))
            self.history = records

    # ----- main loop -----
    def fit(self) -> TrainResult:
        """Train to the end; on any failure undo a run that has no checkpoint, then unlock."""
        try:
            result = self._fit()
        except BaseException:
            self._abandon()
            raise
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        return result

    def _fit(self) -> TrainResult:
        t0 = time.perf_counter()
        tcfg = self.tcfg
        bar = tqdm(total=self.max_steps, initial=self.step, desc="train",
                   disable=(not self.progress or not self.dist.is_main) or None,
                   dynamic_ncols=True)
        window_t0, window_tokens = time.perf_counter(), self.tokens_seen
        pending: list[dict[str, torch.Tensor]] = []
        last_tps = 0.0
        while self.step < self.max_steps:
            logs = self.train_step()
            pending.append(logs)
            bar.update(1)
            is_last = self.step == self.max_steps
            if self.step % tcfg.log_every == 0 or is_last or self.step % tcfg.save_every == 0:
                # one host sync per log interval: average what accumulated on device
                rec = {"step": self.step, "tokens": self.tokens_seen}
                for k in pending[-1]:
                    vals = [torch.as_tensor(p[k]).float() for p in pending if k in p]
                    mean = torch.stack(vals).mean()
                    if k in ("loss", "lm_loss"):
                        mean = self.dist.all_reduce_mean(mean.to(self.device))
                    rec[k] = float(mean.cpu())
                pending.clear()
                if not math.isfinite(rec["loss"]):
                    bar.close()
                    raise self._diverged(f"loss became {rec['loss']}")
                now = time.perf_counter()
                last_tps = (self.tokens_seen - window_tokens) / max(now - window_t0, 1e-9)
                window_t0, window_tokens = now, self.tokens_seen
                rec["tokens_per_sec"] = last_tps
                self._emit({"kind": "train", **rec})
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{last_tps:,.0f}")
            handover = tcfg.stage_handover == "best" and self._stage_end(self.step)
            if self.step % tcfg.eval_every == 0 or is_last or handover:
                val = self.evaluate()
                self._emit({"kind": "val", "step": self.step,
                            **{f"val_{k}": v for k, v in val.items()}})
                if tcfg.stage_handover == "best":
                    self._track_best(val)
            if self.step % tcfg.save_every == 0 or is_last:
                self.save_checkpoint()
        bar.close()
        self.close_loggers()
        wall = time.perf_counter() - t0
        final = self.evaluate(max_batches=tcfg.eval_batches)
        result = TrainResult(self.model, self.data.tokenizer, self.history, final,
                             tokens_per_sec=self.tokens_seen / max(wall, 1e-9)
                             if not self.resuming else last_tps,
                             wall_time=wall, run_dir=self.out_dir)
        if self.out_dir is not None and self.dist.is_main:
            memlm_io.atomic_write_json(self.out_dir / "summary.json", {
                "step": self.step, "wall_time": wall, "tokens_per_sec": result.tokens_per_sec,
                "params": self.model.num_params(),
                "params_non_embedding": self.model.num_params(non_embedding=True),
                "final": final,
            })
            from memlm.plots import plot_training_curves

            plot_training_curves(self.history, self.out_dir / "curve.png",
                                 title=f"{self.cfg.model.arch}")
        return result


def train(run_config: RunConfig, out_dir: str | Path | None = None, resume: bool = False,
          overwrite: bool = False, progress: bool = True, callbacks: tuple[Callback, ...] = (),
          fsdp: bool = False) -> TrainResult:
    """Train a model as `run_config` says; write the run to `out_dir` when given."""
    trainer = Trainer(run_config, out_dir, resume=resume, overwrite=overwrite, progress=progress,
                      callbacks=callbacks, fsdp=fsdp)
    try:
        return trainer.fit()
    finally:
        trainer.close_loggers()


__all__ = ["IGNORE_INDEX", "TrainResult", "Trainer", "train"]
