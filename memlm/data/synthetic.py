"""Generated data, so memlm trains, evaluates and compares with nothing downloaded.

Two kinds:

* Text corpora (`builtin:NAME` data sources, read by `prepare_data`):
  ``builtin:recall`` (the default) is simple generated sentences in which facts are
  stated ("the code of mia is 4821.") and asked much later ("what is the code of mia?
  4821."); ``builtin:stories`` is generated prose with no recall. Both are plain ASCII
  with a tiny vocabulary and grammar, so a small model's local loss drops within a few
  hundred steps and what remains hard in `recall` is exactly the long-range recall.
* Token-level diagnostics returning ``(input_ids, targets)`` int64 tensors of shape
  [N, T] where ``targets[:, t]`` is the id expected after position t, IGNORE_INDEX
  everywhere except the scored positions: `mqar`, `copy_task`, `needle`. They are
  also registered as DATASETS (`mqar:pairs=8,distance=64` as a data source).

Every generator is a pure function of its arguments and seed (Python's `random.Random`
and numpy's `default_rng`, both stable across platforms and versions).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from memlm.data.batches import Batch
from memlm.errors import DataError, unknown_name
from memlm.registry import DATASETS
from memlm.specs import parse_options
from memlm.types import IGNORE_INDEX

#: bump when a generator's output changes, so cached token files are not reused
GENERATOR_VERSION = 1

NAMES = tuple(
    "ada ben cal dan eva fay gus hal ivy jon kim leo mia ned olive pam quinn rex sam tom uma "
    "vic wes zoe".split()
)
PLACES = tuple(
    "park kitchen garden school market office hall forest river library station beach".split()
)
OBJECTS = tuple("cup book ball key lamp hat apple box pen bag coin map".split())
ADJECTIVES = tuple("red big small old new blue green warm".split())
ANIMALS = tuple("cat dog fox bird mouse frog bear duck".split())
FEELINGS = tuple("happy sad tired glad calm proud".split())
#: attribute -> number of digits of its value
ATTRIBUTES = {"code": 4, "room": 3, "seat": 2, "door": 3}


# ----- builtin:recall ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RecallSpan:
    """One recalled answer: characters [start, end) of the text hold `answer`.

    The same value was stated `gap` characters earlier (at `fact_start`), so a model
    predicts it correctly only if it remembers that far back.
    """

    start: int
    end: int
    gap: int
    fact_start: int
    key: str
    attribute: str
    answer: str


@dataclass
class _OpenFact:
    due: int
    key: str
    attribute: str
    value: str
    value_start: int


def _filler(rng: random.Random, words: int | None = None) -> str:
    """One filler sentence; `words` keeps only the first N names/places/objects/adjectives."""
    names, places, objects, adjectives = (
        (NAMES, PLACES, OBJECTS, ADJECTIVES) if words is None
        else (NAMES[:words], PLACES[:words], OBJECTS[:words], ADJECTIVES[:words]))
    name, other = rng.sample(names, 2)
    place, obj, adj = rng.choice(places), rng.choice(objects), rng.choice(adjectives)
    templates = (
        f"{name} went to the {place}.",
        f"{name} took the {obj}.",
        f"the {obj} is in the {place}.",
        f"{name} saw {other} in the {place}.",
        f"the {obj} is {adj}.",
        f"{name} gave the {obj} to {other}.",
    )
    return rng.choice(templates)


def recall_stream(
    n_chars: int,
    seed: int = 0,
    gap_range: tuple[int, int] = (200, 2000),
    near_range: tuple[int, int] = (30, 56),
    near_fraction: float = 0.25,
    fact_prob: float = 0.3,
    max_open: int = 8,
    n_keys: int | None = None,
    digits: int | None = None,
    filler_words: int | None = None,
    n_attributes: int | None = None,
) -> tuple[str, list[RecallSpan]]:
    """Generate about `n_chars` characters of recall text and the answer spans in it.

    The text is sentences separated by spaces, a newline every few sentences. Three
    sentence kinds:

    * filler from a small grammar: "ben went to the park.", "the cup is red." ...
    * a fact: "the code of mia is 4821." (attribute code/room/seat/door, 2-4 digits)
    * a question about an earlier fact with its answer: "what is the code of mia? 4821."

    Each fact draws a target gap, in characters from the fact's value to the answer:
    with probability `near_fraction` from `near_range` (inside a short attention
    window), else from `gap_range` (far beyond it). The question is asked at a sentence
    boundary near that target (the default near range keeps about 95% of near gaps
    under 64 characters); the spans record the actual gaps. At most `max_open` facts wait
    for their question at a time, and a (name, attribute) pair is not reused while
    open, so every question has exactly one right answer (its latest statement).

    `n_keys` (default: all 24 names) limits the names facts are about, and `digits`
    (default: per attribute, 2-4) gives every value the same number of digits; with
    `max_open=1` the answer is always the most recent fact, so recall needs no key
    matching. `filler_words` (default: all) keeps only the first N names, places, objects
    and adjectives in filler sentences, so the filler is easier to predict and a larger
    share of what is left to learn is the recall. `n_attributes` (default: all 4) uses only
    the first N attributes; with `n_keys=1, n_attributes=1` every fact and question reads
    the same but for the value, so the value is all that is left to predict there. These make an easier task for tiny
    models; the defaults are unchanged.

    Returns ``(text, spans)``; ``text[s.start:s.end] == s.answer`` for each span.
    """
    if n_chars <= 0:
        raise DataError(f"recall_stream needs n_chars > 0, got {n_chars}.")
    if not (0 < near_range[0] <= near_range[1] and 0 < gap_range[0] <= gap_range[1]):
        raise DataError(
            f"gap ranges must be (low, high) with 0 < low <= high, got near_range={near_range}, "
            f"gap_range={gap_range}."
        )
    if n_keys is not None and not 1 <= n_keys <= len(NAMES):
        raise DataError(f"n_keys must be in [1, {len(NAMES)}], got {n_keys}.")
    if digits is not None and not 1 <= digits <= 9:
        raise DataError(f"digits must be in [1, 9], got {digits}.")
    if filler_words is not None and not 2 <= filler_words <= len(ADJECTIVES):
        raise DataError(f"filler_words must be in [2, {len(ADJECTIVES)}], got {filler_words}.")
    if n_attributes is not None and not 1 <= n_attributes <= len(ATTRIBUTES):
        raise DataError(f"n_attributes must be in [1, {len(ATTRIBUTES)}], got {n_attributes}.")
    if max_open < 1:
        raise DataError(f"max_open must be >= 1, got {max_open}.")
    if not 0.0 < fact_prob <= 1.0:
        raise DataError(f"fact_prob must be in (0, 1], got {fact_prob}.")
    names = NAMES if n_keys is None else NAMES[:n_keys]
    attributes = list(ATTRIBUTES)[:n_attributes]
    rng = random.Random(seed)
    parts: list[str] = []
    spans: list[RecallSpan] = []
    open_facts: list[_OpenFact] = []
    pos = 0
    n_sentences = 0

    def emit(sentence: str) -> int:
        """Append a sentence (with its separator); return where the sentence starts."""
        nonlocal pos, n_sentences
        sep = "" if not parts else ("\n" if n_sentences % 6 == 0 else " ")
        parts.append(sep + sentence)
        start = pos + len(sep)
        pos += len(sep) + len(sentence)
        n_sentences += 1
        return start

    while pos < n_chars:
        # due half a filler sentence early, so the overshoot is centred on the target gap
        due = [f for f in open_facts if f.due <= pos + 12]
        if due:
            fact = min(due, key=lambda f: f.due)
            open_facts.remove(fact)
            prefix = f"what is the {fact.attribute} of {fact.key}? "
            start = emit(f"{prefix}{fact.value}.") + len(prefix)
            spans.append(
                RecallSpan(
                    start,
                    start + len(fact.value),
                    start - fact.value_start,
                    fact.value_start,
                    fact.key,
                    fact.attribute,
                    fact.value,
                )
            )
        elif len(open_facts) < max_open and rng.random() < fact_prob:
            busy = {(f.key, f.attribute) for f in open_facts}
            key, attribute = rng.choice(names), rng.choice(attributes)
            if (key, attribute) in busy:
                emit(_filler(rng, filler_words))
                continue
            n_digits = digits or ATTRIBUTES[attribute]
            value = str(rng.randrange(10 ** (n_digits - 1), 10**n_digits))
            prefix = f"the {attribute} of {key} is "
            value_start = emit(f"{prefix}{value}.") + len(prefix)
            low, high = near_range if rng.random() < near_fraction else gap_range
            gap = rng.randint(low, high)
            question_prefix = len(f" what is the {attribute} of {key}? ")
            open_facts.append(
                _OpenFact(value_start + gap - question_prefix, key, attribute, value, value_start)
            )
        else:
            emit(_filler(rng, filler_words))
    return "".join(parts), spans


def stories_text(n_chars: int, seed: int = 0) -> str:
    """About `n_chars` characters of generated children's-story prose (no recall task).

    Paragraphs of 4-7 sentences about one animal, from a few templates, separated by a
    blank line. Low entropy on purpose: a generic corpus a tiny model learns quickly.
    """
    if n_chars <= 0:
        raise DataError(f"stories_text needs n_chars > 0, got {n_chars}.")
    rng = random.Random(seed)
    paragraphs: list[str] = []
    total = 0
    while total < n_chars:
        name, friend = rng.sample(NAMES, 2)
        animal = rng.choice(ANIMALS)
        home, away = rng.sample(PLACES, 2)
        adj = rng.choice(ADJECTIVES)
        article = "an" if adj[0] in "aeiou" else "a"
        sentences = [
            f"once upon a time there was {article} {adj} {animal} called {name}.",
            f"{name} lived near the {home}.",
        ]
        middle = [
            f"every day {name} went to the {away}.",
            f"one day {name} found the {rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)}.",
            f"{name} met {friend} by the {rng.choice(PLACES)}.",
            f"{friend} said: i like your {rng.choice(OBJECTS)}.",
            f"they played with the {rng.choice(OBJECTS)} until night.",
            f"{name} was very {rng.choice(FEELINGS)}.",
        ]
        sentences += rng.sample(middle, rng.randint(2, 4))
        sentences.append(f"then {name} went home to the {home}.")
        paragraph = " ".join(sentences)
        paragraphs.append(paragraph)
        total += len(paragraph) + 2
    return "\n\n".join(paragraphs) + "\n"


def _int_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def _recall(options: dict[str, Any], seed: int) -> tuple[str, list[RecallSpan]]:
    return recall_stream(
        options.get("chars", 2_000_000),
        options.get("seed", seed),
        gap_range=options.get("gap", (200, 2000)),
        near_range=options.get("neargap", (30, 56)),
        near_fraction=options.get("near", 0.25),
        fact_prob=options.get("facts", 0.3),
        max_open=options.get("open", 8),
        n_keys=options.get("keys"),
        digits=options.get("digits"),
        filler_words=options.get("filler"),
        n_attributes=options.get("attrs"),
    )


def _recall_text(options: dict[str, Any], seed: int) -> str:
    return _recall(options, seed)[0]


def _stories_text(options: dict[str, Any], seed: int) -> str:
    return stories_text(options.get("chars", 2_000_000), options.get("seed", seed))


#: builtin text sources: name -> (option parsers, generator(options, seed) -> text)
BUILTIN_TEXTS: dict[str, tuple[dict[str, Callable[[str], Any]], Callable[..., str]]] = {
    "recall": ({"chars": int, "seed": int, "gap": _int_range, "near": float,
                "neargap": _int_range, "facts": float, "open": int, "keys": int, "digits": int,
                "filler": int, "attrs": int},
               _recall_text),
    "stories": ({"chars": int, "seed": int}, _stories_text),
}


def parse_builtin(spec: str) -> tuple[Callable[..., str], dict[str, Any]]:
    """Check a builtin spec ('recall:chars=500000') without generating: (generator, options)."""
    name, _, opts = spec.partition(":")
    if name not in BUILTIN_TEXTS:
        raise unknown_name("builtin data source", name, BUILTIN_TEXTS)
    parsers, generate = BUILTIN_TEXTS[name]
    return generate, parse_options(opts.split(","), parsers, opts, DataError)


#: builtin sources whose text holds answers: name -> generator(options, seed) -> (text, spans)
BUILTIN_ANSWERS: dict[str, Callable[..., tuple[str, list[RecallSpan]]]] = {"recall": _recall}


def builtin_answers(spec: str, seed: int = 0) -> tuple[str, list[RecallSpan]]:
    """The text of a builtin source that asks questions, and the character spans of its
    answers (`data.score: answers` scores only those). Sources without answers are a
    one-line DataError."""
    name = spec.partition(":")[0]
    _, options = parse_builtin(spec)
    if name not in BUILTIN_ANSWERS:
        raise DataError(f"data.score: answers needs a source whose text has answers "
                        f"({', '.join('builtin:' + n for n in BUILTIN_ANSWERS)}), not "
                        f"builtin:{name}; use data.score: all.")
    return BUILTIN_ANSWERS[name](options, seed)


def builtin_text(spec: str, seed: int = 0) -> str:
    """Text of a builtin source: 'recall', 'recall:chars=500000,gap=200-4000', 'stories'.

    Options: chars (length, default 2,000,000), seed (overrides the run's seed), and for
    recall gap=LOW-HIGH (the far gap range) and near=FRACTION (share of short gaps), plus
    neargap=LOW-HIGH (the near range), facts=P (chance a sentence states a fact),
    open=N (facts waiting for their question at once), keys=N (names facts are about),
    attrs=N (attributes facts are about), digits=N (digits of every value) and filler=N (words per filler word list); see
    `recall_stream`.
    """
    generate, options = parse_builtin(spec)
    return generate(options, seed)


# ----- answer spans -> token positions ----------------------------------------------------------


@dataclass(frozen=True)
class TokenSpan:
    """Tokens [start, end) hold a recalled answer, `gap` characters (`token_gap` tokens)
    after the first token of its fact's value."""

    start: int
    end: int
    gap: int
    token_gap: int


def token_offsets(ids: Sequence[int], tokenizer) -> np.ndarray:
    """Character offset where each token starts (plus the total length at the end).

    Exact for text whose tokens each decode to whole characters, which holds for ASCII
    text under every memlm tokenizer (the generated corpora are ASCII); with the byte
    tokenizer on ASCII the offsets are simply 0, 1, 2, ...
    """
    lengths = [len(tokenizer.decode([int(i)])) for i in ids]
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def spans_to_tokens(
    text: str, spans: Sequence[RecallSpan], tokenizer, ids: Sequence[int] | None = None
) -> tuple[list[int], list[TokenSpan]]:
    """Encode `text` and map each character span to the tokens that cover it.

    Returns ``(ids, token_spans)``. A token that straddles a span's edge (e.g. gpt2's
    " 4821" taking the preceding space) counts as part of the answer.
    """
    ids = list(tokenizer.encode(text)) if ids is None else list(ids)
    offsets = token_offsets(ids, tokenizer)
    if offsets[-1] != len(text):
        raise DataError(
            f"the tokens decode to {offsets[-1]} characters but the text has {len(text)}; "
            "answer spans can only be mapped for text whose tokens decode to whole characters "
            "(ASCII text)."
        )
    starts = offsets[:-1]
    out = []

    def token_at(char: int) -> int:
        return int(np.searchsorted(starts, char, side="right")) - 1

    for s in spans:
        first = token_at(s.start)
        last = int(np.searchsorted(starts, s.end, side="left"))
        out.append(TokenSpan(first, last, s.gap, first - token_at(s.fact_start)))
    return ids, out


def recall_targets(ids: Sequence[int], token_spans: Sequence[TokenSpan]) -> torch.Tensor:
    """Next-token targets scoring only the answers: position t-1 targets token t.

    Feed `ids` as input; `targets != IGNORE_INDEX` marks the predictions that are
    answers, so the loss or accuracy on them is the recall score.
    """
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)
    targets = torch.full_like(ids_t, IGNORE_INDEX)
    for s in token_spans:
        lo = max(s.start, 1)
        targets[lo - 1 : s.end - 1] = ids_t[lo : s.end]
    return targets


