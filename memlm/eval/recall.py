"""Long-range recall accuracy on the built-in recall corpus, bucketed by distance.

A recalled answer ("what is the code of mia? 4821.") counts as correct when the
model's greedy next-token prediction is right for every token of the answer,
teacher-forced on the true text. Stateful models read the text as one stream per
row (segments of their window with the memory state carried). Stateless models
read, for each answer, the full window that ends at it, so an answer whose fact
lies within the window distance has the fact in view. An answer whose fact lies
further back than the window can only be right through memory (or by chance:
1 in 9 x 10^(digits-1), values have no leading zero).

Scoring is batched: `recall_eval` reads several independent streams (see
`make_recall_streams`) as the rows of one batch, so a stateful model's segment loop
runs once for all of them, and a stateless model's answer windows go through in
batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from memlm.models.streaming import read, read_segments
from memlm.nn.precision import autocast_context
from memlm.types import evaluating

#: distance buckets in multiples of the window: (label, low, high], low exclusive
BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("<=1w", 0.0, 1.0),
    ("1-2w", 1.0, 2.0),
    ("2-4w", 2.0, 4.0),
    (">4w", 4.0, math.inf),
)


@torch.no_grad()
def greedy_predictions_batch(model, ids: np.ndarray | torch.Tensor, seq_len: int | None = None,
                             precision: str = "auto") -> np.ndarray:
    """argmax prediction for the token after each position 0..n-2 of every row of `ids` [B, n].

    Rows are independent streams: a stateful model carries one memory per row.
    """
    device = next(model.parameters()).device
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    if ids_t.dim() != 2 or ids_t.shape[1] < 2:
        raise ValueError(f"expected ids of shape [rows, n >= 2], got {tuple(ids_t.shape)}")
    rows, n = ids_t.shape
    seq_len = seq_len or model.config.context_len
    preds = np.zeros((rows, n - 1), dtype=np.int64)
    with evaluating(model):
        # stateful: segments of seq_len, memory carried; stateless: chunks of half a
        # window, each read with the window that ends at the chunk
        stateful = getattr(model, "is_stateful", False)
        for step in read_segments(
            model, ids_t[:, : n - 1].to(device),
            segment_len=seq_len if stateful else max(seq_len // 2, 1),
            window=None if stateful else seq_len,
            context=lambda: autocast_context(device, precision),
        ):
            hi = step.start + step.output.logits.shape[1]
            preds[:, step.start : hi] = step.output.logits.argmax(-1).cpu().numpy()
    return preds


def greedy_predictions(model, ids: list[int] | np.ndarray, seq_len: int | None = None,
                       precision: str = "auto") -> np.ndarray:
    """argmax prediction for the token after each position 0..n-2 of one stream `ids`."""
    return greedy_predictions_batch(model, np.asarray(ids)[None], seq_len, precision)[0]


def bucket_of(token_gap: int, window: int) -> str:
    """The distance bucket label of a fact `token_gap` tokens before its answer."""
    ratio = token_gap / window
    for label, low, high in BUCKETS:
        if low < ratio <= high:
            return label
    return BUCKETS[0][0]  # a gap of 0 (cannot happen for real text) counts as near


def _count(counts: dict[str, list[int]], token_gap: int, ok: bool, window: int) -> None:
    for key in ("near" if token_gap <= window else "far", bucket_of(token_gap, window)):
        counts[key][0] += int(ok)
        counts[key][1] += 1


def _new_counts() -> dict[str, list[int]]:
    return {k: [0, 0] for k in ["near", "far", *[b[0] for b in BUCKETS]]}


def score_answers(preds: np.ndarray, ids: np.ndarray, token_spans, window: int
                  ) -> dict[str, list[int]]:
    """Exact-answer counts of one stream's predictions, near/far and per distance bucket.

    Returns `{name: [correct, total]}` for near, far and every bucket label (counts, so
    several streams can be pooled).
    """
    counts = _new_counts()
    for ts in token_spans:
        lo = max(ts.start, 1)
        if ts.end - 1 > len(preds):  # answer cut off by the stream's end
            continue
        ok = bool(np.all(preds[lo - 1 : ts.end - 1] == ids[lo : ts.end]))
        _count(counts, ts.token_gap, ok, window)
    return counts


def _read_fresh(model, x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Logits of `x` [B, L]: one call for a stateless model; for a stateful one, segments
    of `seq_len` from a fresh memory, cut by the model's own alignment (the cuts of one
    `model(x)` call, and of training)."""
    if not getattr(model, "is_stateful", False):
        return model(x).logits
    return read(model, x, segment_len=seq_len).logits


