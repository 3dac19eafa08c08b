"""Files that must never be half-written, and model weights that must never run code.

Every file is written to a temporary name in the same folder, flushed, fsynced and
renamed over the target, so a crash (even SIGKILL) leaves either the old file or the
new one, never half of one. Weights go through safetensors and are loaded strictly:
a weights file holds tensors only, so loading it can never execute code, and a file
saved from another architecture or size is refused with one line.

This module sits at the bottom of the package (it imports only memlm.errors) so that
models (save_pretrained / from_pretrained), the trainer and the HF wrapper share it.
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


def read_weights(path: str | Path, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (data only: nothing in it can run code)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file {path} does not exist; was the run saved?")
    try:
        return load_file(str(path), device=map_location)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path}: {e}. The file is corrupt or truncated; "
            "use an earlier checkpoint or retrain."
        ) from e


def load_weights(model: nn.Module, path: str | Path, map_location: str = "cpu") -> None:
    """Load safetensors weights strictly; tied parameters are restored by the tie."""
    tensors = read_weights(path, map_location)
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
