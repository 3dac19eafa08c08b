"""What a carried memory adds: perplexity read three ways on the same segments.

    from memlm.eval.memory_modes import memory_modes
    memory_modes(model, val_tokens, seq_len=64)  # ppl_carry, ppl_reset, ppl_nomem, mem_gain

* **carry**: the memory state carried from segment to segment (how the model streams);
* **reset**: every segment starts from the initial memory (only the window helps);
* **nomem**: as reset, with the memory read removed (`nomem=True`, DNC).

All three go through memlm's one segment loop (`memlm.models.streaming.read_segments`),
so they differ only in what is carried. `mem_gain` = ln ppl_reset - ln ppl_carry (nats
per token) is what the carried memory adds beyond the window. Written for DNC (the only
architecture with a `nomem` switch); carry and reset work for any stateful model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from memlm.models.base import ModelOutput
from memlm.models.streaming import read_segments
from memlm.types import evaluating


def carry_segments(model: Any, segments: Sequence[torch.Tensor], state: Any = None,
                   **kwargs: Any) -> list[ModelOutput]:
    """Run consecutive segments [B, T] through the model, carrying the memory state."""
    offsets = [0]
    for seg in segments:
        offsets.append(offsets[-1] + seg.shape[1])
    source = [(seg, None, start) for seg, start in zip(segments, offsets)]
    return [step.output for step in read_segments(model, source, state, **kwargs)]


@torch.no_grad()
def memory_modes(model: Any, tokens: torch.Tensor, seq_len: int | None = None, rows: int = 1,
                 max_segments: int | None = None) -> dict[str, Any]:
    """Perplexity with carried memory, with memory reset every segment, and without reads.

    `tokens` [N] is cut into `rows` contiguous rows read in full segments of `seq_len`
    (default: the model's context_len); all three modes score the same tokens.
    """
    device = next(model.parameters()).device
    seq_len = seq_len or model.config.context_len
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    row_len = (tokens.numel() - 1) // rows
    n_seg = row_len // seq_len
    if max_segments is not None:
        n_seg = min(n_seg, max_segments)
    segments = []
    for s in range(n_seg):
        lo = s * seq_len
        x = torch.stack([tokens[r * row_len + lo : r * row_len + lo + seq_len]
                         for r in range(rows)]).to(device)
        y = torch.stack([tokens[r * row_len + lo + 1 : r * row_len + lo + seq_len + 1]
                         for r in range(rows)]).to(device)
        segments.append((x, y, lo))
    modes = {"carry": {}, "reset": {"reset_memory": True},
             "nomem": {"reset_memory": True, "nomem": True}}
    nll = {name: 0.0 for name in modes}
    count = 0
    with evaluating(model):
        for name, kwargs in modes.items():
            for step in read_segments(model, segments, model.init_state(rows, device), **kwargs):
                nll[name] += float(step.token_nll.double().sum())
                if name == "carry":
                    count += step.n_scored
    result: dict[str, Any] = {f"ppl_{k}": math.exp(v / max(count, 1)) for k, v in nll.items()}
    result["mem_gain"] = (nll["reset"] - nll["carry"]) / max(count, 1)
    result["tokens"] = count
    result["layout"] = f"stream rows={rows} seg={seq_len}"
    return result
