"""The one segment loop: how any memlm model reads a sequence longer than one call.

    for step in read_segments(model, ids):              # ids [B, T], any T
        step.output.logits, step.state
    for step in model.stream(tokens):                   # a token stream, scored
        step.nll_sum, step.n_scored

Every consumer that feeds a model more text than one forward call takes goes through
`read_segments`: the evaluators (perplexity, stream, recall, BABILong, zero-shot, DNC
memory modes), the transformers wrapper, the conformance probes and generation's prompt
reading. So there is one place that decides how a long text is cut and what is carried:

* **Where segments are cut comes from the model.** A segment is `segment_length(model)`
  tokens (RMT/ARMT: `segment_len`; any other model: `context_len`), and a sequence of
  known length is cut by `segment_bounds(T, L, segment_alignment(model))`: the very
  cuts `RecurrentLM.forward` makes when it is given the whole sequence, so reading a
  text in pieces and reading it in one call see the same segments. Most models (and
  every shipped config) use "left": cuts at L, 2L, ... from the first token. An
  open-ended stream (an iterator of chunks) can only be cut from its start.
* **A stateful model carries its memory** from each segment to the next, detached in
  between (the reader is an inference loop; training carries state itself), starting
  from `state` or the model's initial state; `reset_memory=True` starts every segment
  from the initial state (the control run that shows what the memory adds; a model's
  `forget_memory(state)`, where it has one, decides what that keeps: RMT/ARMT keep their
  sliding window, which is attention context, not memory).
* **A stateless model sees a window**: each segment alone by default, or, with
  `window=W`, the segment preceded by up to W - len(segment) earlier tokens (a sliding
  window with stride L); only the segment's own positions are returned.

This module sits in `models/` and knows nothing of files or tokenizers: file sources are
opened by `memlm.eval.stream` and handed in as arrays or chunk iterators.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from memlm.errors import DataError
from memlm.models.base import ModelOutput
from memlm.types import IGNORE_INDEX, evaluating, tree_detach

#: one cut segment: inputs [B, L_s], targets [B, L_s] or None, offset of its first input
Segment = tuple[torch.Tensor, "torch.Tensor | None", int]


@dataclass
class StreamStep:
    """One segment of a read (all rows of the batch)."""

    index: int  #: 0-based segment index
    start: int  #: offset of the segment's first input token within its row
    output: ModelOutput  #: the model's output for the segment's own positions
    nll_sum: float = 0.0  #: summed next-token NLL over the scored positions (0 without targets)
    n_scored: int = 0  #: positions whose target is not IGNORE_INDEX
    #: per-position NLL [B, L_s] in float32, 0 where not scored (None without targets)
    token_nll: torch.Tensor | None = None
    #: the segment's targets [B, L_s] (None without targets)
    targets: torch.Tensor | None = None

    @property
    def state(self) -> Any:
        return self.output.state


# ----- the model's segmentation rule -------------------------------------------------------


def segment_length(model: Any) -> int:
    """Tokens per segment when `model` reads a long text: `segment_len` if it has one
    (RMT, ARMT), else its `context_len` (the window it was trained on)."""
    value = getattr(model.config, "segment_len", None)
    return int(value or model.config.context_len)


def segment_alignment(model: Any) -> str:
    """Where the short segment goes when the length is not a multiple of the segment:
    the model's `segment_alignment` (RecurrentConfig), "left" for every other model."""
    return str(getattr(model.config, "segment_alignment", "left"))


def segment_bounds(length: int, segment_len: int, align: str = "left") -> list[tuple[int, int]]:
    """(start, end) of each segment of a `length`-token sequence.

    "left": cuts at L, 2L, ... (the last segment may be short); "right": the first segment
    is the short one, so the sequence ends on a full segment; "center": ceil(T/L) parts of
    equal size (torch.chunk's rule).
    """
    return list(iter_segment_bounds(length, segment_len, align))


def iter_segment_bounds(length: int, segment_len: int, align: str = "left"
                        ) -> Iterator[tuple[int, int]]:
    """`segment_bounds` one at a time (a stream of 50M tokens has millions of segments)."""
    if length <= 0:
        raise ValueError(f"cannot segment an empty sequence (length {length})")
    if align == "left":
        first, size = min(segment_len, length), segment_len
    elif align == "right":
        first, size = length % segment_len or segment_len, segment_len
    elif align == "center":
        size = math.ceil(length / math.ceil(length / segment_len))
        first = min(size, length)
    else:
        raise ValueError(f"unknown segment alignment {align!r} (left, right or center)")
    yield 0, first
    for a in range(first, length, size):
        yield a, min(a + size, length)


def cut(ids: torch.Tensor, segment_len: int, align: str = "left",
        targets: torch.Tensor | None = None) -> Iterator[Segment]:
    """The segments of `ids` [B, T] (and of `targets` [B, T] alongside) by one rule."""
    for a, b in iter_segment_bounds(ids.shape[1], segment_len, align):
        yield ids[:, a:b], None if targets is None else targets[:, a:b], a


