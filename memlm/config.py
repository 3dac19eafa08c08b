"""Typed configuration: one `ModelConfig` vocabulary for every architecture,
plus `TrainConfig`, `DataConfig` and the `RunConfig` that bundles them.

Why dataclasses and not free dicts: a typo in a YAML key must fail loudly with
a suggestion, not silently fall back to a default. Every architecture extends
`ModelConfig` with its own fields, so `memlm.build("gmt", n_layer=2)` and
`memlm.build("gpt", n_layer=2)` speak the same size vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from memlm.errors import ConfigError, UnknownNameError, closest


def _check_keys(cls: type, data: dict[str, Any], where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise UnknownNameError(
                f"unknown config key {key!r} in {where}.{closest(key, names)} "
                f"Valid keys: {', '.join(sorted(names))}."
            )


def _coerce(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Coerce YAML scalars to the annotated field types (YAML reads 1e-3 as a string)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        hint = hints.get(key)
        base = _optional_of(hint) or hint
        if base is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                value = float(value)
            except ValueError as e:
                raise ConfigError(f"{cls.__name__}.{key} must be a number, got {value!r}") from e
        elif base is int and isinstance(value, str):
            try:
                value = int(float(value))
            except (ValueError, OverflowError) as e:
                raise ConfigError(f"{cls.__name__}.{key} must be an integer, got {value!r}") from e
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        _check_type(cls, key, hint, value)
        out[key] = value
    return out


def _check_type(cls: type, key: str, hint: Any, value: Any) -> None:
    """Refuse a value of the wrong kind (a list for an int, NaN for a float, ...).

    Generic, so every architecture's own fields are checked too: without it a YAML list
    given for an int field surfaces much later as a TypeError deep inside the model.
    """
    where = f"{cls.__name__}.{key}"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return
        hint = _optional_of(hint)
    if hint is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{where} must be an integer, got {value!r}.")
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}.")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}.")
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}.")
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}.")


def _optional_of(hint: Any) -> Any:
    """X for a hint `X | None` (None for any other hint)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


#: validation metrics that can pick a stage's best checkpoint -> True where higher is better
STAGE_METRICS = {"nll": False, "ppl": False, "bits_per_token": False, "bits_per_byte": False,
                 "mean_rank": False, "top1": True, "top5": True, "p_correct": True}

#: device names accepted by train.device (an index may follow, e.g. cuda:1)
DEVICE_KINDS = ("auto", "cpu", "cuda", "mps", "xpu")


