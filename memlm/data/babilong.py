"""BABILong samples: bAbI facts hidden at random places in long background text.

A sample takes one bAbI question, the facts of its story, and a context budget
of exactly C tokens (in the tokens of the model under test). Background
sentences fill the budget, the facts go into uniformly random sentence gaps in
their original order, and the question, an answer marker and the answer
follow:

    context (C tokens: facts + background) | " Where is Mary?" | "GEN" | " bathroom" | eos

Design choices (they fix problems of the reference builder, see
docs/babilong.md#how-memlm-differs-from-the-reference-and-why):

* Every random draw of a sample comes from its own generator keyed by
  (seed, split, task, C, [epoch,] sample index), so a sample is the same when
  built alone, in a batch, in another order or in another process.
* Backgrounds are pre-split and pre-tokenised into a sentence pool once (and
  cached on disk when a cache folder is given); a sample starts at a random
  *sentence*, never mid-sentence, and the last sentence is cut so the context
  has exactly C tokens.
* Train samples come from bAbI train files and train background; evaluation
  samples from test files and held-out background; nothing is shared.
* With no corpus, a generated filler free of bAbI words is the background.

The training `BatchSource` registered as dataset "babilong" turns this into
batches whose only scored targets are the answer tokens and the final eos.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memlm.data.babi import (
    MARKER,
    VAL_FRACTION,
    BabiSample,
    normalize_task,
    questions,
    task_code,
)
from memlm.data.background import (
    Background,
    FillerPool,
    Pool,
    SentencePool,
    corpus_sentences,
    load_background,
    split_sentences,
)
from memlm.data.batches import Batch
from memlm.errors import ConfigError, DataError
from memlm.registry import DATASETS
from memlm.specs import length_name, parse_length, parse_lengths, parse_options
from memlm.types import IGNORE_INDEX

PROMPT_RESERVE = 300  # named length X gives context budget C = X - 300 (0 means facts only)
QA_MARGIN = 20  # training sample of seq_len tokens gets C = seq_len - margin
#: a dense model's window keeps this many positions free for the answer and eos (the
#: evaluator generates at most 10 tokens), so its view ends where the prompt ends
ANSWER_RESERVE = 10
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


# ----------------------------------------------------------------------------------------
# lengths


def context_budget(length: int) -> int:
    """Context tokens C of a named evaluation length X: X - 300, or 0 (facts only) at 0k."""
    if length == 0:
        return 0
    if length <= PROMPT_RESERVE:
        raise ConfigError(f"length {length} leaves no context after the {PROMPT_RESERVE}-token "
                          "prompt reserve; use 0 (facts only) or a length above 300.")
    return length - PROMPT_RESERVE


# ----------------------------------------------------------------------------------------
# the protocol: where segments start


def prompt_segments(C: int, prompt_len: int, segment_len: int) -> list[tuple[int, int]]:
    """Segment bounds of a BABILong prompt for a segment-recurrent model.

    memlm's one protocol for training and evaluation: **the question starts a
    segment**. The context [0, C) is cut into segments of `segment_len` that *end*
    at C (only the first one may be shorter), and the final segment is
    [C, prompt_len): question, answer marker, then whatever is generated. In
    training a sample of n segments has C = (n - 1) * segment_len, so the same
    cut falls at the same place, and every fact lies outside the final segment:
    only memory can carry it to the question.
    """
    if not 0 <= C < prompt_len:
        raise DataError(f"a prompt of {prompt_len} tokens cannot have {C} context tokens")
    if prompt_len - C > segment_len:
        raise DataError(f"the question and marker take {prompt_len - C} tokens, more than one "
                        f"segment of {segment_len}")
    bounds = [(max(0, end - segment_len), end) for end in range(C, 0, -segment_len)][::-1]
    return bounds + [(C, prompt_len)]


def dense_view(prompt_len: int, window: int, answer_reserve: int = ANSWER_RESERVE) -> int:
    """First prompt position a dense model with `window` positions sees: the last
    `window - answer_reserve` prompt tokens, as in training (`FinetuneBatch.to_batch`)."""
    if window <= answer_reserve:
        raise ConfigError(f"a dense window of {window} tokens leaves no room for the prompt "
                          f"after the {answer_reserve}-token answer reserve")
    return max(0, prompt_len - (window - answer_reserve))


# ----------------------------------------------------------------------------------------
# the insertion algorithm


@dataclass
class Context:
    ids: np.ndarray  # int32, exactly the budget C tokens
    fact_offsets: list[int]  # token offset of each fact in `ids`
    background_start: int | None  # pool index of the first background sentence
    n_background: int  # M, background sentences (the last may be truncated)
    background_wraps: int


def draw_background(pool: Pool, budget: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, int | None, int]:
    """Consecutive pool sentences from a random start, cut to exactly `budget` tokens.

    Returns (tokens, sentence starts within tokens, first pool index, wraps).
    Reaching the end of a finite pool continues from a fresh random start and
    counts one wrap. A finite pool is sliced, not walked, so a million-token
    background costs a few array operations.
    """
    if budget == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int64), None, 0
    first = j = pool.random_start(rng)
    if isinstance(pool, FillerPool):
        pieces, total = [], 0
        while total < budget:
            pieces.append(pool.sentence(j))
            total += len(pieces[-1])
            j += 1
        starts = np.cumsum([0] + [len(x) for x in pieces[:-1]])
        return np.concatenate(pieces)[:budget], starts.astype(np.int64), first, 0
    chunks, starts, wraps, filled = [], [], 0, 0
    off = pool.offsets
    while filled < budget:
        if j >= pool.n:
            j = pool.random_start(rng)
            wraps += 1
        need = budget - filled
        end = min(int(off[j]) + need, int(off[-1]))
        k = int(np.searchsorted(off, end, side="left"))  # sentences j..k-1 are (partly) used
        chunks.append(pool.tokens[off[j]:end])
        starts.append(off[j:k] - off[j] + filled)
        filled += end - int(off[j])
        j = k
    return (np.concatenate(chunks), np.concatenate(starts).astype(np.int64), first, wraps)


def build_context(facts: Sequence[np.ndarray], budget: int, pool: Pool,
                  rng: np.random.Generator,
                  placement: tuple[float, float] | None = None) -> Context:
    """Hide `facts` (token arrays, in order) in `budget` tokens of background.

    The background is drawn first, then each fact takes one of the M+1 sentence
    gaps uniformly (with replacement, sorted, so their order is kept); facts
    sharing a gap keep their order too. With `placement=(p0, p1)` only gaps
    whose background offset lies in [p0*C, p1*C - facts) are allowed.
    """
    fact_total = sum(len(f) for f in facts)
    b = budget - fact_total
    if b < 0:
        raise DataError(f"the facts take {fact_total} tokens, more than the budget {budget}")
    background, starts, first, wraps = draw_background(pool, b, rng)
    m = len(starts)
    if placement is None:
        gaps = np.sort(rng.integers(0, m + 1, size=len(facts)))
    else:
        lo = int(np.floor(placement[0] * budget))
        hi = int(np.floor(placement[1] * budget)) - fact_total
        allowed = np.flatnonzero((starts >= lo) & (starts < hi))
        if len(allowed) == 0:
            raise DataError(f"no sentence gap lies in the placement window {placement} of a "
                            f"{budget}-token context; widen task_start_pct/task_end_pct.")
        gaps = np.sort(allowed[rng.integers(0, len(allowed), size=len(facts))])
    # gap i sits before background sentence i (0-based), gap M after the last one
    cuts = np.array([starts[g] if g < m else b for g in gaps.tolist()], dtype=np.int64)
    pieces: list[np.ndarray] = []
    prev = 0
    for fact, cut in zip(facts, cuts.tolist()):
        pieces += [background[prev:cut], fact]
        prev = cut
    pieces.append(background[prev:])
    ids = np.concatenate(pieces).astype(np.int32)
    # a fact's offset: its background cut plus the tokens of the facts before it
    before = np.cumsum([0] + [len(f) for f in facts])[:-1]
    fact_offsets = (cuts + before).astype(int).tolist()
    assert len(ids) == budget
    return Context(ids, fact_offsets, first, m, wraps)


# ----------------------------------------------------------------------------------------
# samples


@dataclass
class BabilongSample:
    """One built sample (fine-tune protocol)."""

    task: str
    split: str
    C: int
    babi: BabiSample
    context: np.ndarray  # int32 [C]
    question_ids: np.ndarray
    marker_ids: np.ndarray
    answer_ids: np.ndarray
    fact_offsets: list[int]
    support_offsets: list[int]
    background_wraps: int
    length: int | None = None  # the named length X (evaluation)

    @property
    def support_depth(self) -> float:
        """Relative position of the deepest supporting fact (0 for facts-only samples)."""
        if self.length == 0 or not self.C or not self.support_offsets:
            return 0.0
        return max(self.support_offsets) / self.C

    @property
    def statements_after_support(self) -> int | None:
        """The question's `BabiSample.statements_after_support` (None: no support)."""
        return self.babi.statements_after_support

    def prompt(self) -> np.ndarray:
        """Generation prompt: context + question + marker."""
        return np.concatenate([self.context, self.question_ids, self.marker_ids])

    def sequence(self, eos: int) -> np.ndarray:
        """Training sequence: context + question + marker + answer + eos."""
        return np.concatenate([self.prompt(), self.answer_ids, np.asarray([eos], np.int32)])


