"""`memlm inspect`: one text through a trained model, shown by its architecture's inspector."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from memlm.errors import DataError
from memlm.inspect.segments import traced_forward
from memlm.registry import INSPECTORS


def inspect_text(model: Any, tokenizer: Any, text: str, out: str | Path | None = None,
                 layer: int | None = None, graph: bool = False) -> tuple[str, Path | None]:
    """(the printable report, the folder pictures went to or None) for `text`.

    Text longer than the model's window is read in consecutive windows (stateful models
    carry their memory). `out` is a folder for PNGs; a .png path means its folder. An
    empty text is allowed only with `graph` (the memory graph needs no input).
    """
    model.eval()
    ids = torch.tensor([tokenizer.encode(text)])
    if ids.shape[1] == 0 and not graph:
        raise DataError("nothing to inspect: give --text \"...\" (or --graph for the memory graph).")
    if ids.shape[1] == 0:
        ids = torch.tensor([[0]])
    output = traced_forward(model, ids)
    inspector = INSPECTORS.get(model.config.arch)
    out_dir = Path(out) if out else None
    if out_dir is not None and out_dir.suffix.lower() == ".png":
        out_dir = out_dir.parent  # a PNG path: write next to it
    report = inspector(model, tokenizer.token_strings(ids[0].tolist()), ids, output, out_dir,
                       layer, graph)
    return report, out_dir
