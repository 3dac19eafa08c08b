"""Config fields are checked from their type hints (memlm/config.py, ConfigBase).

The tests walk every field of every config class, so a new `Literal` or range field is
covered without a new test, and a hand-written check that disagrees with the type shows up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import pytest

import memlm
from memlm.cli import main
from memlm.config import (
    ConfigBase,
    CurriculumStage,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    _field_rules,
    above,
    at_least,
    between,
)
from memlm.errors import ConfigError
from memlm.models.gmt import GMTConfig
from memlm.models.tmt import TMTConfig
from memlm.registry import ARCHITECTURES

#: small sizes so a valid config of every architecture builds its config quickly
SMALL = {"n_layer": 2, "d_model": 32, "n_head": 2, "context_len": 32, "vocab_size": 64}


def _config_classes() -> list[type]:
    classes = {ARCHITECTURES.get(name).config_cls for name in ARCHITECTURES.names()}
    return sorted(classes | {TrainConfig, DataConfig, CurriculumStage}, key=lambda c: c.__name__)


def _valid(cls: type, **changes):
    """`cls` built with `changes` on top of small, valid values."""
    if issubclass(cls, ModelConfig):
        return cls.from_dict({**SMALL, **changes})
    if cls is CurriculumStage:
        return cls.from_dict({"steps": 1, **changes})
    return cls.from_dict(changes)


def _outside(rule) -> list[float]:
    """Values just outside a field's range (each end that exists)."""
    r, step = rule.bounds, (1 if rule.hint is int else 0.5)
    out = []
    if r.lo is not None:
        out.append(r.lo if r.lo_open else r.lo - step)
    if r.hi is not None:
        out.append(r.hi if r.hi_open else r.hi + step)
    return out


def _cases(kind: str) -> list[tuple[type, object]]:
    cases = []
    for cls in _config_classes():
        for rule in _field_rules(cls):
            if (rule.choices if kind == "literal" else rule.bounds) is not None:
                cases.append(pytest.param(cls, rule, id=f"{cls.__name__}.{rule.name}"))
    return cases


def _one_line(message: str, *parts: str) -> None:
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


@pytest.mark.parametrize("cls, rule", _cases("literal"))
def test_a_value_outside_a_literal_is_refused_with_the_choices(cls, rule):
    with pytest.raises(ConfigError) as e:
        _valid(cls, **{rule.name: "not-a-choice"})
    _one_line(str(e.value), rule.name, "'not-a-choice'", *(repr(c) for c in rule.choices))


@pytest.mark.parametrize("cls, rule", _cases("range"))
def test_a_value_outside_a_range_is_refused_with_the_range(cls, rule):
    for value in _outside(rule):
        with pytest.raises(ConfigError) as e:
            _valid(cls, **{rule.name: value})
        _one_line(str(e.value), rule.name, str(rule.bounds), repr(value))


def test_every_config_class_declares_its_choices_and_ranges():
    """Each class has typed checks (nobody fell back to hand-written ones or plain str)."""
    for cls in _config_classes():
        if cls.__name__ == "GPTConfig":  # adds no field of its own
            continue
        rules = _field_rules(cls)
        assert any(r.choices or r.bounds for r in rules), cls.__name__
    assert {r.name for r in _field_rules(TrainConfig) if r.choices} == {
        "schedule", "precision", "stage_handover", "stage_metric"}


def test_each_architecture_gets_the_one_line_error_through_build():
    examples = {"gpt": ("dropout", 1.0), "gmt": ("graph_logits", "linear"),
                "dnc": ("mem_slots", 0), "tmt": ("pos_emb", "learned"),
                "tmt-xmem": ("decay", "exp"), "rmt": ("memory_from", "middle"),
                "armt": ("key_norm", "l1")}
    for arch in ARCHITECTURES.names():
        name, value = examples[arch]
        with pytest.raises(ConfigError, match=f"model.{name} must be"):
            memlm.build(arch, **SMALL, **{name: value})


