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
"""

from __future__ import annotations

from pathlib import Path

from memlm.errors import CheckpointError

RUN_CONFIG = "run.yaml"
TOKENIZER = "memlm_tokenizer.json"
LATEST = "LATEST"
METRICS = "metrics.jsonl"
CKPT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.pt"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if not pointer.exists():
        return None
    ckpt = run_dir / CKPT_DIR / pointer.read_text().strip()
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
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(
            f"{path} holds no checkpoint (no config.json and no {LATEST}); "
            "train first (memlm train ... --out DIR) or pass a saved model folder."
        )
    return ckpt


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
    return model, tokenizer
