"""Batch sources: how a token stream becomes training batches.

Three layouts:

* `RandomWindows` (stateless models, nanoGPT style): each batch draws B random
  windows of T+1 tokens. The draw comes from a generator seeded by
  (seed, step), so the data order is a pure function of the seed and the step
  and resuming at step k reproduces exactly the batches an uninterrupted run
  would have seen.
* `StreamRows` (stateful models: DNC, RMT/ARMT, TMT anchors): the stream is cut
  into B contiguous rows and consecutive batches are consecutive segments of
  those rows, so the memory state carried from one batch to the next really is
  the memory of the preceding text (truncated BPTT). `Batch.new_stream` marks
  rows whose stream (re)starts, where the trainer re-initialises their state.
* `RandomEpisodes` (stateful models, the RMT paper's training regime): each
  episode is B random windows of K segments read from a fresh memory, K being
  the trainer's `bptt_window`, so every optimizer step back-propagates through a
  whole episode and the memory never has to survive text it was not trained on.
  Seeded by (seed, episode) like `RandomWindows`.

`RenameRows` wraps any of them whose batches are whole rows (the random layout, the
BABILong dataset) and renames entity tokens per row (`data.rename`).

All expose `state_dict()` / `load_state_dict()` for exact resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from memlm.errors import DataError
from memlm.types import IGNORE_INDEX


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64, IGNORE_INDEX where not scored
    new_stream: torch.Tensor | None = None  # [B] bool: reset this row's state first
    #: [B, T] bool, True on real tokens; None: every position is real. Only sources whose
    #: padded rows carry memory into the next batch set it (BABILong's `carry`), so that
    #: a stateful model's padding segments leave the carried memory unchanged
    attention_mask: torch.Tensor | None = None
    #: [B, P] tokens a stateful model reads without gradient before the row, starting from
    #: the memory the previous step's prefix left (reset where `new_stream`): BABILong's
    #: `prefix=K`, a long background stream before the row at the cost of forward passes
    prefix: torch.Tensor | None = None
    #: [B] bool, with `prefix`: rows that start from an empty memory instead of the
    #: prefix stream's (which goes on for the next step), so short prompts from an empty
    #: memory stay in training
    empty_rows: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device, non_blocking=True),
            self.targets.to(device, non_blocking=True),
            None if self.new_stream is None else self.new_stream.to(device),
            None if self.attention_mask is None else self.attention_mask.to(device),
            None if self.prefix is None else self.prefix.to(device),
            None if self.empty_rows is None else self.empty_rows.to(device),
        )

    @property
    def n_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


class BatchSource(Protocol):
    """What the trainer consumes. `stateful` means consecutive batches continue rows."""

    stateful: bool

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _as_array(tokens: np.ndarray | torch.Tensor) -> np.ndarray:
    return tokens.numpy() if isinstance(tokens, torch.Tensor) else tokens


def _windows(tokens: np.ndarray, starts, seq_len: int, new_stream: bool | None = None,
             scored: np.ndarray | None = None) -> Batch:
    """The batch of `seq_len`-token inputs (and next-token targets) starting at `starts`;
    `new_stream` (when not None) flags every row as starting, or continuing, a stream.
    `scored` (one bool per token of `tokens`) keeps only the targets it marks."""
    win = np.stack([tokens[a : a + seq_len + 1] for a in starts]).astype(np.int64)
    win = torch.from_numpy(win)
    new = None if new_stream is None else torch.full((len(starts),), new_stream, dtype=torch.bool)
    targets = win[:, 1:].contiguous()
    if scored is not None:
        keep = torch.from_numpy(np.stack([scored[a + 1 : a + seq_len + 1] for a in starts]))
        targets = targets.masked_fill(~keep, IGNORE_INDEX)
    return Batch(win[:, :-1].contiguous(), targets, new)


def _check_scored(tokens: np.ndarray, scored: np.ndarray | None) -> np.ndarray | None:
    if scored is not None and len(scored) != len(tokens):
        raise DataError(f"the scored-token mask has {len(scored)} entries for {len(tokens)} "
                        "tokens; build both from the same text.")
    return scored


class RandomWindows:
    """B random windows of `seq_len` (+1 for targets) per batch, seeded by (seed, step)."""

    stateful = False

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, scored: np.ndarray | None = None):
        self.tokens = _as_array(tokens)
        self.scored = _check_scored(self.tokens, scored)
        if len(self.tokens) < seq_len + 2:
            raise DataError(
                f"the token stream has {len(self.tokens)} tokens, fewer than one window of "
                f"{seq_len + 1}; give more text or lower data.seq_len / model.context_len."
            )
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.step = 0

    def next_batch(self) -> Batch:
        # one generator per (seed, step): batches do not depend on how many came before
        g = np.random.default_rng([self.seed, self.step])
        self.step += 1
        starts = g.integers(0, len(self.tokens) - self.seq_len - 1,
                            size=self.batch_size * self.world_size)
        starts = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _windows(self.tokens, starts, self.seq_len, scored=self.scored)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class RandomEpisodes:
    """B random windows of `segments * seq_len` (+1) tokens, served one segment per batch.

    The first segment of every episode is flagged `new_stream`, so a stateful model
    starts each episode from a fresh memory; with `segments` equal to the trainer's
    `bptt_window` one optimizer step reads exactly one episode.
    """

    stateful = True

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, segments: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 scored: np.ndarray | None = None):
        self.tokens = _as_array(tokens)
        self.scored = _check_scored(self.tokens, scored)
        if segments < 1:
            raise DataError(f"an episode needs at least one segment, got {segments}.")
        self.span = segments * seq_len + 1  # tokens of one episode, targets included
        if len(self.tokens) < self.span + 1:
            raise DataError(
                f"the token stream has {len(self.tokens)} tokens, fewer than one episode of "
                f"{segments} segments x {seq_len} tokens; give more text or lower "
                "train.bptt_window / data.seq_len."
            )
        self.batch_size, self.seq_len, self.segments, self.seed = batch_size, seq_len, segments, seed
        self.rank, self.world_size = rank, world_size
        self.episode, self.segment = 0, 0
        self._draw()

    def _draw(self) -> None:
        g = np.random.default_rng([self.seed, self.episode])
        starts = g.integers(0, len(self.tokens) - self.span,
                            size=self.batch_size * self.world_size)
        self.starts = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def next_batch(self) -> Batch:
        if self.segment >= self.segments:
            self.episode += 1
            self.segment = 0
            self._draw()
        batch = _windows(self.tokens, self.starts + self.segment * self.seq_len, self.seq_len,
                         new_stream=self.segment == 0, scored=self.scored)
        self.segment += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"episode": self.episode, "segment": self.segment}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.episode, self.segment = int(state["episode"]), int(state["segment"])
        self._draw()


class StreamRows:
    """Contiguous rows of one stream; batch k holds segment k of every row.

    The stream is split into `batch_size * world_size` rows of equal length (the
    remainder is dropped); a rank reads its own rows. When the rows run out, the
    next epoch starts at a seeded random offset (so segments do not always cut
    at the same tokens) and every row is flagged `new_stream`.
    """

    stateful = True

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, scored: np.ndarray | None = None):
        self.tokens = _as_array(tokens)
        self.scored = _check_scored(self.tokens, scored)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        n_rows = batch_size * world_size
        if len(self.tokens) // n_rows < seq_len + 1:
            raise DataError(
                f"{len(self.tokens)} tokens cannot fill {n_rows} stream rows of one "
                f"{seq_len + 1}-token segment each; give more text or lower batch_size/seq_len."
            )
        self.epoch, self.segment = 0, 0
        self._layout()

    def _layout(self) -> None:
        n_rows = self.batch_size * self.world_size
        offset = 0
        if self.epoch > 0:
            offset = int(np.random.default_rng([self.seed, self.epoch]).integers(0, self.seq_len))
        usable = len(self.tokens) - offset
        self.row_len = usable // n_rows
        self.offset = offset
        self.n_segments = (self.row_len - 1) // self.seq_len

    def next_batch(self) -> Batch:
        if self.segment >= self.n_segments:
            self.epoch += 1
            self.segment = 0
            self._layout()
        rows = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        starts = [self.offset + r * self.row_len + self.segment * self.seq_len for r in rows]
        batch = _windows(self.tokens, starts, self.seq_len, new_stream=self.segment == 0,
                         scored=self.scored)
        self.segment += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "segment": self.segment}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self._layout()
        self.segment = int(state["segment"])


def rename_table(groups: list[np.ndarray], vocab_size: int, rows: int,
                 rng: np.random.Generator) -> torch.Tensor:
    """[rows, vocab_size] id maps: the identity, with each group of ids permuted per row
    (`torch.gather(table, 1, ids)` renames a batch)."""
    table = np.tile(np.arange(vocab_size, dtype=np.int64), (rows, 1))
    for ids in groups:
        ids = np.asarray(ids, dtype=np.int64)
        table[:, ids] = ids[np.argsort(rng.random((rows, len(ids))), axis=1)]
    return torch.from_numpy(table)


class RenameRows:
    """Another source's batches with each row's entity tokens permuted (`data.rename`).

    `groups` are id classes (persons, rooms): within each, every row draws its own
    permutation, seeded by (seed, rank, step), and applies it to inputs and targets alike,
    so every fact and answer stays consistent under the new names. A 2-layer model given
    the 1,900 bAbI qa1 stories as they are memorises them before it learns to look an
    answer up; renamed, a story is never seen twice. Rows must be whole samples: a
    stateful layout that continues a row over several batches would rename it mid-story.
    """

    def __init__(self, source: BatchSource, groups: list[np.ndarray], vocab_size: int,
                 seed: int = 0, rank: int = 0):
        if getattr(source, "stateful", False):
            raise DataError("data.rename needs batches of whole rows (data.layout: random, "
                            "or a babilong: source); a stream layout would rename mid-row.")
        self.source, self.stateful = source, False
        self.groups = [np.asarray(g, dtype=np.int64) for g in groups]
        self.vocab_size, self.seed, self.rank = vocab_size, seed, rank
        self.step = 0

    def table(self, rows: int, step: int) -> torch.Tensor:
        """[rows, vocab] id maps of `step` (`rename_table`)."""
        rng = np.random.default_rng([self.seed, self.rank, step, 0x4E4D])
        return rename_table(self.groups, self.vocab_size, rows, rng)

    def next_batch(self) -> Batch:
        batch = self.source.next_batch()
        table = self.table(batch.input_ids.shape[0], self.step)
        self.step += 1
        inputs = torch.gather(table, 1, batch.input_ids)
        scored = batch.targets != IGNORE_INDEX
        targets = torch.gather(table, 1, batch.targets.clamp(min=0))
        return Batch(inputs, torch.where(scored, targets, batch.targets), batch.new_stream,
                     batch.attention_mask,
                     None if batch.prefix is None else torch.gather(table, 1, batch.prefix),
                     batch.empty_rows)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "source": self.source.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.source.load_state_dict(state["source"])
