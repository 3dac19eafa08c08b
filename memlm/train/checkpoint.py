"""Atomic, verifiable checkpoints.

Every file is written to a temporary name in the same folder, flushed, fsynced
and renamed over the target, so a crash (even SIGKILL) leaves either the old
file or the new one, never half of one. Weights go through safetensors and
trainer state through `torch.save`, loaded back with `weights_only=True`: a
checkpoint can never execute code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from memlm.errors import CheckpointError


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync, then rename onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file 0600; give it the mode an ordinary open() would (0644 under
        # the usual umask 022), so colleagues sharing a cluster can read checkpoints
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once (safetensors refuses shared storage)."""
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen[key] = name
        out[name] = tensor.detach().contiguous().cpu()
    return out


def save_weights(model: nn.Module, path: str | Path) -> None:
    tensors = _unique_state_dict(model)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def load_weights(model: nn.Module, path: str | Path, map_location: str = "cpu") -> None:
    """Load safetensors weights strictly; tied parameters are restored by the tie."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file {path} does not exist; was the run saved?")
    try:
        tensors = load_file(str(path), device=map_location)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path}: {e}. The file is corrupt or truncated; "
            "use an earlier checkpoint or retrain."
        ) from e
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    # a tied weight is stored under one name only; it is fine to miss the alias
    tied = {k for k in missing if _is_alias(model, k, tensors)}
    missing = [k for k in missing if k not in tied]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match this model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. It was saved from a different architecture or size."
        )
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"{path}: tensor {k!r} has shape {tuple(v.shape)} but the model expects "
                f"{tuple(expected[k].shape)}; the config and weights do not belong together."
            )
    model.load_state_dict(tensors, strict=False)


def _is_alias(model: nn.Module, key: str, stored: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    ptr = state[key].data_ptr()
    return any(state[k].data_ptr() == ptr for k in stored if k in state and k != key)


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
    import dataclasses

    if not (dataclasses.is_dataclass(cls) or (issubclass(cls, tuple) and hasattr(cls, "_fields"))):
        raise TypeError(f"{cls!r} is neither a dataclass nor a NamedTuple; it cannot hold state.")
    STATE_TYPES[state_type_name(cls)] = cls
    return cls


def _state_class(name: Any, kind: str) -> type:
    """The allow-listed class saved as `name`; CheckpointError for anything else."""
    import dataclasses
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
    """A memory state as plain containers and tensors (what weights_only loading accepts)."""
    import dataclasses

    if obj is None or torch.is_tensor(obj) or isinstance(obj, (int, float, str, bool)):
        return obj
    if isinstance(obj, dict):
        return {"__kind__": "dict", "items": {k: pack_state(v) for k, v in obj.items()}}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        _state_class(state_type_name(type(obj)), "dataclass")  # fail at save, not at resume
        return {
            "__kind__": "dataclass",
            "cls": state_type_name(type(obj)),
            "fields": {f.name: pack_state(getattr(obj, f.name)) for f in dataclasses.fields(obj)},
        }
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        _state_class(state_type_name(type(obj)), "namedtuple")
        return {
            "__kind__": "namedtuple",
            "cls": state_type_name(type(obj)),
            "items": [pack_state(v) for v in obj],
        }
    if isinstance(obj, (list, tuple)):
        return {"__kind__": type(obj).__name__, "items": [pack_state(v) for v in obj]}
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
