"""Perplexity and token metrics of any memlm model on a token stream.

Stateless models: sliding windows of `seq_len` with a `stride`; every token
after the first is scored exactly once, with as much left context as the window
allows (stride == seq_len gives non-overlapping windows, the cheapest).
Stateful models: the stream is cut into `rows` contiguous rows processed
segment by segment with the memory state carried (the layout the trainer uses),
so carried memory is what is measured.

Tokens may be a memory-mapped array of any length: windows are sliced from it one
batch at a time, so memory stays flat. bits_per_byte divides by the UTF-8 bytes of
the tokens actually scored (with `max_batches` that is a prefix, not the file).
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from memlm.eval.metrics import TokenMetrics
from memlm.models.streaming import iter_segment_bounds, read_segments, segment_alignment
from memlm.nn.precision import autocast_context
from memlm.types import IGNORE_INDEX, evaluating


def _windows(n: int, seq_len: int, stride: int):
    """Yield (start, end, first_scored) for sliding windows over n tokens (n-1 targets)."""
    scored_until = 0  # targets [0, scored_until) already scored
    start = 0
    while scored_until < n - 1:
        end = min(start + seq_len, n - 1)
        yield start, end, scored_until - start
        scored_until = end
        if end >= n - 1:
            break
        start = max(start + stride, end - seq_len + stride) if stride < seq_len else end


class ScoredSpans:
    """The target positions scored so far, as merged [lo, hi) intervals of the stream."""

    def __init__(self) -> None:
        self._start_of: dict[int, int] = {}  # hi -> lo of each maximal interval

    def add(self, lo: int, hi: int) -> None:
        if hi <= lo:
            return
        start = self._start_of.pop(lo, lo)  # extends an interval ending at lo
        self._start_of[hi] = start

    def spans(self) -> list[tuple[int, int]]:
        return sorted((lo, hi) for hi, lo in self._start_of.items())

    def count(self) -> int:
        return sum(hi - lo for lo, hi in self.spans())


def count_bytes(tokenizer: Any, tokens: np.ndarray, spans: list[tuple[int, int]],
                chunk: int = 1 << 20) -> int:
    """UTF-8 bytes of the text of `tokens[lo:hi]` over `spans`, decoded a chunk at a time."""
    total = 0
    for lo, hi in spans:
        for a in range(lo, hi, chunk):
            ids = np.asarray(tokens[a : min(a + chunk, hi)], dtype=np.int64).tolist()
            total += len(tokenizer.decode(ids).encode("utf-8"))
    return total


def _ids(tokens: np.ndarray, lo: int, hi: int) -> torch.Tensor:
    """tokens[lo:hi] as an int64 tensor (copies only the slice, even from a memmap)."""
    return torch.from_numpy(np.asarray(tokens[lo:hi], dtype=np.int64))


@torch.no_grad()
def evaluate(
    model,
    tokens: np.ndarray | torch.Tensor,
    seq_len: int | None = None,
    batch_size: int = 8,
    stride: int | None = None,
    max_batches: int | None = None,
    precision: str = "auto",
    n_bytes: int | None = None,
    rows: int = 1,
    progress: bool = False,
    tokenizer: Any = None,
    scored: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of `model` on `tokens` (see TokenMetrics.compute for the keys).

    `scored` (one bool per token, `data.score: answers`): only the tokens it marks count as
    targets; the layout and the context each token is read with stay the same.

    bits_per_byte: with `tokenizer`, the scored tokens are decoded and their UTF-8 bytes
    counted; otherwise `n_bytes` (the bytes of the whole text `tokens` encode) is used, and
    only when every token was scored, because a prefix's loss over the whole text's bytes
    is meaningless.
    """
    from memlm.errors import ConfigError

    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("stride", stride),
                        ("max_batches", max_batches), ("rows", rows)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}.")
    device = next(model.parameters()).device
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    tokens = np.asarray(tokens).reshape(-1)  # a memmap stays a memmap: nothing is loaded
    if scored is not None and len(scored) != len(tokens):
        raise ConfigError(f"the scored-token mask has {len(scored)} entries for {len(tokens)} "
                          "tokens; build both from the same text.")
    seq_len = seq_len or model.config.context_len
    metrics = TokenMetrics()
    spans = ScoredSpans()
    with evaluating(model):
        if getattr(model, "is_stateful", False):
            _eval_stream(model, tokens, seq_len, rows, max_batches, precision, metrics, device,
                         progress, spans, scored)
        else:
            _eval_windows(model, tokens, seq_len, batch_size, stride or seq_len, max_batches,
                          precision, metrics, device, progress, spans, scored)
    if metrics.n_tokens and scored is None:  # bytes of a masked stream mean nothing
        if tokenizer is not None:
            metrics.n_bytes = count_bytes(tokenizer, tokens, spans.spans())
        elif n_bytes is not None and spans.count() >= len(tokens) - 1:
            metrics.n_bytes = n_bytes
    out = metrics.compute()
    out["layout"] = (f"stream rows={rows} seg={seq_len}" if getattr(model, "is_stateful", False)
                     else f"windows len={seq_len} stride={stride or seq_len}")
    return out