# ----- token-level diagnostics ------------------------------------------------------------------


def _check_vocab(vocab_size: int, needed: int, what: str) -> None:
    if vocab_size < needed:
        raise DataError(f"{what} needs vocab_size >= {needed}, got {vocab_size}.")


def mqar(
    n_pairs: int,
    distance: int,
    vocab_size: int,
    n_samples: int,
    seed: int = 0,
    n_queries: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall.

    Layout of one sample (length 2*n_pairs + distance + 2*n_queries)::

        k1 v1 k2 v2 ... kn vn | 0 x distance | q1 a1 q2 a2 ...

    Keys are distinct ids from [1, 1 + (V-1)//2), values ids from the rest of the
    vocabulary (repeats allowed), 0 is the filler. Queries are distinct keys from the
    sample in random order; each is followed by its value (teacher forcing). The only
    scored targets are at the query positions (target = that key's value), so the score
    is pure recall across at least `distance` tokens.
    """
    n_queries = n_pairs if n_queries is None else n_queries
    n_keys = (vocab_size - 1) // 2
    _check_vocab(vocab_size, 3, "mqar")
    if n_pairs > n_keys or n_queries > n_pairs or min(n_pairs, n_queries) < 1 or distance < 0:
        raise DataError(
            f"mqar needs 1 <= n_queries ({n_queries}) <= n_pairs ({n_pairs}) <= "
            f"(vocab_size - 1) // 2 ({n_keys}) and distance >= 0 (got {distance})."
        )
    rng = np.random.default_rng(seed)
    keys = np.stack([rng.permutation(n_keys)[:n_pairs] for _ in range(n_samples)]) + 1
    values = rng.integers(1 + n_keys, vocab_size, size=(n_samples, n_pairs))
    order = np.stack([rng.permutation(n_pairs)[:n_queries] for _ in range(n_samples)])
    rows = np.arange(n_samples)[:, None]
    q_keys, q_values = keys[rows, order], values[rows, order]

    kv = np.stack([keys, values], axis=2).reshape(n_samples, -1)
    qa = np.stack([q_keys, q_values], axis=2).reshape(n_samples, -1)
    inputs = np.concatenate([kv, np.zeros((n_samples, distance), np.int64), qa], axis=1)
    targets = np.full_like(inputs, IGNORE_INDEX)
    q0 = 2 * n_pairs + distance
    targets[:, q0::2] = q_values
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def copy_task(
    length: int, n_samples: int, vocab_size: int = 256, seed: int = 0, delay: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy a random string after a separator.

    Layout (length 2*length + delay + 1)::

        x1 ... xL | 0 x delay | 1 | x1 ... xL

    Data ids come from [2, V), 0 is the filler and 1 the separator. Scored targets are
    at the separator (target x1) and at the copied x1..x(L-1) (targets x2..xL): every
    copied token must be reproduced from `length + delay` tokens back.
    """
    _check_vocab(vocab_size, 3, "copy_task")
    if length < 1 or delay < 0:
        raise DataError(f"copy_task needs length >= 1 and delay >= 0, got {length}, {delay}.")
    rng = np.random.default_rng(seed)
    x = rng.integers(2, vocab_size, size=(n_samples, length))
    gap = np.zeros((n_samples, delay), np.int64)
    sep = np.ones((n_samples, 1), np.int64)
    inputs = np.concatenate([x, gap, sep, x], axis=1)
    targets = np.full_like(inputs, IGNORE_INDEX)
    targets[:, length + delay : length + delay + length] = x
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def needle(
    haystack_len: int,
    depth: float,
    n_samples: int,
    vocab_size: int = 256,
    seed: int = 0,
    needle_len: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Find a needle in a haystack of random tokens.

    Layout (length haystack_len + 2*needle_len + 2)::

        h ... h | 1 n1 ... nk | h ... h | 2 n1 ... nk

    The haystack is random ids from [3, V); the needle (mark 1 + k random ids) is put
    at fraction `depth` of the haystack (0 = start, 1 = end); the query mark 2 at the
    end asks for it. Scored targets: at the query mark (n1) and at n1..n(k-1) of the
    answer (n2..nk).
    """
    _check_vocab(vocab_size, 4, "needle")
    if not 0.0 <= depth <= 1.0 or haystack_len < 0 or needle_len < 1:
        raise DataError(
            f"needle needs 0 <= depth <= 1, haystack_len >= 0 and needle_len >= 1, got "
            f"depth={depth}, haystack_len={haystack_len}, needle_len={needle_len}."
        )
    rng = np.random.default_rng(seed)
    hay = rng.integers(3, vocab_size, size=(n_samples, haystack_len))
    value = rng.integers(3, vocab_size, size=(n_samples, needle_len))
    at = int(round(depth * haystack_len))
    mark = np.ones((n_samples, 1), np.int64)
    inputs = np.concatenate([hay[:, :at], mark, value, hay[:, at:], mark * 2, value], axis=1)
    targets = np.full_like(inputs, IGNORE_INDEX)
    q = haystack_len + needle_len + 1
    targets[:, q : q + needle_len] = value
    return torch.from_numpy(inputs), torch.from_numpy(targets)


# ----- diagnostics as data sources (DATASETS) ---------------------------------------------------


class TaskBatches:
    """Batch source drawing fresh samples of a diagnostic each step.

    Batch k of split s is generated from seed (seed, s, k), so the data is a pure function
    of the seed and the step (exact resume) and train and val never share samples.
    Samples shorter than `seq_len` are padded on the right with 0 and unscored targets.
    Every batch starts fresh streams: samples are independent.
    """

    stateful = False

    def __init__(
        self,
        generate: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
        batch_size: int,
        seq_len: int,
        seed: int,
        split: str,
        spec: str,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.generate, self.batch_size, self.seq_len = generate, batch_size, seq_len
        self.seed, self.split_id = seed, {"train": 0, "val": 1}.get(split, 2)
        self.rank, self.world_size = rank, world_size
        self.step = 0
        length = generate(1, 0)[0].shape[1]
        if length > seq_len:
            raise DataError(
                f"a sample of {spec!r} has {length} tokens, more than seq_len {seq_len}; "
                f"raise data.seq_len (or model.context_len) to >= {length} or shrink the task."
            )

    def next_batch(self) -> Batch:
        seed = int(
            np.random.SeedSequence([self.seed, self.split_id, self.step]).generate_state(1)[0]
        )
        self.step += 1
        x, y = self.generate(self.batch_size * self.world_size, seed)
        x = x[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        y = y[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        pad = self.seq_len - x.shape[1]
        if pad:
            x = torch.nn.functional.pad(x, (0, pad), value=0)
            y = torch.nn.functional.pad(y, (0, pad), value=IGNORE_INDEX)
        return Batch(x, y, torch.ones(self.batch_size, dtype=torch.bool))

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def _task_factory(
    name: str,
    parsers: dict[str, Callable[[str], Any]],
    make: Callable[[dict[str, Any], int], Callable[[int, int], Any]],
):
    def factory(
        spec: str,
        *,
        tokenizer,
        batch_size: int,
        seq_len: int,
        seed: int,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
    ) -> TaskBatches:
        _, _, opts = spec.partition(":")
        options = parse_options(opts.split(","), {**parsers, "vocab": int}, opts, DataError)
        vocab = options.pop("vocab", tokenizer.vocab_size)
        if vocab > tokenizer.vocab_size:
            raise DataError(
                f"{spec!r}: vocab={vocab} exceeds the tokenizer's {tokenizer.vocab_size} ids."
            )
        return TaskBatches(
            make(options, vocab), batch_size, seq_len, seed, split, spec, rank, world_size
        )

    factory.__doc__ = f"DATASETS factory for '{name}:KEY=VALUE,...' (see synthetic.{name})."
    return DATASETS.add(name, factory)


_task_factory(
    "mqar",
    {"pairs": int, "distance": int, "queries": int},
    lambda o, v: (
        lambda n, s: mqar(o.get("pairs", 8), o.get("distance", 64), v, n, s, o.get("queries"))
    ),
)
_task_factory(
    "copy",
    {"length": int, "delay": int},
    lambda o, v: lambda n, s: copy_task(o.get("length", 32), n, v, s, o.get("delay", 0)),
)
_task_factory(
    "needle",
    {"haystack": int, "depth": float, "needle": int},
    lambda o, v: (
        lambda n, s: needle(
            o.get("haystack", 256), o.get("depth", 0.5), n, v, s, o.get("needle", 4)
        )
    ),
)
