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
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import memlm
from memlm.config import RunConfig, save_run_config
from memlm.data.batches import Batch, BatchSource, RandomEpisodes, RandomWindows, StreamRows
from memlm.errors import RunExistsError, TrainingDivergedError
from memlm.eval.perplexity import autocast_context, evaluate
from memlm.hf_files import write_tokenizer_files
from memlm.models.base import IGNORE_INDEX
from memlm.registry import DATASETS
from memlm.train import checkpoint as ckpt
from memlm.train import run as runlayout
from memlm.train.distributed import DistEnv, wrap_model
from memlm.train.loggers import make_loggers
from memlm.train.optim import build_optimizer, lr_at, set_lr

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
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----- data -------------------------------------------------------------------------------


@dataclass
class DataBundle:
    tokenizer: Any
    make_train: Callable[[int, int], BatchSource]  # (seq_len, batch_size) -> source
    val_tokens: np.ndarray | None = None
    make_val: Callable[[int, int], BatchSource] | None = None
    val_bytes: int | None = None


def _dataset_name(source: str) -> str | None:
    prefix = source.split(":", 1)[0]
    return prefix if ":" in source and prefix in DATASETS else None


def prepare_bundle(cfg: RunConfig, stateful: bool, tokenizer=None, dist: DistEnv | None = None,
                   progress: bool = True) -> DataBundle:
    """Tokenizer + train batch-source factory + validation data for a run config."""
    dist = dist or DistEnv()
    seed = cfg.train.seed
    name = _dataset_name(cfg.data.source)
    if name is not None:
        from memlm.data.tokenizers import make_tokenizer

        tok = tokenizer or make_tokenizer(cfg.data.tokenizer)
        factory = DATASETS.get(name)

        def make(split: str, seed_: int):
            def build(seq_len: int, batch_size: int) -> BatchSource:
                return factory(cfg.data.source, tokenizer=tok, batch_size=batch_size,
                               seq_len=seq_len, seed=seed_, split=split,
                               rank=dist.rank, world_size=dist.world_size)
            return build

        return DataBundle(tok, make("train", seed), make_val=make("val", seed + 1))

    from memlm.data.corpus import prepare_data

    data = prepare_data(cfg.data, tokenizer=tokenizer, seed=seed, progress=progress)
    layout = cfg.data.layout
    if layout == "auto":
        layout = "stream" if stateful else "random"
    if layout == "episodes" and not stateful:
        layout = "random"  # without a memory an episode is just a random window

    def make_train(seq_len: int, batch_size: int) -> BatchSource:
        if layout == "episodes":
            return RandomEpisodes(data.train, batch_size, seq_len, cfg.train.bptt_window,
                                  seed=seed, rank=dist.rank, world_size=dist.world_size)
        cls = StreamRows if layout == "stream" else RandomWindows
        return cls(data.train, batch_size, seq_len, seed=seed, rank=dist.rank,
                   world_size=dist.world_size)

    val_bytes = None
    try:
        val_bytes = len(data.tokenizer.decode(np.asarray(data.val[1:]).tolist()).encode("utf-8"))
    except Exception:  # a tokenizer that cannot decode arbitrary ids: no bits-per-byte
        val_bytes = None
    return DataBundle(data.tokenizer, make_train, val_tokens=data.val, val_bytes=val_bytes)


# ----- run folder ---------------------------------------------------------------------------