@dataclass
class EvalSet:
    task: str
    split: str
    length: int
    C: int
    samples: list[BabilongSample]
    n_skipped: int  # questions passed over because they do not fit


class BabilongBuilder:
    """Builds BABILong samples for one tokenizer, background and seed.

    Keeps the parsed bAbI tasks and the token ids of every distinct fact,
    question and answer, so building a sample costs only the background draw.
    Train samples come from bAbI train files (minus the last `val_fraction` of
    stories, which form the 'val' split) and the train background; 'test' from
    the test files and the evaluation background.
    """

    def __init__(self, tokenizer, background: Background | str | Path | None = None, *,
                 seed: int = 0, babi_dir: str | Path | None = None, marker: str = MARKER,
                 question_leading_space: bool = True, answer_leading_space: bool = True,
                 placement: tuple[float, float] | None = None, val_fraction: float = VAL_FRACTION,
                 background_format: str | None = None, min_sentence_tokens: int = 10,
                 cache_dir: str | Path | None = None):
        self.tokenizer = tokenizer
        self.seed = int(seed)
        self._ids: dict[str, np.ndarray] = {}  # token ids of every distinct text, once
        if not isinstance(background, Background):
            background = load_background(background, tokenizer, seed=self.seed,
                                         fmt=background_format,
                                         min_sentence_tokens=min_sentence_tokens,
                                         cache_dir=cache_dir)
        self.background = background
        self.babi_dir = babi_dir
        self.q_space = " " if question_leading_space else ""
        self.a_space = " " if answer_leading_space else ""
        self.marker_ids = self._encode(marker)
        self.placement = placement
        self.val_fraction = val_fraction
        if tokenizer.eot_id is None:
            raise DataError(f"tokenizer {tokenizer!r} has no end-of-text id; BABILong answers end "
                            "with eos. Use a tokenizer with one (byte, gpt2, bpe).")
        self.eos = int(tokenizer.eot_id)

    def _encode(self, text: str) -> np.ndarray:
        ids = self._ids.get(text)
        if ids is None:
            ids = self._ids[text] = np.asarray(self.tokenizer.encode(text), dtype=np.int32)
        return ids

    # ----- questions -----
    def questions(self, task: str, split: str) -> Sequence[BabiSample]:
        """The bAbI questions of a split: 'train' and 'val' share the train file,
        cut at a story boundary; 'test' is the test file."""
        return questions(normalize_task(task), split, self.babi_dir, self.val_fraction)

    def fact_ids(self, sample: BabiSample) -> list[np.ndarray]:
        return [self._encode(" " + f) for f in sample.facts]

    def question_ids(self, sample: BabiSample) -> np.ndarray:
        return self._encode(self.q_space + sample.question)

    def answer_ids(self, sample: BabiSample) -> np.ndarray:
        return self._encode(self.a_space + sample.answer)

    def tail_len(self, sample: BabiSample) -> int:
        """Tokens after the context in a training sequence: question, marker, answer, eos."""
        return (len(self.question_ids(sample)) + len(self.marker_ids)
                + len(self.answer_ids(sample)) + 1)

    def fits(self, sample: BabiSample, C: int, max_n_facts: int | None = None) -> bool:
        """Whether the facts fit in C tokens (and the fact count is within the limit,
        the question line counting as one, as in the reference)."""
        if max_n_facts is not None and len(sample.facts) + 1 > max_n_facts:
            return False
        return sum(len(f) for f in self.fact_ids(sample)) <= C

    # ----- building -----
    def rng(self, task: str, split: str, C: int, sample_index: int,
            epoch: int | None = None) -> np.random.Generator:
        """The sample's own generator: a pure function of its key."""
        key = [self.seed, SPLIT_CODES[split], task_code(task), C]
        if epoch is not None:
            key.append(epoch)
        key.append(sample_index)
        return np.random.default_rng(key)

    def build(self, task: str, sample: BabiSample, C: int, split: str,
              epoch: int | None = None, length: int | None = None,
              facts_last: bool = False) -> BabilongSample:
        """Build one sample of exactly C context tokens (raises if the facts do not fit).

        `facts_last`: the facts form one unbroken block at the end of the context, right
        before the question, with background only before them: the 0k (facts-only)
        layout behind background, so training can show it to a memory model."""
        task = normalize_task(task)
        facts = self.fact_ids(sample)
        rng = self.rng(task, split, C, sample.sample_index, epoch)
        if C == 0 or facts_last:  # facts only (C = 0), or background then the facts
            n_facts = sum(len(f) for f in facts)
            if n_facts > C > 0:
                raise DataError(f"the facts take {n_facts} tokens, more than the budget {C}")
            background, starts, first, wraps = draw_background(
                self.background.pool(split), max(C - n_facts, 0), rng)
            offsets = len(background) + np.cumsum([0] + [len(f) for f in facts])
            ctx = Context(np.concatenate([background, *facts]).astype(np.int32),
                          offsets[:-1].tolist(), first, len(starts), wraps)
        else:
            ctx = build_context(facts, C, self.background.pool(split), rng, self.placement)
        support = [ctx.fact_offsets[i] for i in sample.support]
        return BabilongSample(
            task=task, split=split, C=len(ctx.ids), babi=sample, context=ctx.ids,
            question_ids=self.question_ids(sample), marker_ids=self.marker_ids,
            answer_ids=self.answer_ids(sample), fact_offsets=ctx.fact_offsets,
            support_offsets=support, background_wraps=ctx.background_wraps, length=length,
        )

    def eval_set(self, task: str, length: int | str, n_samples: int = 100, split: str = "test",
                 sample_indices: Sequence[int] | None = None,
                 max_n_facts: int | None | str = "auto") -> EvalSet:
        """The first `n_samples` questions of `split` that fit the named length, in file
        order (or exactly `sample_indices`). 0 gives facts-only contexts."""
        task = normalize_task(task)
        length = parse_length(length)
        C = context_budget(length)
        if max_n_facts == "auto":
            max_n_facts = C // 8 if C > 0 else None
        questions = self.questions(task, split)
        if sample_indices is not None:
            by_index = {q.sample_index: q for q in questions}
            missing = [i for i in sample_indices if i not in by_index]
            if missing:
                raise DataError(f"{task} {split} has no sample indices {missing[:5]}")
            candidates = [by_index[i] for i in sample_indices]
        else:
            candidates = questions
        chosen, skipped = [], 0
        for q in candidates:
            if len(chosen) >= n_samples:
                break
            if C > 0 and not self.fits(q, C, max_n_facts):
                skipped += 1
                continue
            chosen.append(self.build(task, q, C, split, length=length))
        if not chosen:
            raise DataError(f"every {task} {split} sample was skipped at length "
                            f"{length_name(length)} (C={C}): the facts do not fit. Use a longer "
                            "length or a task with shorter stories.")
        return EvalSet(task, split, length, C, chosen, skipped)