class ConfigBase:
    """Shared helpers: dict round trip with strict keys."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str | None = None):
        data = dict(data or {})
        _check_keys(cls, data, where or cls.__name__)
        return cls(**_coerce(cls, data))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def replace(self, **changes):
        _check_keys(type(self), changes, type(self).__name__)
        return dataclasses.replace(self, **_coerce(type(self), changes))  # type: ignore[type-var]


@dataclass
class ModelConfig(ConfigBase):
    """Size vocabulary shared by every architecture; subclasses add their own fields."""

    arch: str = "gpt"
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    context_len: int = 256
    dropout: float = 0.0
    pos_emb: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    ffn_mult: int = 4
    bias: bool = True
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "context_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        if self.d_model % self.n_head:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                f"pick n_head from {[h for h in range(1, 17) if self.d_model % h == 0]}."
            )
        if self.pos_emb == "rope" and (self.d_model // self.n_head) % 2:
            raise ConfigError(
                f"RoPE needs an even head size, got d_model/n_head = {self.d_model // self.n_head}; "
                "change n_head or use pos_emb: learned."
            )
        if self.pos_emb not in ("rope", "learned"):
            raise ConfigError(f"pos_emb must be 'rope' or 'learned', got {self.pos_emb!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


@dataclass
class TrainConfig(ConfigBase):
    """Optimisation and bookkeeping. Nothing here names an architecture."""

    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 only where it is faster
    compile: bool = False
    device: str = "auto"
    seed: int = 1337
    eval_every: int = 250
    eval_batches: int = 20
    save_every: int = 250
    log_every: int = 10
    bptt_window: int = 1
    curriculum: list[dict[str, Any]] = field(default_factory=list)
    #: at a curriculum stage's end: "continue" with the current weights, or "best": restart
    #: from the stage's best validation checkpoint (kept as checkpoints/best-stage-K) with
    #: fresh optimizer moments, as the original RMT/ARMT scripts do (docs/finetune.md)
    stage_handover: Literal["continue", "best"] = "continue"
    #: the validation metric that picks a stage's best checkpoint (nll, top1, ...)
    stage_metric: str = "nll"
    #: where metrics go besides RUN/metrics.jsonl (always written): tensorboard, wandb
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])

    def __post_init__(self) -> None:
        from memlm.train.loggers import check_logger_names

        check_logger_names(self.loggers)
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(
                f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}.")
        # counts and intervals: a zero *_every would divide by zero mid-run, a negative
        # size would ask for unbounded memory; all are refused before any work starts
        for name in ("max_steps", "batch_size", "grad_accum", "bptt_window", "eval_every",
                     "eval_batches", "save_every", "log_every"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                     f"train.{name} must be an integer >= 1, got {value!r}.")
        _require(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
                 f"train.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}.")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "beta1", "beta2"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool)
                     and math.isfinite(value),
                     f"train.{name} must be a finite number, got {value!r}.")
        _require(self.lr > 0, f"train.lr must be > 0, got {self.lr}.")
        for name in ("min_lr", "weight_decay", "grad_clip"):
            _require(getattr(self, name) >= 0,
                     f"train.{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1,
                     f"train.{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(
                f"train.schedule must be cosine, linear or constant, got {self.schedule!r}.")
        kind = str(self.device).partition(":")[0]
        index = str(self.device).partition(":")[2]
        if not isinstance(self.device, str) or kind not in DEVICE_KINDS or (
                index and (kind == "auto" or not index.isdigit())):
            raise ConfigError(
                f"train.device must be one of {', '.join(DEVICE_KINDS)} (an index may follow, "
                f"e.g. cuda:1), got {self.device!r}.")
        if self.stage_handover not in ("continue", "best"):
            raise ConfigError(f"train.stage_handover must be continue or best, got "
                              f"{self.stage_handover!r}.")
        if self.stage_metric not in STAGE_METRICS:
            raise ConfigError(f"train.stage_metric must be one of {', '.join(STAGE_METRICS)}, "
                              f"got {self.stage_metric!r}.")
        if not isinstance(self.curriculum, list):
            raise ConfigError(f"train.curriculum must be a list of stages, got "
                              f"{self.curriculum!r}.")


@dataclass
class DataConfig(ConfigBase):
    """Where tokens come from and how they are cut into batches."""

    source: str = "builtin:recall"
    tokenizer: str = "byte"
    val_fraction: float = 0.1
    val_source: str | None = None
    seq_len: int | None = None  # defaults to the model's context_len
    #: auto: stream for stateful models, random for the others; episodes: stateful models
    #: read train.bptt_window segments from a fresh memory per step (RMT's regime);
    #: sliding: the originals' sliding-window LM samples (memlm/data/sliding.py)
    layout: Literal["auto", "random", "stream", "episodes", "sliding"] = "auto"
    #: sliding layout: tokens between window starts (None: the model's segment_len)
    stride: int | None = None
    #: sliding layout: score every token ("all", as the originals train) or the last stride
    sliding_score: Literal["all", "new"] = "all"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _require(self.seq_len is None or (isinstance(self.seq_len, int)
                                          and not isinstance(self.seq_len, bool)
                                          and self.seq_len >= 1),
                 f"data.seq_len must be an integer >= 1 (or null), got {self.seq_len!r}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}.")
        if self.layout not in ("auto", "random", "stream", "episodes", "sliding"):
            raise ConfigError(f"data.layout must be auto, random, stream, episodes or sliding, "
                              f"got {self.layout!r}.")
        _require(self.stride is None or (isinstance(self.stride, int)
                                         and not isinstance(self.stride, bool)
                                         and self.stride >= 1),
                 f"data.stride must be an integer >= 1 (or null), got {self.stride!r}.")
        if self.sliding_score not in ("all", "new"):
            raise ConfigError(f"data.sliding_score must be all or new, got "
                              f"{self.sliding_score!r}.")


@dataclass
class RunConfig:
    """A whole run: model + train + data. This is what YAML presets hold."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "data": self.data.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a run config is a mapping with model/train/data sections, got "
                              f"{type(data).__name__}.")
        data = dict(data)
        _check_keys(cls, data, "the run config (top level)")
        for section in ("model", "train", "data"):
            if data.get(section) is not None and not isinstance(data[section], dict):
                raise ConfigError(f"config section {section!r} must be a mapping of keys to "
                                  f"values, got {type(data[section]).__name__}.")
        return cls(
            model=model_config_from_dict(data.get("model") or {}),
            train=TrainConfig.from_dict(data.get("train"), "train"),
            data=DataConfig.from_dict(data.get("data"), "data"),
        )

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> RunConfig:
        """Apply `section.key=value` overrides (values parsed as YAML)."""
        raw = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else map(_split, overrides)
        for dotted, value in items:
            section, _, key = dotted.partition(".")
            if section not in raw or not key:
                raise ConfigError(
                    f"override {dotted!r} must look like model.KEY, train.KEY or data.KEY."
                )
            raw[section][key] = value
        return RunConfig.from_dict(raw)


def _split(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=3e-4.")
    key, _, value = item.partition("=")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML "
                          f"({' '.join(str(e).split())}).") from e


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Pick the config class of `data['arch']` and build it with strict keys."""
    from memlm.registry import ARCHITECTURES

    data = dict(data)
    arch = data.get("arch", "gpt")
    config_cls = ARCHITECTURES.get(arch).config_cls
    return config_cls.from_dict(data, where=f"model (arch {arch!r})")


def load_run_config(path: str | Path) -> RunConfig:
    """Read a YAML (or JSON) run config; a bare preset name looks in memlm/configs/."""
    p = Path(path)
    if not p.exists():
        preset = Path(__file__).parent / "configs" / f"{path}.yaml"
        if preset.exists():
            p = preset
        else:
            names = sorted(q.stem for q in (Path(__file__).parent / "configs").glob("*.yaml"))
            raise ConfigError(
                f"config file {str(path)!r} not found.{closest(str(path), names)} "
                f"Give a YAML path or a preset name: {', '.join(names)}."
            )
    if p.is_dir():
        raise ConfigError(f"config {str(p)!r} is a folder; give a YAML file or a preset name.")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {str(p)!r} is not a UTF-8 text file (byte {e.start}); "
                          "give a YAML file.") from e
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        where = " ".join(str(e).split())
        raise ConfigError(f"config {str(p)!r} is not valid YAML/JSON: {where}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping with model/train/data sections, got "
                          f"{type(data).__name__}.")
    return RunConfig.from_dict(data)


def save_run_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
