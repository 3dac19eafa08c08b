"""Typed configuration: one `ModelConfig` vocabulary for every architecture,
plus `TrainConfig`, `DataConfig` and the `RunConfig` that bundles them.

Why dataclasses and not free dicts: a typo in a YAML key must fail loudly with
a suggestion, not silently fall back to a default. Every architecture extends
`ModelConfig` with its own fields, so `memlm.build("gmt", n_layer=2)` and
`memlm.build("gpt", n_layer=2)` speak the same size vocabulary.

A field's allowed values are its type, checked by `ConfigBase` for every config class:

    pos_emb: Literal["rope", "learned"] = "rope"          # one of these strings
    n_layer: PositiveInt = 4                             # an integer >= 1
    dropout: Annotated[float, between(0, 1, hi_open=True)] = 0.0   # a float in [0, 1)
    seq_len: PositiveInt | None = None                   # null, or an integer >= 1

so a new field needs no hand-written check. `__post_init__` keeps only the rules that
tie several fields together (d_model divisible by n_head, temp_min <= temp_max, ...).
A bad value is one line naming the key as a user writes it (`train.lr`, `model.pos_emb`),
what is allowed, and what was given.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml

from memlm.errors import ConfigError, UnknownNameError, closest


@dataclass(frozen=True)
class Range:
    """The interval a numeric field may take, declared in its type: `Annotated[int, Range(lo=1)]`.

    Use the helpers `at_least`, `above` and `between` to write one.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return (f"in {'(' if self.lo_open else '['}{self.lo:g}, "
                    f"{self.hi:g}{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{'<' if self.hi_open else '<='} {self.hi:g}"


def at_least(lo: float) -> Range:
    """lo <= value."""
    return Range(lo=lo)


def above(lo: float) -> Range:
    """lo < value."""
    return Range(lo=lo, lo_open=True)


def between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Range:
    """lo <= value <= hi; `lo_open`/`hi_open` make an end exclusive."""
    return Range(lo, hi, lo_open, hi_open)


#: the ranges most fields need, as types
PositiveInt = Annotated[int, at_least(1)]
NonNegativeInt = Annotated[int, at_least(0)]
NonNegativeFloat = Annotated[float, at_least(0)]
PositiveFloat = Annotated[float, above(0)]
#: dropout rates and momenta: [0, 1)
UnitFloat = Annotated[float, between(0, 1, hi_open=True)]


@dataclass(frozen=True)
class _FieldRule:
    """What a field's type hint allows, read once per class (see `_field_rules`)."""

    name: str
    hint: Any  # the hint without Annotated metadata or `| None` (what _check_type reads)
    optional: bool  # None is allowed
    choices: tuple[Any, ...] | None  # from Literal[...]
    bounds: Range | None  # from Annotated[..., Range]
    item_config: type | None  # X of list[X] when X is a ConfigBase (curriculum stages)


def _unwrap(hint: Any) -> tuple[Any, bool, Range | None]:
    """Peel `Annotated[...]` and `X | None` (in either order): (inner hint, optional, range)."""
    bounds, optional = None, False
    for _ in range(2):
        if typing.get_origin(hint) is Annotated:
            bounds = next((m for m in hint.__metadata__ if isinstance(m, Range)), bounds)
            hint = typing.get_args(hint)[0]
        inner = _optional_of(hint)
        if inner is not None:
            optional, hint = True, inner
    return hint, optional, bounds


@functools.cache
def _field_rules(cls: type) -> tuple[_FieldRule, ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    rules = []
    for f in dataclasses.fields(cls):
        inner, optional, bounds = _unwrap(hints[f.name])
        choices = typing.get_args(inner) if typing.get_origin(inner) is Literal else None
        item = None
        if typing.get_origin(inner) is list:
            (arg,) = typing.get_args(inner) or (Any,)
            if isinstance(arg, type) and issubclass(arg, ConfigBase):
                item = arg
        rules.append(_FieldRule(f.name, inner, optional, choices, bounds, item))
    return tuple(rules)


def _check_fields(config: Any) -> None:
    """Check every field of `config` against its type hint: kind, Literal choices, Range."""
    cls = type(config)
    prefix = f"{cls.section}." if cls.section else ""
    for rule in _field_rules(cls):
        value = getattr(config, rule.name)
        where = prefix + rule.name
        if value is None and rule.optional:
            continue
        _check_type(where, rule.hint, value)
        if rule.choices is not None and value not in rule.choices:
            allowed = ", ".join(repr(c) for c in rule.choices)
            allowed += " or null" if rule.optional else ""
            raise ConfigError(f"{where} must be one of {allowed}; got {value!r}.")
        if rule.bounds is not None and value not in rule.bounds:
            null = " (or null)" if rule.optional else ""
            raise ConfigError(f"{where} must be {rule.bounds}{null}, got {value!r}.")
        if rule.item_config is not None:
            setattr(config, rule.name, _config_items(where, rule.item_config, value))


def _config_items(where: str, item_cls: type, value: Any) -> list[Any]:
    """A list of `item_cls` from dicts (YAML) or items that already are `item_cls`."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list, got {value!r}.")
    items = []
    for i, item in enumerate(value):
        if isinstance(item, item_cls):
            items.append(item)
        elif isinstance(item, dict):
            try:
                items.append(item_cls.from_dict(item, where=f"{where}[{i}]"))
            except ConfigError as e:  # name the stage unless the message already does
                if f"{where}[{i}]" in str(e):
                    raise
                raise type(e)(f"{where}[{i}]: {e}") from e
        else:
            raise ConfigError(f"{where}[{i}] must be a mapping of keys to values, got {item!r}.")
    return items


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
    prefix = f"{cls.section}." if getattr(cls, "section", "") else ""
    out = {}
    for key, value in data.items():
        hint = hints.get(key)
        base = _optional_of(hint) or hint
        if base is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                value = float(value)
            except ValueError as e:
                raise ConfigError(f"{prefix}{key} must be a number, got {value!r}.") from e
        elif base is int and isinstance(value, str):
            try:
                value = int(float(value))
            except (ValueError, OverflowError) as e:
                raise ConfigError(f"{prefix}{key} must be an integer, got {value!r}.") from e
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        out[key] = value
    return out


def _check_type(where: str, hint: Any, value: Any) -> None:
    """Refuse a value of the wrong kind (a list for an int, NaN for a float, ...).

    Generic, so every architecture's own fields are checked too: without it a YAML list
    given for an int field surfaces much later as a TypeError deep inside the model.
    """
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
    if typing.get_origin(hint) is list and not isinstance(value, list):
        raise ConfigError(f"{where} must be a list, got {value!r}.")


def _optional_of(hint: Any) -> Any:
    """X for a hint `X | None` (None for any other hint)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return None


#: validation metrics that can pick a stage's best checkpoint -> True where higher is better
STAGE_METRICS = {"nll": False, "ppl": False, "bits_per_token": False, "bits_per_byte": False,
                 "mean_rank": False, "top1": True, "top5": True, "p_correct": True}
StageMetric = Literal["nll", "ppl", "bits_per_token", "bits_per_byte", "mean_rank", "top1", "top5",
                      "p_correct"]

#: device names accepted by train.device (an index may follow, e.g. cuda:1)
DEVICE_KINDS = ("auto", "cpu", "cuda", "mps", "xpu")

#: where training metrics can go (memlm/train/loggers.py implements each)
LOGGERS = ("jsonl", "tensorboard", "wandb")


def check_logger_names(names: list[str] | tuple[str, ...]) -> None:
    """Fail with one line on a name that is not a logger (config validation)."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ConfigError(f"train.loggers must be a list such as [jsonl, tensorboard], "
                          f"got {names!r}.")
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"train.loggers: unknown logger {name!r}.{closest(str(name), LOGGERS)}"
                              f" Choose from {', '.join(LOGGERS)}.")


class ConfigBase:
    """Shared behaviour: dict round trip with strict keys, fields checked from their types.

    Every field is checked on construction (direct, `from_dict`, `replace`): its kind
    (int, float, bool, str, list), its `Literal[...]` choices and its `Annotated[..., Range]`
    bounds. Subclasses that need cross-field rules define `__post_init__` and call
    `super().__post_init__()` first, so single-field errors come before combined ones.
    """

    #: how a user addresses this config's keys in errors ("train" -> "train.lr")
    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _check_fields(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str | None = None):
        data = dict(data or {})
        where = where or cls.__name__
        _check_keys(cls, data, where)
        missing = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                   if f.name not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{where} needs {', '.join(missing)} (got {data!r}).")
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

    section: ClassVar[str] = "model"

    arch: str = "gpt"
    vocab_size: PositiveInt = 256
    n_layer: PositiveInt = 4
    n_head: PositiveInt = 4
    d_model: PositiveInt = 128
    context_len: PositiveInt = 256
    dropout: UnitFloat = 0.0
    pos_emb: Literal["rope", "learned"] = "rope"
    rope_theta: PositiveFloat = 10000.0
    ffn_mult: PositiveInt = 4
    #: the dense MLP's GELU (gpt, dnc, TMT ffn_type=dense): "gelu" exact (erf), "gelu_tanh"
    #: GPT-2's tanh approximation (to import GPT-2 weights exactly)
    activation: Literal["gelu", "gelu_tanh"] = "gelu"
    bias: bool = True
    tie_embeddings: bool = True
    norm_eps: PositiveFloat = 1e-5
    init_std: NonNegativeFloat = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
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

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


@dataclass
class CurriculumStage(ConfigBase):
    """One stage of `train.curriculum`: `steps` optimizer steps at this length and batch size.

    Stages run in order; `seq_len` / `batch_size` / `grad_accum` / `bptt_window` left null keep
    data.seq_len (or the model's context_len), train.batch_size, train.grad_accum and
    train.bptt_window. In YAML:
    `- {steps: 800, seq_len: 256}`.
    """

    steps: PositiveInt
    seq_len: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    #: micro-batches per optimizer step in this stage (null: train.grad_accum)
    grad_accum: PositiveInt | None = None
    #: segments a stateful model back-propagates through per step in this stage (null:
    #: train.bptt_window); with data.layout episodes, also the episode length: 1-segment
    #: episodes first, then longer ones, as the RMT/ARMT papers grow the segment count
    bptt_window: PositiveInt | None = None
    #: a constant learning rate for this stage instead of the run's schedule, which then
    #: spans only the stages without one: `[{steps: 2500}, {steps: 1500, lr: 2.5e-4}]`
    #: decays over the first 2,500 steps, then holds 2.5e-4 (the BABILong recipe trains
    #: its mixing stages at a constant rate after a decayed first stage, docs/babilong.md)
    lr: PositiveFloat | None = None
    #: options added to a dataset source (data.source: babilong:...) for this stage only,
    #: e.g. ":carry=0.99:prefix=16": a last stage that reads long background streams
    #: without giving the earlier stages their cost (docs/babilong.md, round 12)
    source_options: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source_options is not None:
            opts = self.source_options.strip()
            if opts and not opts.startswith(":"):
                opts = ":" + opts
            if opts and any("=" not in part for part in opts[1:].split(":")):
                raise ConfigError(f"train.curriculum source_options takes ':key=value' options "
                                  f"(e.g. ':carry=0.99:prefix=16'), got {self.source_options!r}")
            self.source_options = opts or None


@dataclass
class TrainConfig(ConfigBase):
    """Optimisation and bookkeeping. Nothing here names an architecture."""

    section: ClassVar[str] = "train"

    # counts and intervals: a zero *_every would divide by zero mid-run, a negative
    # size would ask for unbounded memory; the types refuse both before any work starts
    max_steps: PositiveInt = 1000
    batch_size: PositiveInt = 16
    grad_accum: PositiveInt = 1
    lr: PositiveFloat = 1e-3
    min_lr: NonNegativeFloat = 1e-4
    warmup_steps: NonNegativeInt = 100
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: NonNegativeFloat = 0.1
    beta1: UnitFloat = 0.9
    beta2: UnitFloat = 0.95
    grad_clip: NonNegativeFloat = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 only where it is faster
    compile: bool = False
    device: str = "auto"
    seed: int = 1337
    eval_every: PositiveInt = 250
    eval_batches: PositiveInt = 20
    save_every: PositiveInt = 250
    log_every: PositiveInt = 10
    bptt_window: PositiveInt = 1
    #: stages run in order instead of max_steps (YAML dicts become CurriculumStage)
    curriculum: list[CurriculumStage] = field(default_factory=list)
    #: at a curriculum stage's end: "continue" with the current weights, or "best": restart
    #: from the stage's best validation checkpoint (kept as checkpoints/best-stage-K) with
    #: fresh optimizer moments, as the original RMT/ARMT scripts do (docs/finetune.md)
    stage_handover: Literal["continue", "best"] = "continue"
    #: the validation metric that picks a stage's best checkpoint (nll, top1, ...)
    stage_metric: StageMetric = "nll"
    #: where metrics go besides RUN/metrics.jsonl (always written): tensorboard, wandb
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    #: a run or model folder whose weights start this run instead of a random init; a
    #: dense GPT's weights go into the backbone of the ARMT/RMT that wraps it, whose memory
    #: starts fresh (memlm/train/warm_start.py). Ignored on --resume
    init_from: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_logger_names(self.loggers)
        kind = str(self.device).partition(":")[0]
        index = str(self.device).partition(":")[2]
        if kind not in DEVICE_KINDS or (index and (kind == "auto" or not index.isdigit())):
            raise ConfigError(
                f"train.device must be one of {', '.join(DEVICE_KINDS)} (an index may follow, "
                f"e.g. cuda:1), got {self.device!r}.")

    @property
    def total_steps(self) -> int:
        """Optimizer steps the run takes: the stages' sum with a curriculum, else max_steps."""
        return sum(st.steps for st in self.curriculum) if self.curriculum else self.max_steps


@dataclass
class DataConfig(ConfigBase):
    """Where tokens come from and how they are cut into batches."""

    section: ClassVar[str] = "data"

    source: str = "builtin:recall"
    tokenizer: str = "byte"
    val_fraction: Annotated[float, between(0, 1, lo_open=True, hi_open=True)] = 0.1
    val_source: str | None = None
    seq_len: PositiveInt | None = None  # defaults to the model's context_len
    #: auto: stream for stateful models, random for the others; episodes: stateful models
    #: read train.bptt_window segments from a fresh memory per step (RMT's regime);
    #: sliding: the originals' sliding-window LM samples (memlm/data/sliding.py)
    layout: Literal["auto", "random", "stream", "episodes", "sliding"] = "auto"
    #: sliding layout: tokens between window starts (None: the model's segment_len)
    stride: PositiveInt | None = None
    #: sliding layout: score every token ("all", as the originals train) or the last stride
    sliding_score: Literal["all", "new"] = "all"
    #: which targets the loss and the validation score: "all" (language modelling), or
    #: "answers": only the answers of question-answer text (builtin:recall, babi:), as QA
    #: fine-tuning scores only the answer; with "answers" a recall step's whole gradient is
    #: about recall instead of ~4% of it (the rest is filler and unpredictable fact values)
    score: Literal["all", "answers"] = "all"
    #: bAbI sources (babi:, babilong:): give every training row its own seeded renaming of
    #: persons and rooms (`memlm.data.batches.RenameRows`), so a small model cannot answer
    #: a story it has memorised and has to look the answer up (docs/babilong.md, round 7)
    rename: bool = False
    cache_dir: str | None = None


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
