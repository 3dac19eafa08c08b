"""Constant-memory streaming over token files of any length, and its report.

    for step in stream(model, "book.txt", 512, tokenizer=tok):   # or model.stream(ids)
        step.output.logits, step.nll_sum, step.n_scored, step.state
    report = stream_file(model, tokenizer, "book.txt", segment_len=512)

The segment loop itself is memlm's one loop (`memlm.models.streaming`): segment s covers
inputs x[a : b] and targets x[a+1 : b+1] (one token of look-ahead across the boundary),
so every token except the first is scored exactly once; the cuts follow the model's own
rule. A stateful model (RMT, ARMT, DNC, ...) carries its memory from each segment to the
next; a stateless model sees every segment on its own, which is the baseline the memory
has to beat. This module adds what a file needs: lazy token sources and the cost report.

Only the state, one segment's activations and scalar running sums are alive at any time:
per-segment logits are never kept, so memory stays flat however long the stream is.
Token sources are read lazily:

* a text file is read in chunks cut only right after a newline that sits between two
  non-space characters ("x\ny") or is followed by one space and a non-space ("\n y");
  for byte-level tokenizers and GPT-2's BPE this gives exactly the ids of tokenising the
  whole file at once, because GPT-2's pre-tokeniser ends a token at such a newline in
  both cases (a cut after "\n\n" would not be safe: the whole text splits " \n\n" as
  " \n" + "\n" before a letter, a chunk ending there keeps it whole);
* a pre-tokenised ``.bin`` file (uint16, or uint32 when the vocabulary needs it) or a
  ``.npy`` array is memory-mapped;
* an in-memory 1-D array/tensor or any iterable of id chunks works too.
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memlm.data.sources import open_tokens
from memlm.errors import DataError
from memlm.models import streaming
from memlm.models.streaming import StreamStep

# ----- the loop ----------------------------------------------------------------------------


def stream(
    model: Any,
    source: Any,
    segment_len: int,
    batch_size: int = 1,
    state: Any = None,
    tokenizer: Any = None,
    precision: str = "fp32",
    max_tokens: int | None = None,
) -> Iterator[StreamStep]:
    """Feed `source` (a file, id array or chunk iterator) to `model` segment by segment.

    `memlm.models.streaming.stream` on the opened tokens: works for any memlm model,
    stateful ones carry their state. The model runs in eval mode under inference mode
    (and bf16 autocast with precision="bf16"; memory states stay float32). `max_tokens`
    stops after that many input tokens per row. Errors in the arguments raise at once.
    """
    if segment_len < 1:
        raise DataError(f"segment_len must be >= 1, got {segment_len}.")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    device = next(model.parameters()).device

    def autocast():
        return (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else torch.autocast(device.type, enabled=False))

    return streaming.stream(model, open_tokens(source, tokenizer), segment_len, batch_size,
                            state, max_tokens, context=autocast)


# ----- the report --------------------------------------------------------------------------


def bucket_name(segment_number: int) -> str:
    """Bucket of a 1-based segment number: 1, 2-4, 5-16, 17-64, ... (powers of 4)."""
    if segment_number <= 1:
        return "1"
    hi = 4
    while segment_number > hi:
        hi *= 4
    return f"{hi // 4 + 1}-{hi}"


def current_rss_bytes() -> int:
    """Current resident set size of this process (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def stream_file(
    model: Any,
    tokenizer: Any,
    path_or_ids: Any,
    segment_len: int,
    batch_size: int = 1,
    progress: bool = True,
    precision: str = "fp32",
    max_tokens: int | None = None,
    log_path: str | Path | None = None,
) -> dict[str, Any]:
    """Stream a whole file (or id array) through `model` and report what it cost.

    Returns loss and ppl over every scored token (token mean, float64 sums), `ppl_seg`
    (per 1-based segment-number bucket: 1, 2-4, 5-16, ...; the buckets' `nll_seg` sums add
    up to the total), tokens/s, the peak resident memory sampled after every segment
    (`peak_rss_bytes`), the process's lifetime peak (`max_rss_bytes`) and, on CUDA, the
    peak allocated bytes. `log_path` appends one JSON line per segment.
    """
    import json

    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = open_tokens(path_or_ids, tokenizer)
    total = len(tokens) if isinstance(tokens, np.ndarray) else None
    if total is not None and max_tokens is not None:
        total = min(total, max_tokens * batch_size)
    nll_sum, n_scored, n_seg = 0.0, 0, 0
    buckets: dict[str, list[float]] = {}
    log = open(log_path, "a") if log_path else None  # noqa: SIM115 - closed below
    bar = tqdm(total=total, unit="tok", disable=not progress, unit_scale=True)
    peak_rss = current_rss_bytes()
    t0 = time.perf_counter()
    try:
        for step in stream(model, tokens, segment_len, batch_size, tokenizer=tokenizer,
                           precision=precision, max_tokens=max_tokens):
            nll_sum += step.nll_sum
            n_scored += step.n_scored
            n_seg += 1
            b = buckets.setdefault(bucket_name(step.index + 1), [0.0, 0])
            b[0] += step.nll_sum
            b[1] += step.n_scored
            peak_rss = max(peak_rss, current_rss_bytes())
            bar.update(step.output.logits.shape[0] * step.output.logits.shape[1])
            if log is not None:
                log.write(json.dumps({"segment": step.index, "nll_sum": step.nll_sum,
                                      "n_scored": step.n_scored}) + "\n")
            del step
    finally:
        bar.close()
        if log is not None:
            log.close()
    wall = time.perf_counter() - t0
    if n_scored == 0:
        raise DataError("the stream held fewer than 2 tokens; nothing was scored.")
    loss = nll_sum / n_scored
    report: dict[str, Any] = {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bits_per_token": loss / math.log(2),
        "n_scored": n_scored,
        "n_segments": n_seg,
        "segment_len": segment_len,
        "batch_size": batch_size,
        "ppl_seg": {k: math.exp(min(v[0] / v[1], 700.0)) for k, v in buckets.items() if v[1]},
        "nll_seg": {k: v[0] for k, v in buckets.items()},
        "count_seg": {k: int(v[1]) for k, v in buckets.items()},
        "tokens_per_s": n_scored / wall if wall > 0 else float("inf"),
        "wall_s": wall,
        "peak_rss_bytes": peak_rss,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if device.type == "cuda":
        report["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return report
