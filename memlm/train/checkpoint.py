"""Trainer checkpoints: trainer state and the memory state it carries.

Files are written atomically (memlm/io.py, which also holds the weights format);
trainer state goes through `torch.save` and is loaded back with `weights_only=True`,
and memory-state classes come from an allow-list: a checkpoint can never execute code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from memlm.errors import CheckpointError
from memlm.io import (
    atomic_write,
)
from memlm.types import container_kind


def save_trainer_state(state: dict[str, Any], path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"trainer state {path} does not exist; cannot resume.") from e
    except Exception as e:  # torch raises many types for a damaged pickle/zip
        raise CheckpointError(
            f"cannot read trainer state {path}: {e}. The file is corrupt or truncated; "
            "restart without --resume or restore the folder from a backup."
        ) from e


# ----- memory state <-> plain containers -------------------------------------------------
# A stateful model's memory (DNC memory, ARMT A/z, ...) is saved with the trainer state so a
# resumed run continues with exactly the memory it had. `torch.load(weights_only=True)`
# accepts only plain containers and tensors, so dataclasses and named tuples are packed into
# tagged dicts. Unpacking must not let the file choose what code runs: a class name read
# from disk is only ever looked up in STATE_TYPES, an explicit allow-list of state
# containers, and never imported. An unknown name is refused before anything is built.

#: fixed name -> "module:attribute" of memlm's own memory-state containers
_BUILTIN_STATE_TYPES = {
    "memlm.models.rmt:RMTState": ("memlm.models.rmt", "RMTState"),
    "memlm.models.armt:ARMTState": ("memlm.models.armt", "ARMTState"),
    # the names checkpoints written before RMT and ARMT got their own files carry
    "memlm.models.recurrent:RMTState": ("memlm.models.rmt", "RMTState"),
    "memlm.models.recurrent:ARMTState": ("memlm.models.armt", "ARMTState"),
    "memlm.memory.associative:LayerMemory": ("memlm.memory.associative", "LayerMemory"),
    "memlm.models.backbones:SegmentKV": ("memlm.models.backbones", "SegmentKV"),
    "memlm.memory.dnc:DNCState": ("memlm.memory.dnc", "DNCState"),
}
#: fixed name -> class, for state containers registered with `register_state_type`
STATE_TYPES: dict[str, type] = {}


def state_type_name(cls: type) -> str:
    """The name a state class is saved under: "module:qualname"."""
    return f"{cls.__module__}:{cls.__qualname__}"


def register_state_type(cls: type) -> type:
    """Allow `cls` (a dataclass or NamedTuple) as a memory-state container in checkpoints.

    memlm's own state types are allowed already; a model defined outside memlm whose
    `init_state` returns its own container registers it (usable as a class decorator).
    Only plain data containers belong here: unpacking calls the class with stored fields.
    """
    if not (dataclasses.is_dataclass(cls) or (issubclass(cls, tuple) and hasattr(cls, "_fields"))):
        raise TypeError(f"{cls!r} is neither a dataclass nor a NamedTuple; it cannot hold state.")
    STATE_TYPES[state_type_name(cls)] = cls
    return cls


def _state_class(name: Any, kind: str) -> type:
    """The allow-listed class saved as `name`; CheckpointError for anything else."""
    import importlib

    if not isinstance(name, str) or (name not in STATE_TYPES and name not in _BUILTIN_STATE_TYPES):
        known = sorted(set(STATE_TYPES) | set(_BUILTIN_STATE_TYPES))
        raise CheckpointError(
            f"the checkpoint's memory state names the class {name!r}, which is not a known "
            f"memory-state type ({', '.join(known)}); refusing to load it. The trainer state "
            "was not written by memlm or was tampered with; restart without --resume."
        )
    cls = STATE_TYPES.get(name)
    if cls is None:
        module, attr = _BUILTIN_STATE_TYPES[name]
        cls = getattr(importlib.import_module(module), attr)
    ok = dataclasses.is_dataclass(cls) if kind == "dataclass" else hasattr(cls, "_fields")
    if not ok:
        raise CheckpointError(f"the checkpoint stores {name!r} as a {kind}, which it is not; "
                              "the trainer state is damaged.")
    return cls


def pack_state(obj: Any) -> Any:
    """A memory state as plain containers and tensors (what weights_only loading accepts).

    Which objects are containers is memlm.types.container_kind, the rule tree_map uses.
    """
    if obj is None or torch.is_tensor(obj) or isinstance(obj, (int, float, str, bool)):
        return obj
    kind = container_kind(obj)
    if kind == "dict":
        return {"__kind__": "dict", "items": {k: pack_state(v) for k, v in obj.items()}}
    if kind == "dataclass":
        _state_class(state_type_name(type(obj)), "dataclass")  # fail at save, not at resume
        return {
            "__kind__": "dataclass",
            "cls": state_type_name(type(obj)),
            "fields": {f.name: pack_state(getattr(obj, f.name)) for f in dataclasses.fields(obj)},
        }
    if kind == "namedtuple":
        _state_class(state_type_name(type(obj)), "namedtuple")
        return {
            "__kind__": "namedtuple",
            "cls": state_type_name(type(obj)),
            "items": [pack_state(v) for v in obj],
        }
    if kind in ("list", "tuple"):
        return {"__kind__": kind, "items": [pack_state(v) for v in obj]}
    raise TypeError(f"cannot checkpoint a memory state of type {type(obj).__name__}")


def _check_packed(obj: Any, depth: int = 0) -> None:
    """Validate a whole packed tree (names and shapes of the tags) before building anything."""
    if depth > 64:
        raise CheckpointError("the checkpoint's memory state is nested too deeply; it is damaged.")
    if obj is None or torch.is_tensor(obj) or isinstance(obj, (int, float, str, bool)):
        return
    if not isinstance(obj, dict) or obj.get("__kind__") not in (
            "dict", "dataclass", "namedtuple", "list", "tuple"):
        raise CheckpointError(f"the checkpoint's memory state holds an unexpected "
                              f"{type(obj).__name__}; the trainer state is damaged.")
    kind = obj["__kind__"]
    if kind in ("dataclass", "namedtuple"):
        _state_class(obj.get("cls"), kind)
    children = obj.get("fields") if kind == "dataclass" else obj.get("items")
    if kind in ("dict", "dataclass"):
        if not isinstance(children, dict) or not all(isinstance(k, str) for k in children):
            raise CheckpointError("the checkpoint's memory state is damaged (bad fields).")
        children = list(children.values())
    elif not isinstance(children, list):
        raise CheckpointError("the checkpoint's memory state is damaged (bad items).")
    for child in children:
        _check_packed(child, depth + 1)


def _build(obj: Any) -> Any:
    if not isinstance(obj, dict):
        return obj
    kind = obj["__kind__"]
    if kind == "dict":
        return {k: _build(v) for k, v in obj["items"].items()}
    if kind == "dataclass":
        cls = _state_class(obj["cls"], kind)
        try:
            return cls(**{k: _build(v) for k, v in obj["fields"].items()})
        except TypeError as e:
            raise CheckpointError(f"the checkpoint's {obj['cls']} does not match this memlm "
                                  f"version ({e}); restart without --resume.") from e
    if kind == "namedtuple":
        cls = _state_class(obj["cls"], kind)
        try:
            return cls(*[_build(v) for v in obj["items"]])
        except TypeError as e:
            raise CheckpointError(f"the checkpoint's {obj['cls']} does not match this memlm "
                                  f"version ({e}); restart without --resume.") from e
    items = [_build(v) for v in obj["items"]]
    return tuple(items) if kind == "tuple" else items


def unpack_state(obj: Any) -> Any:
    """Rebuild a memory state packed by `pack_state`; only allow-listed classes are built."""
    _check_packed(obj)
    return _build(obj)
