"""The few shared values every layer may use: the ignored-target id, memory-state trees, eval mode.

This is the leaf of the package (it imports nothing from memlm), so data/, memory/,
models/ and train/ can all share these without importing each other.

A memory state is a tree: tensors (the leaves) inside dicts, lists, tuples, NamedTuples
(RMTState, ARMTState, DNCState, LayerMemory) and dataclasses. Every operation on a
whole state (cut its gradient, move it to a device, restart some of its rows) is one
`tree_map` with a small function, so the container rules live in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

#: target id that every loss and metric skips (padding, prompt, unscored context);
#: the value torch's cross_entropy ignores by default
IGNORE_INDEX = -100


def container_kind(obj: Any) -> str | None:
    """'dict', 'namedtuple', 'dataclass', 'list' or 'tuple' for a state container, else None.

    The one rule for which objects a state tree descends into (checkpoint packing in
    train/checkpoint.py uses it too). A NamedTuple is checked before a plain tuple because
    it must be rebuilt from positional fields.
    """
    if isinstance(obj, dict):
        return "dict"
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return "namedtuple"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return "dataclass"
    if isinstance(obj, list):
        return "list"
    if isinstance(obj, tuple):
        return "tuple"
    return None


def tree_map(fn: Callable[..., Any], tree: Any, *others: Any) -> Any:
    """Apply `fn` to every leaf of `tree` (and the matching leaves of `others`), keep the shape.

    `others` must have the same structure as `tree`; `fn(leaf, *other_leaves)` is called
    on every leaf, None included, so `fn` decides what a non-tensor leaf becomes.
    """
    kind = container_kind(tree)
    if kind is None:
        return fn(tree, *others)
    if kind == "dict":
        return {k: tree_map(fn, v, *(o[k] for o in others)) for k, v in tree.items()}
    if kind == "dataclass":
        return type(tree)(**{f.name: tree_map(fn, getattr(tree, f.name),
                                              *(getattr(o, f.name) for o in others))
                             for f in dataclasses.fields(tree)})
    items = [tree_map(fn, v, *parts) for v, *parts in zip(tree, *others)]
    return type(tree)(*items) if kind == "namedtuple" else type(tree)(items)


def tree_detach(state: Any) -> Any:
    """Cut the gradient through every tensor of a state (truncated BPTT)."""
    return tree_map(lambda x: x.detach() if hasattr(x, "detach") else x, state)


def tree_to(state: Any, device: torch.device | str) -> Any:
    """Move every tensor of a state to `device` (a resumed state loads on the CPU)."""
    return tree_map(lambda x: x.to(device) if torch.is_tensor(x) else x, state)


def tree_where_rows(mask: torch.Tensor, fresh: Any, old: Any) -> Any:
    """Per batch row, take `fresh` where `mask` [B] is True and `old` elsewhere.

    What `reset_state_rows` does when some rows of a batch start a new stream: those
    rows get the initial memory, the others keep theirs. Every leaf of `old` is a tensor
    whose first dimension is the batch.
    """
    mask = mask.to(torch.bool)

    def pick(o: Any, f: Any) -> torch.Tensor:
        if not torch.is_tensor(o):
            raise TypeError(f"unexpected state element {type(o).__name__}")
        return torch.where(mask.view(-1, *([1] * (o.dim() - 1))), f.to(o.dtype), o)

    return tree_map(pick, old, fresh)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block and restore its previous mode afterwards.

    Restores on any exit, errors included, so a failed evaluation in the middle of
    training never leaves dropout switched off.
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
