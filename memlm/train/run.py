"""Layout of a run folder, shared by the trainer, `memlm.load` and the CLI.

    runs/NAME/
      run.yaml              the RunConfig that produced it
      memlm_tokenizer.json  the tokenizer (eval/generate reuse it; also in each checkpoint)
      checkpoints/step-N/   config.json + model.safetensors + trainer_state.pt
      LATEST                name of the newest complete checkpoint folder
      metrics.jsonl         one JSON object per logged event
      curve.png             train/val loss vs step

A checkpoint folder is filled under a temporary name and renamed when
complete; LATEST is replaced atomically afterwards. A crash therefore never
leaves a half-written checkpoint that resume would pick up.

A process writing a run holds an exclusive advisory lock (flock) on the run
folder for its whole life, so a second `memlm train --out` on the same folder
stops at once instead of mixing two runs. Each checkpoint's config.json records
the fingerprint of the tokenizer it was trained with; loading refuses a
tokenizer with another fingerprint (same size but different ids).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from memlm.errors import CheckpointError, ConfigError, RunExistsError, TokenizerMismatchError
from memlm.hf_files import MEMLM_TOKENIZER

RUN_CONFIG = "run.yaml"
TOKENIZER = MEMLM_TOKENIZER
LATEST = "LATEST"
METRICS = "metrics.jsonl"
CKPT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
#: config.json key holding the fingerprint of the tokenizer the weights were trained with
TOKENIZER_FINGERPRINT = "tokenizer_fingerprint"
_CKPT_NAME = re.compile(r"step-[0-9]{1,12}")


class RunLock:
    """Exclusive advisory lock on a run folder, held until `release` (or process exit).

    flock on the folder itself: nothing is written into the run, and the kernel drops
    the lock when the process dies (even by SIGKILL), so a crash never leaves it stale.
    """

    def __init__(self, run_dir: str | Path):
        import fcntl

        self.run_dir = Path(run_dir)
        self._fd: int | None = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(self._fd)
            self._fd = None
            raise RunExistsError(
                f"another memlm process is writing to {self.run_dir} (the folder is locked); "
                "wait for it to finish or choose another --out folder."
            ) from e

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def read_small_text(path: Path, what: str) -> str:
    """A small UTF-8 bookkeeping file (LATEST, config.json) or a one-line CheckpointError."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror or e}.") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what} {path} is not UTF-8 text (byte {e.start}); the file is "
                              "damaged. Restore it or retrain with --overwrite.") from e


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    """A model folder's config.json as a dict, checked to be a JSON object."""
    path = Path(model_dir) / "config.json"
    text = read_small_text(path, "model config")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is corrupt.") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(raw).__name__}; "
                              "the file is corrupt.")
    return raw


def eval_results_from_run(run_dir: str | Path) -> dict[str, Any]:
    """The newest validation record of a run (`kind == "val"` in metrics.jsonl), or {}.

    The record's `step` is kept so the card can say which step the numbers
    belong to; keys are the trainer's own (`val_loss`, `val_ppl`, ...). The trainer
    hands them to `save_pretrained` so every checkpoint's model card shows them.
    """
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return {}
    latest: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash; earlier records are still good
        if isinstance(record, dict) and record.get("kind") == "val":
            latest = record
    return {k: v for k, v in latest.items() if k != "kind"}


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if not pointer.exists():
        return None
    name = read_small_text(pointer, "checkpoint pointer").strip()
    if not _CKPT_NAME.fullmatch(name):
        raise CheckpointError(
            f"{pointer} should name a checkpoint folder like step-0000100, got {name[:60]!r}; "
            "the run folder was damaged. Restore it or retrain with --overwrite."
        )
    ckpt = run_dir / CKPT_DIR / name
    if not ckpt.is_dir():
        raise CheckpointError(
            f"{pointer} names {ckpt.name!r} but that checkpoint folder is missing; "
            "the run folder was damaged. Restore it or retrain with --overwrite."
        )
    return ckpt


