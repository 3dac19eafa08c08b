"""The sliding-window LM objective of the original RMT/ARMT wikitext and PG19 scripts.

The originals (`run_finetuning_lm_rmt.py --sliding_window`, `group_texts`) cut the token
stream into samples of `input_seq_len` tokens that start every `block_size` tokens: each
sample is `history_size = input_seq_len - block_size` tokens already seen by the previous
sample plus one new block, every sample is read from a fresh memory, and every token of
the sample is scored. `data.layout: sliding` serves the same samples:

* a window of `seq_len` tokens (data.seq_len, else model.context_len) starting at a
  multiple of `data.stride` (default: the model's segment_len, the originals' block),
  one fresh memory per window (`new_stream` on every row);
* `data.sliding_score: all` scores every token (the originals' training loss); `new`
  scores only the last `stride` tokens, the block no earlier window ended with.

What differs from the originals is written up in docs/finetune.md: windows are drawn at
random with replacement (seeded by step, so resume is exact) rather than shuffled once per
epoch, and the backbone gets no banded attention mask (memlm's segments already bound
what a token attends to: its own segment and the memory).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from memlm.data.batches import Batch, _as_array, _windows
from memlm.errors import DataError
from memlm.types import IGNORE_INDEX


class SlidingWindows:
    """B windows per batch at random multiples of `stride`, each from a fresh memory."""

    stateful = False  # no row continues into the next batch

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, stride: int,
                 score: str = "all", seed: int = 0, rank: int = 0, world_size: int = 1):
        self.tokens = _as_array(tokens)
        if not 1 <= stride <= seq_len:
            raise DataError(f"data.stride must be between 1 and the window ({seq_len} tokens), "
                            f"got {stride}.")
        if score not in ("all", "new"):
            raise DataError(f"data.sliding_score must be all or new, got {score!r}.")
        self.n_windows = (len(self.tokens) - seq_len - 1) // stride + 1
        if len(self.tokens) < seq_len + 1 or self.n_windows < 1:
            raise DataError(
                f"the token stream has {len(self.tokens)} tokens, fewer than one window of "
                f"{seq_len + 1}; give more text or lower data.seq_len / model.context_len.")
        self.batch_size, self.seq_len, self.stride, self.score = batch_size, seq_len, stride, score
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0

    def next_batch(self) -> Batch:
        g = np.random.default_rng([self.seed, self.step])  # batches depend only on the step
        self.step += 1
        picks = g.integers(0, self.n_windows, size=self.batch_size * self.world_size)
        picks = picks[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        batch = _windows(self.tokens, picks * self.stride, self.seq_len, new_stream=True)
        if self.score == "new":
            batch.targets[:, : self.seq_len - self.stride] = IGNORE_INDEX
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
