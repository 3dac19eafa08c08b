"""`memlm diagnose`: recall accuracy versus difficulty on generated tasks.

Tasks come from `memlm.data.synthetic` (MQAR, needle, copy). For each setting
(number of pairs x distance for MQAR, haystack length x depth for the needle,
length x delay for copy) fresh samples are generated and the model's greedy
predictions at the scored positions are compared with the answers; a sample
counts when every scored token is right. Samples longer than the model's window
are read the way the model can read them (stateful models carry memory across
segments; stateless ones see a sliding window), so a dense model's accuracy
falls to chance once the distance exceeds its window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from memlm.errors import unknown_name
from memlm.eval.recall import greedy_predictions
from memlm.specs import parse_counts
from memlm.types import IGNORE_INDEX


def parse_sizes(text: str | Sequence[int]) -> list[int]:
    """'8,32,1k' -> [8, 32, 1000] (memlm.specs.parse_counts)."""
    return parse_counts(text)


def _generator(task: str, vocab: int) -> tuple[Callable[..., Any], str, str]:
    from memlm.data import synthetic

    if task == "mqar":
        return (lambda a, b, n, s: synthetic.mqar(a, b, vocab, n, s), "pairs", "distance")
    if task == "needle":
        return (lambda a, b, n, s: synthetic.needle(a, b / 100, n, vocab, s), "haystack",
                "depth%")
    if task == "copy":
        return (lambda a, b, n, s: synthetic.copy_task(a, n, vocab, s, b), "length", "delay")
    raise unknown_name("diagnostic task", task, ["mqar", "needle", "copy"])


@torch.no_grad()
def sample_accuracy(model, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(fraction of samples fully right, fraction of scored tokens right)."""
    full, tok_ok, tok_n = 0, 0, 0
    for x, y in zip(inputs, targets):
        ids = x.tolist()
        preds = greedy_predictions(model, ids + [0])[: len(ids)]
        mask = (y != IGNORE_INDEX).numpy()
        right = preds[mask] == y.numpy()[mask]
        full += int(right.all())
        tok_ok += int(right.sum())
        tok_n += int(mask.sum())
    return full / max(len(inputs), 1), tok_ok / max(tok_n, 1)


def diagnose(model, task: str, first: Sequence[int], second: Sequence[int],
             n_samples: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """Accuracy table over the grid first x second (see `_generator` for the axes)."""
    gen, a_name, b_name = _generator(task, model.config.vocab_size)
    rows = []
    for a in first:
        for b in second:
            x, y = gen(a, b, n_samples, seed)
            acc, tok_acc = sample_accuracy(model, x, y)
            rows.append({a_name: a, b_name: b, "length": int(x.shape[1]),
                         "accuracy": acc, "token_accuracy": tok_acc,
                         "beyond_window": bool(x.shape[1] > model.config.context_len)})
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cells = [[f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def chance_level(task: str, vocab: int) -> float:
    """Per-token accuracy of guessing (for reading the table)."""
    return {"mqar": 1 / max((vocab - 1) - (vocab - 1) // 2, 1)}.get(task, 1 / max(vocab - 3, 1))