def _record(metrics: TokenMetrics, out, targets: torch.Tensor) -> None:
    metrics.update(out.logits, targets)
    n = int((targets != IGNORE_INDEX).sum())
    for name, value in out.metrics.items():
        metrics.add_extra(name, float(value), n)


def _targets(tokens: np.ndarray, scored: np.ndarray | None, lo: int, hi: int) -> torch.Tensor:
    """tokens[lo:hi] as targets, IGNORE_INDEX where `scored` (when given) is False."""
    y = _ids(tokens, lo, hi)
    if scored is not None:
        y = y.masked_fill(~torch.from_numpy(np.asarray(scored[lo:hi], dtype=bool)), IGNORE_INDEX)
    return y


def _eval_windows(model, tokens, seq_len, batch_size, stride, max_batches, precision, metrics,
                  device, progress, spans, scored):
    wins = _windows(len(tokens), seq_len, stride)  # lazy: no list of millions of windows
    if max_batches is not None:
        wins = itertools.islice(wins, max_batches * batch_size)
    n_targets = max(len(tokens) - 1, 0)
    bar = tqdm(total=n_targets, desc="eval", unit="tok", disable=not progress or None,
               leave=False)
    while chunk := list(itertools.islice(wins, batch_size)):
        length = max(e - s for s, e, _ in chunk)
        x = torch.zeros(len(chunk), length, dtype=torch.long)
        y = torch.full((len(chunk), length), IGNORE_INDEX, dtype=torch.long)
        for r, (s, e, first) in enumerate(chunk):
            x[r, : e - s] = _ids(tokens, s, e)
            y[r, max(first, 0) : e - s] = _targets(tokens, scored, s + max(first, 0) + 1, e + 1)
            spans.add(s + max(first, 0) + 1, e + 1)
            bar.update(e - s - max(first, 0))
        x, y = x.to(device), y.to(device)
        with autocast_context(device, precision):
            out = model(x)
        _record(metrics, out, y)
    bar.close()


def _eval_stream(model, tokens, seq_len, rows, max_batches, precision, metrics, device, progress,
                 spans, scored):
    """Stateful models: `rows` contiguous rows read by the one segment loop (memory carried,
    segments of `seq_len` cut by the model's alignment)."""
    row_len = (len(tokens) - 1) // rows
    bounds = iter_segment_bounds(row_len, seq_len, segment_alignment(model)) if row_len > 0 \
        else iter(())
    n_seg = -(-row_len // seq_len)
    if max_batches is not None:
        bounds, n_seg = itertools.islice(bounds, max_batches), min(n_seg, max_batches)

    def segments():
        for lo, hi in tqdm(bounds, total=n_seg, desc="eval", disable=not progress or None, leave=False):
            x = torch.stack([_ids(tokens, r * row_len + lo, r * row_len + hi) for r in range(rows)])
            y = torch.stack([_targets(tokens, scored, r * row_len + lo + 1, r * row_len + hi + 1)
                             for r in range(rows)])
            for r in range(rows):
                spans.add(r * row_len + lo + 1, r * row_len + hi + 1)
            yield x.to(device), y.to(device), lo

    for step in read_segments(model, segments(), model.init_state(rows, device),
                              context=lambda: autocast_context(device, precision)):
        _record(metrics, step.output, step.targets)
