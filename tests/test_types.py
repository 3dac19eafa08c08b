"""memlm.types (state trees, eval mode) and memlm.specs (the string grammars)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

from memlm.errors import ConfigError, DataError
from memlm.specs import (
    length_name,
    parse_count,
    parse_counts,
    parse_length,
    parse_lengths,
    parse_options,
    split_eval_tasks,
)
from memlm.types import container_kind, evaluating, tree_detach, tree_map, tree_to, tree_where_rows


class Pair(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


@dataclass
class Box:
    x: torch.Tensor
    n: int


def _state(batch: int = 3, value: float = 0.0, grad: bool = False):
    t = lambda *s: torch.full((batch, *s), value, requires_grad=grad)  # noqa: E731
    return {"pair": Pair(t(2), t(2, 2)), "list": [t(1), None], "box": Box(t(4), 7),
            "tuple": (t(1),)}


def test_tree_map_keeps_every_container_type():
    state = _state()
    out = tree_map(lambda x: x + 1 if torch.is_tensor(x) else x, state)
    assert isinstance(out["pair"], Pair) and isinstance(out["box"], Box)
    assert isinstance(out["list"], list) and isinstance(out["tuple"], tuple)
    assert out["list"][1] is None and out["box"].n == 7
    assert float(out["pair"].b.sum()) == 3 * 4
    assert [container_kind(v) for v in (state, state["pair"], state["box"], [], (), 1)] == [
        "dict", "namedtuple", "dataclass", "list", "tuple", None]


def test_tree_detach_and_tree_to_reach_every_tensor():
    state = _state(grad=True)
    detached = tree_detach(state)
    leaves = []
    tree_map(lambda x: leaves.append(x) if torch.is_tensor(x) else None, detached)
    assert len(leaves) == 5 and not any(x.requires_grad for x in leaves)
    moved = tree_to(state, "meta")
    assert moved["box"].x.device.type == "meta" and moved["pair"].a.device.type == "meta"
    assert tree_detach(None) is None


def test_tree_where_rows_resets_only_the_masked_rows():
    old, fresh = Pair(torch.ones(3, 2), torch.ones(3, 2, 2)), Pair(torch.zeros(3, 2),
                                                                  torch.zeros(3, 2, 2))
    out = tree_where_rows(torch.tensor([False, True, False]), fresh, old)
    assert isinstance(out, Pair)
    assert out.a[:, 0].tolist() == [1, 0, 1] and out.b[:, 0, 0].tolist() == [1, 0, 1]
    with pytest.raises(TypeError, match="unexpected state element"):
        tree_where_rows(torch.tensor([True]), ("x",), ("y",))


@pytest.mark.parametrize("start_training", [True, False])
def test_evaluating_restores_the_mode_even_on_error(start_training):
    model = nn.Sequential(nn.Dropout(0.5))
    model.train(start_training)
    with evaluating(model):
        assert not model.training
    assert model.training is start_training
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError("boom")
    assert model.training is start_training


def test_counts_and_lengths():
    assert parse_count("5M") == 5_000_000 and parse_count("1.5B") == 1_500_000_000
    assert parse_count(" 20k ") == 20_000 and parse_count(7.0) == 7
    assert parse_counts("8,32,1k") == [8, 32, 1000] and parse_counts([1, 2]) == [1, 2]
    with pytest.raises(ConfigError, match="as a count"):
        parse_count("lots")
    assert parse_lengths("0k,1k,4k") == [0, 1000, 4000]
    assert parse_length(np.int64(512)) == 512 and parse_length("1M") == 1_000_000
    for bad in ("four", "-1k", "1B"):
        with pytest.raises(ConfigError):
            parse_length(bad)
    assert [length_name(n) for n in (0, 700, 4000, 2_000_000)] == ["0k", "700", "4k", "2M"]


def test_options_grammar():
    allowed = {"chars": int, "near": float}
    assert parse_options("chars=9, near=0.5".split(","), allowed, "x") == {"chars": 9, "near": 0.5}
    with pytest.raises(DataError, match=r"bad option 'size=1' in 'size=1'; .*chars, near"):
        parse_options(["size=1"], allowed, "size=1", DataError)
    with pytest.raises(ConfigError, match=r"bad value in option 'chars=x'"):
        parse_options(["chars=x"], allowed, "chars=x")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_options(["chars"], allowed, "chars")


def test_eval_task_list_splits_at_task_commas_only():
    assert split_eval_tasks("ppl,babilong:qa1@0k,1k,zeroshot:piqa,hellaswag,ppl") == [
        "ppl", "babilong:qa1@0k,1k", "zeroshot:piqa+hellaswag", "ppl"]
    assert split_eval_tasks("babilong:qa1@0k, 4k") == ["babilong:qa1@0k,4k"]