@torch.no_grad()
def _answers_in_windows(model, ids: np.ndarray, token_spans: Sequence[Sequence], seq_len: int,
                        precision: str, batch_size: int = 128, segments: int = 1
                        ) -> list[list[bool]]:
    """Correctness of each answer, reading one full window (episode) per answer.

    The window ends at the answer's last predicting position, so every answer token sees
    at least `seq_len - len(answer)` tokens of context: a fact inside the window distance
    really is inside the model's view. With `segments` > 1 a stateful model reads the
    `segments * seq_len` tokens before the answer as segments from a fresh memory (the
    episode it was trained on). Windows of equal length are batched.
    """
    device = next(model.parameters()).device
    span = seq_len * segments
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for row, spans in enumerate(token_spans):
        for k, ts in enumerate(spans):
            end = ts.end - 1  # inputs [start, end) predict tokens start+1 .. ts.end-1
            groups.setdefault(min(end, span), []).append((row, k, end))
    result = [[False] * len(spans) for spans in token_spans]
    with evaluating(model):
        for length, items in groups.items():
            for i in range(0, len(items), batch_size):
                chunk = items[i : i + batch_size]
                x = torch.as_tensor(np.stack([ids[r, e - length : e] for r, _, e in chunk]))
                with autocast_context(device, precision):
                    pred = _read_fresh(model, x.to(device), seq_len).argmax(-1).cpu().numpy()
                for j, (r, k, e) in enumerate(chunk):
                    ts = token_spans[r][k]
                    lo = max(ts.start, 1)
                    # prediction of token t sits at input position t - 1 - (e - length)
                    got = pred[j, lo - 1 - (e - length) : ts.end - 1 - (e - length)]
                    result[r][k] = bool(np.all(got == ids[r, lo : ts.end]))
    return result


def _summarise(counts: dict[str, list[int]]) -> dict[str, Any]:
    def acc(key: str) -> float:
        right, total = counts[key]
        return right / total if total else float("nan")

    return {
        "recall_near": acc("near"),
        "recall_far": acc("far"),
        "n_near": counts["near"][1],
        "n_far": counts["far"][1],
        "buckets": {label: {"accuracy": acc(label), "n": counts[label][1]}
                    for label, _, _ in BUCKETS},
    }


def recall_accuracy(model, tokenizer, text: str, spans, window: int | None = None,
                    precision: str = "auto") -> dict[str, Any]:
    """Exact-answer accuracy for recalls within and beyond the model's window (in tokens)."""
    from memlm.data.synthetic import spans_to_tokens

    ids, token_spans = spans_to_tokens(text, spans, tokenizer)
    window = window or model.config.context_len
    return recall_eval(model, np.asarray(ids)[None], [token_spans], window, precision=precision)


def make_recall_streams(tokenizer, n_streams: int, n_chars: int, seed: int,
                        **options: Any) -> tuple[np.ndarray, list[list]]:
    """`n_streams` independent recall texts, tokenised and cut to one common length.

    `options` go to `recall_stream` (gap_range, near_range, near_fraction, max_open,
    n_keys, digits, ...). Returns ``(ids [n_streams, n], token_spans per stream)``.
    """
    from memlm.data.synthetic import recall_stream, spans_to_tokens

    all_ids, all_spans = [], []
    for i in range(n_streams):
        text, spans = recall_stream(n_chars, seed=seed + i, **options)
        ids, token_spans = spans_to_tokens(text, spans, tokenizer)
        all_ids.append(ids)
        all_spans.append(token_spans)
    n = min(len(x) for x in all_ids)
    ids = np.stack([np.asarray(x[:n], dtype=np.int64) for x in all_ids])
    return ids, [[s for s in spans if s.end <= n] for spans in all_spans]


def recall_eval(model, ids: np.ndarray, token_spans: Sequence[Sequence], window: int,
                seq_len: int | None = None, precision: str = "auto",
                episode_segments: int | None = None) -> dict[str, Any]:
    """Exact-answer recall over the rows of `ids` (see `make_recall_streams`).

    Stateful models read the rows as one batch of streams, memory carried segment by
    segment, or, with `episode_segments` = K, read for each answer the K segments
    ending at it from a fresh memory (for models trained on `data.layout: episodes`);
    stateless models read one full window ending at each answer. Returns
    recall_near / recall_far (split at `window` tokens), n_near / n_far and `buckets`
    {label: {accuracy, n}} for the distance buckets in BUCKETS.
    """
    seq_len = seq_len or model.config.context_len
    counts = _new_counts()
    stateful = getattr(model, "is_stateful", False)
    if stateful and not episode_segments:
        preds = greedy_predictions_batch(model, ids, seq_len, precision)
        for row, spans in enumerate(token_spans):
            for key, (right, n) in score_answers(preds[row], ids[row], spans, window).items():
                counts[key][0] += right
                counts[key][1] += n
    else:
        oks = _answers_in_windows(model, ids, token_spans, seq_len, precision,
                                  segments=episode_segments if stateful else 1)
        for spans, row_ok in zip(token_spans, oks):
            for ts, ok in zip(spans, row_ok):
                _count(counts, ts.token_gap, ok, window)
    return _summarise(counts)


__all__ = ["BUCKETS", "bucket_of", "greedy_predictions", "greedy_predictions_batch",
           "make_recall_streams", "recall_accuracy", "recall_eval"]
