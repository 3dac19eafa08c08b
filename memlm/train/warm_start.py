"""`train.init_from`: start a run from another run's weights instead of a random init.

The BABILong recipe needs it: a tiny model first learns to look facts up in its context
as a plain dense GPT on bAbI stories (fast, no memory), then ARMT or RMT wraps those
weights and learns to carry the facts across segments. This is the from-scratch analogue
of what the RMT/ARMT papers do with a pretrained GPT-2 (docs/babilong.md).

Weights are matched by their name with memlm's wrapper levels removed: a recurrent model
keeps its backbone under ``backbone.model.`` and wraps each block's layer as
``blocks.i.layer.``, so ``decoder.blocks.0.attn.qkv.weight`` of a GPT and
``backbone.model.decoder.blocks.0.layer.attn.qkv.weight`` of an ARMT are the same tensor.
Every tensor of the source must find its place with its shape, so a wrong size or a wrong
architecture is an error, not a silent half-load; the target's tensors the source does not
have (an ARMT's memory, an RMT's memory tokens) keep their fresh initialisation, and the
trainer says which. Only safetensors are read: nothing loaded can run code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memlm import io as memlm_io
from memlm.errors import CheckpointError, ConfigError
from memlm.train import run as runlayout


def canonical_name(name: str) -> str:
    """A parameter's name without memlm's wrapper levels (see the module docstring)."""
    if name.startswith("backbone.model."):
        name = name[len("backbone.model."):]
    return name.replace(".layer.", ".")


@dataclass
class WarmStart:
    """What `init_from` loaded: for the run's log."""

    source: Path
    loaded: int  # tensors copied from the source
    fresh: list[str]  # the target's tensors left at their initialisation

    def summary(self) -> str:
        fresh = ""
        if self.fresh:
            shown = ", ".join(self.fresh[:4]) + (", ..." if len(self.fresh) > 4 else "")
            fresh = f"; {len(self.fresh)} keep their fresh init ({shown})"
        return f"init_from: {self.loaded} tensors from {self.source}{fresh}"


def init_from(model: nn.Module, path: str | Path, tokenizer: Any) -> WarmStart:
    """Copy the weights of the run or model folder `path` into `model` (in place).

    `tokenizer` is this run's: it must be the one the source was trained with (ids would
    mean other words otherwise).
    """
    try:
        folder = runlayout.resolve_model_dir(path)
    except CheckpointError as e:
        raise ConfigError(f"train.init_from: {e}") from e
    runlayout.check_tokenizer_fingerprint(tokenizer, folder)
    source = memlm_io.read_weights(folder / "model.safetensors")

    # a tied tensor once, under its first name, as the saved file has it
    targets: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            targets.setdefault(canonical_name(name), tensor)
    by_name = {canonical_name(k): (k, v) for k, v in source.items()}
    unplaced = [k for c, (k, _) in by_name.items() if c not in targets]
    if unplaced:
        raise ConfigError(
            f"train.init_from: {len(unplaced)} tensors of {folder} have no place in this "
            f"model (e.g. {unplaced[0]}); the source is another architecture. Start from a "
            "run of the same architecture, or of the dense GPT this model wraps.")
    for c, (k, v) in by_name.items():
        if targets[c].shape != v.shape:
            raise ConfigError(
                f"train.init_from: {k} is {tuple(v.shape)} in {folder} but "
                f"{tuple(targets[c].shape)} here; the model sizes differ (n_layer, d_model, "
                "vocab). Use the source's sizes.")
    with torch.no_grad():
        for c, (_, v) in by_name.items():
            targets[c].copy_(v.to(targets[c].dtype))
    fresh = [c for c in targets if c not in by_name]
    return WarmStart(folder, len(by_name), fresh)