def _prepare_out_dir(out_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> bool:
    """Return True when an existing run should be resumed."""
    existing = out_dir / runlayout.RUN_CONFIG
    if not existing.exists():
        return False
    if overwrite:
        for name in (runlayout.RUN_CONFIG, runlayout.TOKENIZER, runlayout.LATEST,
                     runlayout.METRICS, "curve.png", "summary.json"):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / runlayout.CKPT_DIR, ignore_errors=True)
        return False
    if not resume:
        raise RunExistsError(
            f"{out_dir} already holds a run (run.yaml). Pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out folder."
        )
    from memlm.config import load_run_config

    old = load_run_config(existing)

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
        if self.out_dir is not None and self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.resuming = _prepare_out_dir(self.out_dir, cfg, resume, overwrite)
        elif self.out_dir is not None:
            self.resuming = resume and runlayout.latest_checkpoint(self.out_dir) is not None
        self.dist.barrier()

        # tokenizer first: the model's vocabulary comes from it
        tokenizer = None
        if self.resuming:
            from memlm.data.tokenizers import load_tokenizer

            tokenizer = load_tokenizer(self.out_dir / runlayout.TOKENIZER)
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
        self.model = memlm.build_from_config(cfg.model).to(self.device)
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
        self.source = self._make_source(0)
        self.state = None
        self.tokens_seen = 0
        if self.resuming:
            self._load_checkpoint()
        elif self.out_dir is not None and self.dist.is_main:
            save_run_config(self.cfg, self.out_dir / runlayout.RUN_CONFIG)
            self.data.tokenizer.save(self.out_dir / runlayout.TOKENIZER)
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
                     "batch_size": self.tcfg.batch_size}]
        stages = []
        for i, st in enumerate(self.tcfg.curriculum):
            unknown = set(st) - {"steps", "seq_len", "batch_size"}
            if unknown or "steps" not in st:
                from memlm.errors import ConfigError

                raise ConfigError(
                    f"train.curriculum[{i}] = {st!r}: each stage needs 'steps' and may set "
                    f"'seq_len' and 'batch_size' (unknown keys: {sorted(unknown)})."
                )
            stages.append({"steps": int(st["steps"]), "seq_len": int(st.get("seq_len", seq_len)),
                           "batch_size": int(st.get("batch_size", self.tcfg.batch_size))})
        return stages

    def _stage_for_step(self, step: int) -> int:
        total = 0
        for i, st in enumerate(self.stages):
            total += st["steps"]
            if step < total:
                return i
        return len(self.stages) - 1

    def _make_source(self, stage_idx: int) -> BatchSource:
        st = self.stages[stage_idx]
        return self.data.make_train(st["seq_len"], st["batch_size"])

    def _emit(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        for logger in self.loggers:  # metrics.jsonl, TensorBoard, W&B (memlm/train/loggers.py)
            logger.log(record)
        for cb in self.callbacks:
            cb(record)

    # ----- one optimizer step -----
    def _micro_step(self, scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """Forward/backward over `bptt_window` segments (1 for stateless models)."""
        n_seg = self.tcfg.bptt_window if self.stateful else 1
        batches: list[Batch] = [self.source.next_batch().to(self.device) for _ in range(n_seg)]
        total_tokens = sum(max(b.n_tokens, 0) for b in batches)
        loss_sum = torch.zeros((), device=self.device)
        logs: dict[str, torch.Tensor] = {}
        for batch in batches:
            if self.stateful:
                if self.state is None:
                    self.state = self.model.init_state(batch.input_ids.shape[0], self.device)
                if batch.new_stream is not None:
                    self.state = self.model.reset_state_rows(self.state, batch.new_stream)
            with autocast_context(self.device, self.tcfg.precision):
                out = self.forward_model(batch.input_ids, targets=batch.targets, state=self.state)
            weight = batch.n_tokens / max(total_tokens, 1)
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

    def train_step(self) -> dict[str, torch.Tensor]:
        stage = self._stage_for_step(self.step)
        if stage != self.stage_idx:
            self.stage_idx = stage
            self.source = self._make_source(stage)
            self.state = None
        lr = lr_at(self.step, self.tcfg, self.max_steps)
        set_lr(self.optimizer, lr)
        self.model.train()
        accum = self.tcfg.grad_accum
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
                            n_bytes=None)
        # task datasets: mean loss over a fixed set of validation batches
        from memlm.eval.metrics import TokenMetrics

        source = self.data.make_val(st["seq_len"], st["batch_size"])
        metrics = TokenMetrics()
        self.model.eval()
        for _ in range(max_batches):
            batch = source.next_batch().to(self.device)
            state = self.model.init_state(batch.input_ids.shape[0], self.device)
            with autocast_context(self.device, self.tcfg.precision):
                out = self.model(batch.input_ids, state=state)
            # models that return only the last segment's logits score the matching targets
            metrics.update(out.logits, batch.targets[:, -out.logits.shape[1]:])
        self.model.train()
        return metrics.compute()

    # ----- checkpoints -----
    def save_checkpoint(self) -> None:
        if self.out_dir is None:
            return
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
        if self.fsdp:  # write through a plain copy of the model holding the full weights
            plain = memlm.build_from_config(self.cfg.model)
            plain.load_state_dict(model_state, strict=False)
            plain.save_pretrained(tmp)
        else:
            self.model.save_pretrained(tmp)
        write_tokenizer_files(self.data.tokenizer, tmp, self.cfg.model.context_len)
        trainer_state = {
            "step": self.step,
            "stage_idx": self.stage_idx,
            "tokens_seen": self.tokens_seen,
            "optimizer": optim_state,
            "rng": _rng_state(),
            "data": self.source.state_dict(),
            "memory_state": ckpt.pack_state(self.state),
        }
        ckpt.save_trainer_state(trainer_state, tmp / runlayout.TRAINER_STATE)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        ckpt.atomic_write_text(self.out_dir / runlayout.LATEST, name + "\n")
        for old in (self.out_dir / runlayout.CKPT_DIR).glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self) -> None:
        from memlm.train.distributed import load_full_model_state, load_full_optimizer_state

        path = runlayout.latest_checkpoint(self.out_dir)
        if self.fsdp:
            plain = memlm.build_from_config(self.cfg.model)
            ckpt.load_weights(plain, path / "model.safetensors")
            load_full_model_state(self.model, plain.state_dict(), fsdp=True)
        else:
            ckpt.load_weights(self.model, path / "model.safetensors",
                              map_location=str(self.device))
        st = ckpt.load_trainer_state(path / runlayout.TRAINER_STATE)
        load_full_optimizer_state(self.model, self.optimizer, st["optimizer"], self.fsdp)
        self.step = int(st["step"])
        self.stage_idx = int(st["stage_idx"])
        self.tokens_seen = int(st["tokens_seen"])
        self.source = self._make_source(self.stage_idx)
        self.source.load_state_dict(st["data"])
        self.state = ckpt.unpack_state(st["memory_state"])
        if self.state is not None:
            self.state = _to_device(self.state, self.device)
        _set_rng_state(st["rng"])
        # forget metrics logged after the checkpoint (they will be produced again)
        metrics_path = self.out_dir / runlayout.METRICS
        if metrics_path.exists() and self.dist.is_main:
            kept = [ln for ln in metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            ckpt.atomic_write_text(metrics_path, "".join(k + "\n" for k in kept))
            self.history = [json.loads(k) for k in kept]

    # ----- main loop -----
    def fit(self) -> TrainResult:
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
                    raise TrainingDivergedError(
                        f"loss became {rec['loss']} at step {self.step}; training stopped and the "
                        "last good checkpoint was kept. Lower train.lr, raise warmup_steps, keep "
                        "grad_clip on, or use precision: fp32."
                    )
                now = time.perf_counter()
                last_tps = (self.tokens_seen - window_tokens) / max(now - window_t0, 1e-9)
                window_t0, window_tokens = now, self.tokens_seen
                rec["tokens_per_sec"] = last_tps
                self._emit({"kind": "train", **rec})
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{last_tps:,.0f}")
            if self.step % tcfg.eval_every == 0 or is_last:
                val = self.evaluate()
                self._emit({"kind": "val", "step": self.step,
                            **{f"val_{k}": v for k, v in val.items()}})
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
            ckpt.atomic_write_json(self.out_dir / "summary.json", {
                "step": self.step, "wall_time": wall, "tokens_per_sec": result.tokens_per_sec,
                "params": self.model.num_params(),
                "params_non_embedding": self.model.num_params(non_embedding=True),
                "final": final,
            })
            from memlm.inspect.plots import plot_training_curves

            plot_training_curves(self.history, self.out_dir / "curve.png",
                                 title=f"{self.cfg.model.arch}")
        return result


def _to_device(state: Any, device: torch.device) -> Any:
    if torch.is_tensor(state):
        return state.to(device)
    if isinstance(state, dict):
        return {k: _to_device(v, device) for k, v in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*[_to_device(v, device) for v in state])
    if isinstance(state, (list, tuple)):
        return type(state)(_to_device(v, device) for v in state)
    import dataclasses

    if dataclasses.is_dataclass(state):
        return type(state)(**{f.name: _to_device(getattr(state, f.name), device)
                              for f in dataclasses.fields(state)})
    return state


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