def test_the_ends_of_a_range_follow_its_brackets():
    assert _valid(ModelConfig, dropout=0.0).dropout == 0.0  # [0, 1): 0 allowed
    with pytest.raises(ConfigError, match=r"model.dropout must be in \[0, 1\), got 1.0"):
        _valid(ModelConfig, dropout=1.0)
    assert _valid(TrainConfig, warmup_steps=0).warmup_steps == 0  # >= 0
    with pytest.raises(ConfigError, match="train.lr must be > 0, got 0"):
        _valid(TrainConfig, lr=0)
    assert _valid(TMTConfig, exit_threshold=1.0).exit_threshold == 1.0  # [0, 1]
    assert _valid(TMTConfig, exit_threshold=None).exit_threshold is None
    assert (str(at_least(1)), str(above(0)), str(between(0, 1, lo_open=True, hi_open=True))) == (
        ">= 1", "> 0", "in (0, 1)")


def test_types_are_checked_before_ranges_and_on_direct_construction():
    with pytest.raises(ConfigError, match="model.n_layer must be an integer, got '2'"):
        ModelConfig(n_layer="2")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="train.lr must be a finite number, got inf"):
        TrainConfig(lr=float("inf"))
    with pytest.raises(ConfigError, match="train.batch_size must be an integer, got True"):
        TrainConfig(batch_size=True)


def test_a_new_config_class_is_checked_without_a_hand_written_check():
    @dataclass
    class Toy(ConfigBase):
        section = "toy"
        mode: Literal["a", "b"] = "a"
        rate: Annotated[float, between(0, 1)] | None = None

    assert Toy(mode="b", rate=1.0).mode == "b"
    with pytest.raises(ConfigError, match="toy.mode must be one of 'a', 'b'; got 'c'"):
        Toy(mode="c")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"toy.rate must be in \[0, 1\] \(or null\), got 2"):
        Toy(rate=2)


def test_cross_field_rules_stay_in_post_init():
    with pytest.raises(ConfigError, match="not divisible by n_head"):
        _valid(ModelConfig, d_model=30, n_head=4)
    with pytest.raises(ConfigError, match="temp_min <= temp_max"):
        _valid(GMTConfig, temp_min=0.5, temp_max=0.2)
    with pytest.raises(ConfigError, match="train.device"):
        TrainConfig(device="cuda:x")


# ----- train.curriculum -----------------------------------------------------------------


def test_curriculum_stages_are_typed_and_round_trip():
    run = RunConfig.from_dict({"model": SMALL, "train": {"curriculum": [
        {"steps": 4, "seq_len": 16}, {"steps": "2", "batch_size": 3}]}})
    stages = run.train.curriculum
    assert stages == [CurriculumStage(4, seq_len=16), CurriculumStage(2, batch_size=3)]
    assert run.train.total_steps == 6 and TrainConfig(max_steps=9).total_steps == 9
    assert RunConfig.from_dict(run.to_dict()) == run  # YAML/JSON round trip
    over = run.with_overrides(["train.curriculum=[{steps: 5}]"])  # --set
    assert over.train.curriculum == [CurriculumStage(5)]


@pytest.mark.parametrize("stages, expect", [
    ([{"seq_len": 8}], "train.curriculum[0] needs steps"),
    ([{"steps": 2}, {"steps": 0}], "train.curriculum[1]: steps must be >= 1, got 0"),
    ([{"steps": 2, "seq_len": -1}], "train.curriculum[0]: seq_len must be >= 1 (or null)"),
    ([{"steps": 2, "seqlen": 8}], "unknown config key 'seqlen' in train.curriculum[0]"),
    ([8], "train.curriculum[0] must be a mapping"),
    ("steps: 8", "train.curriculum must be a list"),
])
def test_bad_curriculum_stages_name_the_stage(stages, expect):
    with pytest.raises((ConfigError, KeyError)) as e:
        TrainConfig.from_dict({"curriculum": stages}, "train")
    _one_line(str(e.value), expect)


def test_bad_stage_from_the_command_line_is_one_line_exit_2(tmp_path, capsys):
    code = main(["train", "gpt-char-tiny", "--out", str(tmp_path / "run"),
                 "--set", "train.curriculum=[{steps: 0}]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "train.curriculum[0]: steps must be >= 1" in err
    assert not (tmp_path / "run").exists()
