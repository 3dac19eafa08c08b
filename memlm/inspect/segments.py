"""Run a model on text longer than its window, for inspection.

A model whose forward pass takes at most `context_len` tokens (GMT, DNC, the dense
GPT) cannot read a recall example whose fact is two windows before its question in
one call. `traced_forward` reads such text in consecutive windows the way the model
is used: a stateful model (DNC) carries its memory from window to window, so what it
wrote in window k is there when window k+2 reads it; a stateless model (GMT) reads
each window on its own, as it does in every evaluation. The per-token trace tensors
of the windows are joined along the token axis, so the inspectors print and draw one
row per token of the whole text. Models that cut long input into segments themselves
(RMT, ARMT) and models without a length limit get one call, as before.
"""

from __future__ import annotations

from typing import Any

import torch

from memlm.models.base import ModelOutput
from memlm.types import evaluating


def _needs_windows(model: Any, n: int) -> bool:
    if hasattr(model, "segment_len"):  # RMT / ARMT cut their input into segments themselves
        return False
    limit = getattr(model.config, "context_len", None)
    return bool(limit) and n > limit and hasattr(model, "check_length")


def _join(parts: list[Any], lengths: list[int], batch: int) -> Any:
    """Concatenate per-token tensors ([B, T, ...] with T the window's length) along T.

    Anything else (per-layer tables, strings, GMT's edge matrices) is taken from the
    last window: it describes the model or its state after the whole text.
    """
    last = parts[-1]
    if not all(isinstance(p, torch.Tensor) for p in parts):
        return last
    if all(p.dim() >= 2 and p.shape[0] == batch and p.shape[1] == n
           for p, n in zip(parts, lengths)):
        return torch.cat(parts, dim=1)
    return last


@torch.no_grad()
def traced_forward(model: Any, ids: torch.Tensor) -> ModelOutput:
    """The model's traced output for `ids` [B, T] of any length, from a fresh memory.

    Logits, traces and metrics of consecutive `context_len` windows are joined (metrics
    averaged over windows, weighted by their token counts); `state` is the final one.
    """
    with evaluating(model):
        state = model.init_state(ids.shape[0], ids.device)
        if not _needs_windows(model, ids.shape[1]):
            return model(ids, state=state, trace=True)
        window = model.config.context_len
        outs, lengths = [], []
        for lo in range(0, ids.shape[1], window):
            part = ids[:, lo : lo + window]
            out = model(part, state=state, trace=True)
            state = out.state if getattr(model, "is_stateful", False) else state
            outs.append(out)
            lengths.append(part.shape[1])
    total = sum(lengths)
    trace: dict[str, Any] = {}
    for key in outs[-1].trace or {}:
        trace[key] = _join([o.trace.get(key) for o in outs], lengths, ids.shape[0])
    metrics = {k: sum(o.metrics[k].float() * n for o, n in zip(outs, lengths)) / total
               for k in outs[-1].metrics if all(k in o.metrics for o in outs)}
    return ModelOutput(logits=torch.cat([o.logits for o in outs], dim=1), state=state,
                       trace=trace, metrics=metrics)


__all__ = ["traced_forward"]