# ----------------------------------------------------------------------------------------
# batches


@dataclass
class FinetuneBatch:
    """The fine-tune protocol's tensors, all B x T (right-padded)."""

    ids: torch.Tensor
    attention_mask: torch.Tensor  # True on real tokens
    target_mask: torch.Tensor  # True on the answer tokens and the final eos
    pad_id: int

    def to_batch(self, window: int | None = None, length: int | None = None,
                 answer_reserve: int = 10) -> Batch:
        """Next-token `Batch`: targets are IGNORE_INDEX except where the next token is
        scored. `length` pads every row to that many inputs.

        `window` is a dense model's view: the last `window - answer_reserve` tokens of
        the *prompt* (context + question + marker), then the answer and eos. The cut is
        anchored at the end of the prompt, never at the end of the row, so where the
        window starts says nothing about the answer (cutting the row's last `window`
        tokens leaks the answer's length, and with it the answer). The evaluator cuts
        prompts the same way (`dense_view`).
        """
        rows_x, rows_y = [], []
        for ids, att, tm in zip(self.ids, self.attention_mask, self.target_mask):
            n = int(att.sum())
            start = 0
            if window is not None:
                prompt_end = int(tm.nonzero()[0, 0])  # first answer token
                if n - prompt_end > answer_reserve:
                    raise DataError(f"an answer of {n - prompt_end - 1} tokens + eos does not fit "
                                    f"the dense answer reserve of {answer_reserve} tokens")
                start = max(0, prompt_end - (window - answer_reserve))
            x = ids[start: n - 1]
            y = torch.where(tm[start + 1:n], ids[start + 1:n],
                            torch.full_like(ids[start + 1:n], IGNORE_INDEX))
            rows_x.append(x)
            rows_y.append(y)
        t = max(len(x) for x in rows_x) if length is None else length
        xs = torch.full((len(rows_x), t), self.pad_id, dtype=torch.long)
        ys = torch.full((len(rows_x), t), IGNORE_INDEX, dtype=torch.long)
        for i, (x, y) in enumerate(zip(rows_x, rows_y)):
            if len(x) > t:
                raise DataError(f"a sample of {len(x)} input tokens is longer than the batch "
                                f"length {t}")
            xs[i, : len(x)] = x
            ys[i, : len(y)] = y
        return Batch(xs, ys, new_stream=torch.ones(len(rows_x), dtype=torch.bool))

    def input_mask(self, length: int) -> torch.Tensor:
        """[B, length] True on the real input tokens of `to_batch(length=length)` (no
        window): a row's inputs are its real tokens but the last, then padding."""
        n = self.attention_mask.sum(dim=1, keepdim=True) - 1
        return torch.arange(length).unsqueeze(0) < n