# ----- the loop ----------------------------------------------------------------------------


def read_segments(
    model: Any,
    source: torch.Tensor | Iterable[Segment],
    state: Any = None,
    *,
    targets: torch.Tensor | None = None,
    segment_len: int | None = None,
    align: str | None = None,
    window: int | None = None,
    reset_memory: bool = False,
    detach: bool = True,
    context: Callable[[], AbstractContextManager] | None = None,
    **forward_kwargs: Any,
) -> Iterator[StreamStep]:
    """Feed `source` to `model` one segment at a time; yield a `StreamStep` per segment.

    source: ids [B, T] (cut by the model's rule: `segment_length`, `segment_alignment`;
        `segment_len` / `align` override it) or an iterable of already cut
        `(inputs, targets, start)` segments (a token stream).
    targets: [B, T] next-token targets for a tensor source (IGNORE_INDEX: not scored);
        with targets each step carries the per-token NLL and its sum.
    state: the memory to start from (stateful models; default: the initial state).
    window: stateless models only: the segment is read with up to `window - L_s` tokens
        of earlier context (default: the segment alone).
    context: a context-manager factory entered around every forward call (autocast).
    forward_kwargs: passed to every forward call (e.g. DNC's `nomem=True`).
    """
    stateful = bool(getattr(model, "is_stateful", False))
    if isinstance(source, torch.Tensor):
        if source.dim() != 2:
            raise DataError(f"read_segments takes ids of shape [B, T], got {tuple(source.shape)}")
        segments: Iterable[Segment] = cut(
            source, segment_len or segment_length(model), align or segment_alignment(model),
            targets)
    else:
        segments = source
    enter = context or nullcontext
    history: torch.Tensor | None = None  # stateless sliding window: earlier inputs
    fresh = state is None
    for index, (inputs, seg_targets, start) in enumerate(segments):
        b = inputs.shape[0]
        if stateful and (reset_memory or (fresh and index == 0)):
            forget = getattr(model, "forget_memory", None)  # keeps e.g. a sliding window
            state = (forget(state, b, inputs.device)
                     if reset_memory and forget is not None and state is not None
                     else model.init_state(b, inputs.device))
        with enter():
            if stateful:
                out = model(inputs, state=state, **forward_kwargs)
            else:
                seen = inputs
                if window is not None and window > inputs.shape[1]:
                    if history is not None:
                        seen = torch.cat([history, inputs], dim=1)[:, -window:]
                    history = seen[:, -(window - 1):]
                out = model(seen, **forward_kwargs)
                if seen.shape[1] > inputs.shape[1]:
                    out.logits = out.logits[:, -inputs.shape[1]:]
        if stateful:
            state = out.state
            if detach:
                state = _detach(model, state)
                out.state = state
        step = StreamStep(index, start, out)
        if seg_targets is not None:
            _score(step, seg_targets)
        yield step


def _detach(model: Any, state: Any) -> Any:
    detach = getattr(model, "detach_state", None)
    return detach(state) if detach is not None else tree_detach(state)


def _score(step: StreamStep, targets: torch.Tensor) -> None:
    step.targets = targets
    logits = step.output.logits
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                          targets.reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX,
                          reduction="none").view(targets.shape)
    step.token_nll = nll
    step.nll_sum = float(nll.detach().sum())
    step.n_scored = int((targets != IGNORE_INDEX).sum())


def read(model: Any, ids: torch.Tensor, state: Any = None, diagonal: bool = False,
         **kwargs: Any) -> ModelOutput:
    """All of `ids` [B, T] read segment by segment: the logits [B, T, V] and final state.

    The loss fields are left empty (score with `targets=` through `read_segments`, or
    with `lm_loss` on these logits); `aux_losses` hold the mean over segments.
    `diagonal=True` (ARMT on memlm's backbone, eval mode) pipelines the segments through
    the layers (memlm/models/armt_diagonal.py): the same logits, several segments per
    batched layer pass.
    """
    if diagonal:
        if not hasattr(model, "read_diagonal") or kwargs:
            raise DataError("diagonal=True reads an ARMT with its own segmentation and no "
                            "other options" + (f" (got {', '.join(kwargs)})" if kwargs else
                                              f"; {type(model).__name__} has no such reader"))
        return model.read_diagonal(ids, state)
    logits, aux, last = [], [], None
    for step in read_segments(model, ids, state, **kwargs):
        logits.append(step.output.logits)
        aux.append(getattr(step.output, "aux_losses", {}))  # stand-in models may return less
        last = step.output
    if last is None:
        raise DataError("nothing to read: the sequence is empty.")
    names = {k for a in aux for k in a}
    mean_aux = {k: torch.stack([a[k] for a in aux if k in a]).mean() for k in names}
    return ModelOutput(logits=logits[0] if len(logits) == 1 else torch.cat(logits, dim=1),
                       aux_losses=mean_aux, state=last.state,
                       metrics=getattr(last, "metrics", {}))