def resolve_model_dir(path: str | Path) -> Path:
    """A run folder -> its newest checkpoint; a model folder -> itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run folder or a saved model folder.")
    if (path / "config.json").exists():
        read_model_config(path)
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(
            f"{path} holds no checkpoint (no config.json and no {LATEST}); "
            "train first (memlm train ... --out DIR) or pass a saved model folder."
        )
    read_model_config(ckpt)
    return ckpt


def check_tokenizer_fingerprint(tokenizer: Any, model_dir: str | Path,
                                tokenizer_path: str | Path | None = None) -> None:
    """Refuse a tokenizer other than the one the weights in `model_dir` were trained with.

    A tokenizer of the same size but a different vocabulary passes the size check and
    silently produces wrong ids (swapped characters); the fingerprint catches it.
    Folders saved before fingerprints were recorded are accepted.
    """
    expected = read_model_config(model_dir).get(TOKENIZER_FINGERPRINT)
    if expected is None:
        return
    got = tokenizer.fingerprint()
    if got != expected:
        where = f" ({tokenizer_path})" if tokenizer_path else ""
        raise TokenizerMismatchError(
            f"the tokenizer{where} has fingerprint {got} but the model in {model_dir} was "
            f"trained with tokenizer {expected}; it would map text to the wrong ids. Use the "
            "tokenizer saved with the model."
        )


def load_run(path: str | Path, map_location: str = "cpu"):
    """(model, tokenizer) from a run folder or a saved model folder, checked to match."""
    from memlm.data.tokenizers import check_vocab, load_tokenizer
    from memlm.models.base import MemLM

    path = Path(path)
    model_dir = resolve_model_dir(path)
    model = MemLM.from_pretrained(model_dir, map_location=map_location)
    for candidate in (model_dir / TOKENIZER, path / TOKENIZER):
        if candidate.exists():
            tokenizer = load_tokenizer(candidate)
            break
    else:
        raise CheckpointError(
            f"no {TOKENIZER} in {model_dir} or {path}: the tokenizer of this model is unknown. "
            "Use the run folder written by `memlm train`."
        )
    check_vocab(tokenizer, model.config.vocab_size, where=str(path))
    check_tokenizer_fingerprint(tokenizer, model_dir, candidate)
    return model, tokenizer


def load_any_model(path: str | Path):
    """A memlm run/model folder, or a Hugging Face causal LM folder (local files only).

    What `memlm audit` and `memlm diagnose` accept. A Hugging Face folder is loaded
    without remote code and from local files only; any failure to load it (bad config,
    damaged or missing weights) is one CheckpointError.
    """
    from memlm.models.base import MemLM

    p = Path(path)
    if (p / "config.json").exists() and read_model_config(p).get("model_type") != "memlm":
        import transformers

        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                p, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # transformers raises many types for a bad folder
            msg = " ".join(str(e).split())[:300]
            raise CheckpointError(f"cannot load {p} as a Hugging Face causal LM: "
                                  f"{type(e).__name__}: {msg}") from e
        return model.eval()
    return MemLM.from_pretrained(resolve_model_dir(p))


def save_model_folder(model: Any, tokenizer: Any, path: str | Path, **extra_config: Any) -> None:
    """A self-contained model folder: weights, config (stamped with the tokenizer's
    fingerprint), card, and memlm's plus transformers' tokenizer files."""
    from memlm.data.tokenizer_export import write_tokenizer_files

    model.save_pretrained(path, **{TOKENIZER_FINGERPRINT: tokenizer.fingerprint(), **extra_config})
    write_tokenizer_files(tokenizer, path, model.config.context_len)


def validation_tokens(run_dir: str | Path, tokenizer: Any) -> Any:
    """The validation split of the data a run was trained on (from its run.yaml)."""
    from memlm.config import load_run_config
    from memlm.data.corpus import prepare_data

    run_cfg = Path(run_dir) / RUN_CONFIG
    if not run_cfg.exists():
        raise ConfigError(f"{run_dir} is not a run folder; pass --data FILE to evaluate on.")
    cfg = load_run_config(run_cfg)
    return prepare_data(cfg.data, tokenizer=tokenizer, progress=False).val


def run_config_from_flags(config: str | Path, overrides: list[str] | tuple[str, ...] = (),
                          data: str | None = None, tokenizer: str | None = None,
                          device: str | None = None, steps: int | None = None) -> Any:
    """`memlm train`'s RunConfig: the config file, then --set overrides, then the shortcuts.

    `data`, `tokenizer` and `device` are --set data.source=..., data.tokenizer=...,
    train.device=... applied after the explicit overrides; `steps` comes last and cuts or
    lengthens a curriculum too (memlm.train.budget.steps_with_curriculum).
    """
    from memlm.config import load_run_config
    from memlm.train.budget import steps_with_curriculum

    cfg = load_run_config(config)
    overrides = list(overrides)
    if data:
        overrides.append(f"data.source={json.dumps(data)}")
    if tokenizer:
        overrides.append(f"data.tokenizer={tokenizer}")
    if device:
        overrides.append(f"train.device={device}")
    if overrides:
        cfg = cfg.with_overrides(overrides)
    if steps is not None:
        cfg = type(cfg)(cfg.model, steps_with_curriculum(cfg.train, steps), cfg.data)
    return cfg


def train_summary(result: Any, cfg: Any, out: str | Path | None) -> str:
    """The lines `memlm train` prints when a run ends: final validation, speed, where."""
    from memlm.train.budget import total_steps

    f = result.final
    text = (f"done: step {total_steps(cfg.train)}"
            f"  val loss {f.get('nll', float('nan')):.4f}  ppl {f.get('ppl', float('nan')):.2f}"
            f"  {result.tokens_per_sec:,.0f} tok/s  {result.wall_time:.1f}s")
    if out:
        text += f"\nrun written to {out} (metrics.jsonl, curve.png, checkpoints/)"
    return text