def collate_finetune(samples: Sequence[BabilongSample], eos: int, pad_id: int | None = None
                     ) -> FinetuneBatch:
    """Right-padded training tensors; target_mask marks exactly the answer and eos."""
    seqs = [s.sequence(eos) for s in samples]
    t = max(len(s) for s in seqs)
    pad = eos if pad_id is None else pad_id
    ids = torch.full((len(seqs), t), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), t), dtype=torch.bool)
    tm = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, (s, seq) in enumerate(zip(samples, seqs)):
        ids[i, : len(seq)] = torch.from_numpy(seq.astype(np.int64))
        att[i, : len(seq)] = True
        tm[i, len(seq) - len(s.answer_ids) - 1: len(seq)] = True
    return FinetuneBatch(ids, att, tm, pad)


class BabilongSource:
    """Training batches of BABILong samples of `seq_len` tokens (a `BatchSource`).

    Row r of step k is sample number p = (k * world_size + rank) * B + r of an
    endless sequence: tasks take turns (p mod n_tasks, so multi-task training is
    uniform over tasks) and each task walks through its questions in a seeded
    random order that changes every epoch. The whole batch is therefore a pure
    function of (seed, step), and `state_dict` is just the step.

    With `segment=L` (memlm's BABILong protocol, see `prompt_segments`) every row
    has C = seq_len - L context tokens, so the question starts the row's last
    L-token segment, exactly where the evaluator puts it at every length, and no
    fact is ever in that segment. Without it the context budget is
    C = seq_len - margin (20 tokens, or more if this tokenizer's longest question +
    marker + answer + eos needs it: the reference's layout). Rows are right-padded
    to exactly `seq_len` inputs. Each batch is a fresh set of samples, and
    `new_stream` is set on every row: a stateful model starts each sample from its
    initial memory. With `carry=P` a row instead starts, with probability P, from the
    memory its batch row ended the previous step with (the batch then marks its real
    tokens in `attention_mask`, so padding segments write nothing), so the model trains
    on memories that have read far more segments than one row holds. With `prefix=K`
    each row comes with K segments of background (`Batch.prefix`) that the trainer reads
    into the memory without gradient before the row; with `carry` too, that background
    stream is what is carried (never another row's facts), so a row's facts arrive in a
    memory that has read a long stream of background, as in a long BABILong prompt, at
    the cost of forward passes only; `empty=F` lets a share F of rows start from an empty
    memory instead (`Batch.empty_rows`; their stream goes on), as short prompts do.
    `window=N` gives a dense model's rows: the last N - 10 prompt tokens and the answer
    (`FinetuneBatch.to_batch`).
    """

    stateful = False

    def __init__(self, builder: BabilongBuilder, tasks: Sequence[str], split: str,
                 batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1,
                 window: int | None = None, qa_margin: int = QA_MARGIN,
                 max_n_facts: int | None = None, segment: int | None = None,
                 facts_per_segment: int | None = None, facts_last: float = 0.0,
                 min_segments: int | None = None, last_support_keep: float = 1.0,
                 carry: float = 0.0, prefix: int = 0, empty: float = 0.0):
        self.builder = builder
        if prefix < 0:
            raise ConfigError(f"prefix counts background segments, got {prefix}; use 0 or more")
        if prefix and (segment is None or window is not None):
            raise ConfigError("prefix=K reads K background segments into a memory model before "
                              "each row: it needs segment=L and no window=N (a dense model has "
                              "no memory to read them into)")
        self.prefix = prefix
        if not 0.0 <= empty <= 1.0 or (empty and not prefix):
            raise ConfigError(f"empty=F is a share of rows in [0, 1] that skip the prefix "
                              f"stream, so it needs prefix=K; got empty={empty}, prefix={prefix}")
        self.empty = empty
        if not 0.0 <= carry < 1.0:
            raise ConfigError(f"carry is a probability in [0, 1), got {carry}; e.g. carry=0.99 "
                              "(1 would never give a row a fresh memory)")
        if carry and (segment is None or window is not None):
            raise ConfigError("carry=P hands a memory model's state from row to row: it needs "
                              "segment=L and no window=N (a dense model has no memory to carry)")
        self.carry = carry
        if not 0.0 <= facts_last <= 1.0:
            raise ConfigError(f"facts_last is a share of rows in [0, 1], got {facts_last}")
        if not 0.0 <= last_support_keep <= 1.0:
            raise ConfigError("last_support_keep is a probability in [0, 1], got "
                              f"{last_support_keep}")
        self.facts_last = facts_last
        self.tasks = [normalize_task(t) for t in tasks]
        self.split = split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.window = window
        self.step = 0
        # margin over the whole train file, so 'train' and 'val' get the same C
        tails = [builder.tail_len(q) for t in self.tasks for q in builder.questions(t, "train")]
        tails += [builder.tail_len(q) for t in self.tasks for q in builder.questions(t, "val")]
        self.segment = segment
        if segment is not None:
            if max(tails) > segment:
                raise ConfigError(f"the longest question + marker + answer + eos takes "
                                  f"{max(tails)} tokens, more than one segment of {segment}")
            if seq_len < 2 * segment:
                raise ConfigError(f"seq_len={seq_len} must be at least two segments of {segment} "
                                  "(context, then the question segment)")
            self.margin = segment
        else:
            self.margin = max(qa_margin, max(tails))
        self.C = seq_len - self.margin
        if self.C < 0:
            raise ConfigError(f"seq_len={seq_len} is shorter than the {self.margin} tokens the "
                              "question, marker and answer need; raise seq_len.")
        # the context budgets rows may get: one per segment count (longest first)
        self.budgets = [self.C]
        if min_segments is not None:
            # the ARMT code's `vary_n_segments`: each row draws its own number of segments,
            # so every batch of a later curriculum stage still holds the shorter rows of the
            # stages before it (a stage of longer rows alone erases the shorter skill)
            if segment is None:
                raise ConfigError("min_segments needs segment=L (it counts L-token segments)")
            if seq_len % segment:
                raise ConfigError(f"min_segments needs seq_len={seq_len} to be whole segments "
                                  f"of {segment}")
            n_max = seq_len // segment
            if not 2 <= min_segments <= n_max:
                raise ConfigError(f"min_segments={min_segments} must be in 2..{n_max} (a context "
                                  f"segment, then the question's; seq_len={seq_len} holds {n_max})")
            self.budgets = [self.C - k * segment for k in range(n_max - min_segments + 1)]
        if facts_per_segment is not None and segment is None:
            raise ConfigError("facts_per_segment needs segment=L")
        self._questions = {t: builder.questions(t, split) for t in self.tasks}
        kept = {t: [self._kept(t, i, q, last_support_keep) for i, q in enumerate(qs)]
                for t, qs in self._questions.items()}  # drawn once, whatever the budgets
        self._eligible: dict[tuple[str, int], np.ndarray] = {}
        for C in self.budgets:
            limit = max_n_facts
            if facts_per_segment is not None:
                # a curriculum over story length that follows the segment curriculum: at
                # most k story lines per context segment (the question line counts, as in
                # the reference's max_n_facts), so short rows ask about short stories
                per_row = facts_per_segment * (C // segment) + 1
                limit = per_row if limit is None else min(limit, per_row)
            for t in self.tasks:
                ok = [i for i, q in enumerate(self._questions[t])
                      if kept[t][i] and builder.fits(q, C, limit)]
                if not ok:
                    raise DataError(f"no {t} {split} question fits in {C} context tokens "
                                    f"(seq_len={seq_len}); raise seq_len.")
                self._eligible[t, C] = np.asarray(ok)
        self._perm_cache: dict[tuple[str, int], tuple[int, np.ndarray]] = {}

    def _kept(self, task: str, index: int, q: BabiSample, keep: float) -> bool:
        """`last_support_keep`: a training question whose supporting fact is the story's
        last statement (where "name the last place" is right by accident) stays with
        probability `keep`, a seeded draw per question; every other question stays."""
        if keep >= 1.0 or self.split != "train" or q.statements_after_support != 0:
            return True
        return np.random.default_rng([self.seed, task_code(task), index, 0x1A57]).random() < keep

    def _order(self, task: str, C: int, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get((task, C))
        if cached is None or cached[0] != epoch:
            eligible = self._eligible[task, C]
            key = [self.seed, SPLIT_CODES[self.split], task_code(task), epoch, 0x0DE7]
            if C != self.C:  # the full-length rows keep the order they had before budgets
                key.append(C)
            rng = np.random.default_rng(key)
            cached = (epoch, eligible[rng.permutation(len(eligible))])
            self._perm_cache[task, C] = cached
        return cached[1]

    def _row_rng(self, p: int, salt: int) -> np.random.Generator:
        """Row p's generator for one kind of draw (`salt`): a pure function of (seed,
        split, row), so every per-row choice is the same in any batch or process."""
        return np.random.default_rng([self.seed, SPLIT_CODES[self.split], p, salt])

    def row_budget(self, p: int) -> int:
        """Context tokens of row p: the full C, or with `min_segments` a seeded draw."""
        if len(self.budgets) == 1:
            return self.C
        rng = self._row_rng(p, 0x5E65)
        return self.budgets[int(rng.integers(len(self.budgets)))]

    def sample_at(self, p: int) -> BabilongSample:
        """Sample number p of the endless training sequence."""
        task = self.tasks[p % len(self.tasks)]
        q = p // len(self.tasks)
        C = self.row_budget(p)
        epoch, pos = divmod(q, len(self._eligible[task, C]))
        idx = int(self._order(task, C, epoch)[pos])
        last = bool(self.facts_last) and self._row_rng(p, 0xFAC7).random() < self.facts_last
        return self.builder.build(task, self._questions[task][idx], C, self.split,
                                  epoch=epoch, facts_last=last)

    def next_batch(self) -> Batch:
        return self.next_batch_with_samples()[0]

    def next_batch_with_samples(self) -> tuple[Batch, list[BabilongSample]]:
        """The next batch and the samples its rows were built from, row by row (scripts
        that split scores by a sample's facts read them here instead of building each
        sample a second time with `sample_at`)."""
        base = (self.step * self.world_size + self.rank) * self.batch_size
        self.step += 1
        samples = [self.sample_at(base + r) for r in range(self.batch_size)]
        fb = collate_finetune(samples, self.builder.eos)
        length = self.seq_len if self.window is None else min(self.seq_len, self.window)
        batch = fb.to_batch(window=self.window, length=length)
        if self.carry:
            batch.new_stream = torch.tensor([self.fresh_memory(base + r)
                                             for r in range(self.batch_size)])
        if self.prefix:
            batch.prefix = torch.from_numpy(np.stack([self.prefix_at(base + r) for r in
                                                      range(self.batch_size)]).astype(np.int64))
            if self.empty:
                batch.empty_rows = torch.tensor([
                    bool(self._row_rng(base + r, 0xE3B7).random() < self.empty)
                    for r in range(self.batch_size)])
        elif self.carry:  # the row's own memory is carried: its padding must not write
            batch.attention_mask = fb.input_mask(length)
        return batch, samples

    def prefix_at(self, p: int) -> np.ndarray:
        """Row p's `prefix * segment` tokens of background (from a random sentence on), a
        seeded function of the row, from the split's own background."""
        rng = self._row_rng(p, 0xA6E)
        pool = self.builder.background.pool(self.split)
        return draw_background(pool, self.prefix * self.segment, rng)[0]

    def fresh_memory(self, p: int) -> bool:
        """Whether row p's memory starts fresh: always without `carry`; with it, a seeded
        draw with probability 1 - carry. Otherwise row p continues the memory of the same
        batch row of this rank's previous step: the memory that row ended with, or with
        `prefix` the memory after that step's background (so only background is carried)."""
        if not self.carry:
            return True
        rng = self._row_rng(p, 0xCA55)
        return bool(rng.random() >= self.carry)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


# ----------------------------------------------------------------------------------------
# the "babilong" dataset: `data.source: babilong:qa1,qa2[:key=value...]`

_SOURCE_OPTIONS = {
    "babi": str, "background": str, "eval_background": str, "format": str, "window": int,
    "margin": int, "max_n_facts": int, "min_sentence_tokens": int, "cache_dir": str,
    "segment": int, "facts_per_segment": int, "facts_last": float, "min_segments": int,
    "last_support_keep": float, "carry": float, "prefix": int, "empty": float,
}


def parse_source_spec(spec: str) -> tuple[list[str], dict[str, Any]]:
    """'babilong:qa1,qa2:window=256:background=/x.txt' -> (['qa1', 'qa2'], options)."""
    head, _, rest = spec.partition(":")
    if head != "babilong":
        raise ConfigError(f"{spec!r} is not a babilong source (it must start with 'babilong:')")
    parts = rest.split(":") if rest else []
    task_part = parts[0] if parts and "=" not in parts[0] else "qa1"
    tasks = expand_tasks(task_part)
    options = parse_options(parts[1 if parts and "=" not in parts[0] else 0:],
                            _SOURCE_OPTIONS, spec)
    return tasks, options


def expand_tasks(text: str | Sequence[str]) -> list[str]:
    """'qa1,qa2' / 'qa1+qa3' / 'qa1-qa5' / 'all' / ['qa1'] -> ['qa1', ...]."""
    if not isinstance(text, str):
        return [normalize_task(t) for t in text]
    out: list[str] = []
    for item in re.split(r"[,+]", text):
        item = item.strip().lower()
        if not item:
            continue
        if item == "all":
            out.extend(f"qa{n}" for n in range(1, 21))
        elif re.fullmatch(r"qa\d+-(qa)?\d+", item):
            a, b = (int(x) for x in re.findall(r"\d+", item))
            out.extend(normalize_task(n) for n in range(a, b + 1))
        else:
            out.append(normalize_task(item))
    if not out:
        raise ConfigError(f"no bAbI task in {text!r}; write e.g. qa1 or qa1,qa2 or qa1-qa5")
    return list(dict.fromkeys(out))


@functools.lru_cache(maxsize=8)
def _cached_builder(tokenizer, seed: int, babi: str | None, background: str | None,
                    eval_background: str | None, fmt: str | None, min_tokens: int,
                    cache_dir: str | None) -> BabilongBuilder:
    bg = load_background(background, tokenizer, seed=seed, eval_source=eval_background, fmt=fmt,
                         min_sentence_tokens=min_tokens, cache_dir=cache_dir)
    return BabilongBuilder(tokenizer, bg, seed=seed, babi_dir=babi)


@DATASETS.register("babilong")
def babilong_source(spec: str, *, tokenizer, batch_size: int, seq_len: int, seed: int,
                    split: str, rank: int = 0, world_size: int = 1) -> BabilongSource:
    """Factory for `data.source: babilong:TASKS[:key=value...]`.

    seq_len is the sample length in tokens (a curriculum stage grows it). Options:
    babi=DIR (bAbI v1.2 folder; default $MEMLM_BABI_DIR), background=PATH|filler,
    eval_background=PATH, format=plain|wikitext, segment=L (the question starts the
    last L-token segment: memlm's protocol for memory models), window=N (a dense
    model of context N: the last N - 10 prompt tokens + the answer),
    facts_per_segment=K (with segment=L: stories of at most K lines per context
    segment, a story-length curriculum that follows the segment one), facts_last=P (a
    share P of rows put all facts in one block right before the question: the 0k
    layout behind background), min_segments=M (with segment=L: each row draws its
    number of segments uniformly from M to seq_len / L, so a stage keeps the shorter
    rows of the stages before it; the ARMT code's vary_n_segments starts at 1, memlm's
    rows need 2: context, then the question), last_support_keep=P (training questions
    whose support is the story's last statement are kept with probability P), carry=P
    (a memory model's row starts from the memory its batch row ended the step before
    with, with probability P, else from a fresh one: training on memories that have
    read thousands of segments, as a 64k prompt's has by its last facts), prefix=K
    (K segments of background read into the memory without gradient before each row;
    with carry, the background stream is what is carried), empty=F (with prefix: a
    share F of rows start from an empty memory instead, the stream going on), margin=N,
    max_n_facts=N, min_sentence_tokens=N,
    cache_dir=DIR (tokenised background pools).
    """
    tasks, opt = parse_source_spec(spec)
    builder = _cached_builder(tokenizer, int(seed), opt.get("babi"), opt.get("background"),
                              opt.get("eval_background"), opt.get("format"),
                              opt.get("min_sentence_tokens", 10), opt.get("cache_dir"))
    return BabilongSource(builder, tasks, split, batch_size, seq_len, seed, rank, world_size,
                          window=opt.get("window"), qa_margin=opt.get("margin", QA_MARGIN),
                          max_n_facts=opt.get("max_n_facts"), segment=opt.get("segment"),
                          facts_per_segment=opt.get("facts_per_segment"),
                          facts_last=opt.get("facts_last", 0.0),
                          min_segments=opt.get("min_segments"),
                          last_support_keep=opt.get("last_support_keep", 1.0),
                          carry=opt.get("carry", 0.0), prefix=opt.get("prefix", 0),
                          empty=opt.get("empty", 0.0))


__all__ = [
    "Background", "BabilongBuilder", "BabilongSample", "BabilongSource", "Context", "EvalSet",
    "ANSWER_RESERVE", "FillerPool", "FinetuneBatch", "SentencePool", "babilong_source",
    "build_context", "dense_view", "prompt_segments",
    "collate_finetune", "context_budget", "corpus_sentences", "expand_tasks", "length_name",
    "load_background", "parse_length", "parse_lengths", "parse_source_spec", "split_sentences",
]