# ----- token streams -----------------------------------------------------------------------


def token_segments(tokens: Any, segment_len: int, batch_size: int = 1, align: str = "left",
                   max_tokens: int | None = None) -> Iterator[Segment]:
    """Cut a token stream into scored segments: inputs x[a:b], targets x[a+1:b+1].

    tokens: a 1-D array/tensor (memory-mapped arrays are sliced in place) or an iterable
    of 1-D id chunks (read lazily; only "left" alignment is possible without the length).
    Every token but the first is scored exactly once. `batch_size` > 1 splits a sized
    stream into that many contiguous rows (each row's memory starts fresh); the rows'
    last segment is padded (targets IGNORE_INDEX). `max_tokens` stops after that many
    input tokens per row.
    """
    if segment_len < 1:
        raise DataError(f"segment_len must be >= 1, got {segment_len}.")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().reshape(-1).numpy()
    sized = isinstance(tokens, np.ndarray)
    if not sized and batch_size > 1:
        raise DataError(
            "batch_size > 1 splits the stream into rows, which needs its length up front; "
            "stream a pre-tokenised .bin/.npy file or an id array, or use batch_size=1."
        )
    if not sized and align != "left":
        raise DataError(
            f"the model cuts segments {align}-aligned, which needs the stream's length up "
            "front; stream a pre-tokenised .bin/.npy file or an id array."
        )
    if sized:
        tokens = tokens.reshape(-1)
        n_targets = len(tokens) - 1
        if n_targets < 1:
            return
        row = math.ceil(n_targets / batch_size)
        for a, e in iter_segment_bounds(row, segment_len, align):
            if max_tokens is not None and a >= max_tokens:
                return
            yield _rows(tokens, a, e, row, batch_size, n_targets)
        return
    yield from _chunk_segments(tokens, segment_len, max_tokens)


def _rows(tokens: np.ndarray, a: int, e: int, row: int, batch_size: int, n_targets: int
          ) -> Segment:
    """Segment [a, e) of each of the `batch_size` rows of length `row` (padded at the end)."""
    if batch_size == 1:
        w = torch.from_numpy(np.asarray(tokens[a : e + 1], dtype=np.int64))[None]
        return w[:, :-1], w[:, 1:], a
    seg = e - a
    inputs = torch.zeros(batch_size, seg, dtype=torch.long)
    targets = torch.full((batch_size, seg), IGNORE_INDEX, dtype=torch.long)
    for r in range(batch_size):
        lo = r * row + a
        hi = min(lo + seg, r * row + row, n_targets)
        if hi > lo:
            win = torch.from_numpy(np.asarray(tokens[lo : hi + 1], dtype=np.int64))
            inputs[r, : hi - lo] = win[:-1]
            targets[r, : hi - lo] = win[1:]
    return inputs, targets, a


def _chunk_segments(chunks: Iterable[Any], segment_len: int, max_tokens: int | None
                    ) -> Iterator[Segment]:
    """Left-aligned segments of an iterator of id chunks (consecutive windows share a token)."""
    buf = np.zeros(0, dtype=np.int64)
    start = 0
    for chunk in chunks:
        buf = np.concatenate([buf, np.asarray(chunk, dtype=np.int64).reshape(-1)])
        pos = 0
        while len(buf) - pos >= segment_len + 1:
            if max_tokens is not None and start >= max_tokens:
                return
            w = torch.from_numpy(buf[pos : pos + segment_len + 1].copy())[None]
            yield w[:, :-1], w[:, 1:], start
            pos += segment_len
            start += segment_len
        buf = buf[pos:]
    if len(buf) >= 2 and (max_tokens is None or start < max_tokens):
        w = torch.from_numpy(buf.copy())[None]
        yield w[:, :-1], w[:, 1:], start


def stream(
    model: Any,
    tokens: Any,
    segment_len: int | None = None,
    batch_size: int = 1,
    state: Any = None,
    max_tokens: int | None = None,
    context: Callable[[], AbstractContextManager] | None = None,
) -> Iterator[StreamStep]:
    """Score a token stream of any length in constant memory: `read_segments` over
    `token_segments`, cut by the model's rule (see the module docstring), in eval mode
    under inference mode. Only the state and one segment are alive at any time."""
    segments = token_segments(tokens, segment_len or segment_length(model), batch_size,
                              segment_alignment(model), max_tokens)
    device = next(model.parameters()).device
    with evaluating(model):
        with torch.inference_mode():
            moved = ((x.to(device), y.to(device), start) for x, y, start in segments)
            yield from read_segments(model, moved, state, context=context)
