"""bAbI v1.2 task files: parsing, locating, and a built-in synthetic qa1.

A bAbI file is a list of numbered stories. Line ids restart at 1 for every
story; a line with TAB-separated fields is a question (question, answer,
supporting line ids), any other line is a statement. Every question becomes one
`BabiSample` whose facts are the statements of its story that precede it, in
order (earlier questions are not facts).

Parsing is strict on purpose: a malformed line, a gap in the ids, or a
supporting id that names a question raises `DataError` with the file and line
number, because a silently mis-parsed story would quietly poison every
BABILong sample built from it.

    samples = load_task("qa1", "test", "/path/to/babi")   # 1,000 BabiSample
    samples = load_task("synth-qa1", "train")             # no files needed
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memlm.errors import ConfigError, DataError

#: bAbI file stems (the part of the file name before `_train.txt` / `_test.txt`).
TASK_NAMES: dict[int, str] = {
    1: "single-supporting-fact",
    2: "two-supporting-facts",
    3: "three-supporting-facts",
    4: "two-arg-relations",
    5: "three-arg-relations",
    6: "yes-no-questions",
    7: "counting",
    8: "lists-sets",
    9: "simple-negation",
    10: "indefinite-knowledge",
    11: "basic-coreference",
    12: "conjunction",
    13: "compound-coreference",
    14: "time-reasoning",
    15: "basic-deduction",
    16: "basic-induction",
    17: "positional-reasoning",
    18: "size-reasoning",
    19: "path-finding",
    20: "agents-motivations",
}

_ROOMS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
#: The answer vocabulary of each task: what label match (the secondary metric) looks for.
TASK_LABELS: dict[str, tuple[str, ...]] = {
    "qa1": _ROOMS,
    "qa2": _ROOMS,
    "qa3": _ROOMS,
    "qa4": _ROOMS,
    "qa5": ("Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"),
    "qa6": ("no", "yes"),
    "qa7": ("none", "one", "three", "two"),
    "qa8": ("apple", "football", "milk", "nothing"),
    "qa9": ("no", "yes"),
    "qa10": ("maybe", "no", "yes"),
    "qa11": _ROOMS,
    "qa12": _ROOMS,
    "qa13": _ROOMS,
    "qa14": ("bedroom", "cinema", "kitchen", "office", "park", "school"),
    "qa15": ("cat", "mouse", "sheep", "wolf"),
    "qa16": ("gray", "green", "white", "yellow"),
    "qa17": ("no", "yes"),
    "qa18": ("no", "yes"),
    "qa19": ("e,e", "e,n", "e,s", "n,e", "n,n", "n,w", "s,e", "s,s", "s,w", "w,n", "w,s", "w,w"),
    "qa20": ("bedroom", "bored", "garden", "hungry", "kitchen", "thirsty", "tired"),
    "synth-qa1": _ROOMS,
}

#: The synthetic task is a stand-in for qa1 when no bAbI files are available.
SYNTH_TASKS = ("synth-qa1",)
ALL_TASKS = tuple(f"qa{n}" for n in TASK_NAMES) + SYNTH_TASKS
SPLITS = ("train", "test")


@dataclass(frozen=True)
class BabiSample:
    """One bAbI question with the facts it may use."""

    task: str
    split: str
    facts: tuple[str, ...]  # statements of the story before the question, in order
    question: str
    answer: str  # verbatim, e.g. "football,apple" (qa8) or "s,e" (qa19)
    support: tuple[int, ...]  # indices into `facts` of the supporting statements
    story_index: int
    question_index: int  # 0-based within the story
    sample_index: int  # 0-based over the questions of the file

    @property
    def supporting(self) -> tuple[str, ...]:
        return tuple(self.facts[i] for i in self.support)

    @property
    def statements_after_support(self) -> int | None:
        """How many story statements come after the last supporting one (None: no support).

        0 means the answer's evidence is the story's most recent statement, where a model
        that only answers with what was said last is right by accident; the evaluator
        splits accuracy by it to tell that shortcut from the task (docs/babilong.md).
        """
        if not self.support:
            return None
        return len(self.facts) - 1 - max(self.support)


def task_code(task: str) -> int:
    """A stable integer for `task`, used in per-sample random keys."""
    if task in SYNTH_TASKS:
        return 1000 + SYNTH_TASKS.index(task)
    return _task_number(task)


def normalize_task(task: str | int) -> str:
    """'qa1', 'QA1', '1', 1 -> 'qa1'; 'synth-qa1' stays. Unknown names raise."""
    name = str(task).strip().lower()
    if name.isdigit():
        name = f"qa{name}"
    if name not in ALL_TASKS:
        from memlm.errors import unknown_name

        raise unknown_name("bAbI task", str(task), ALL_TASKS)
    return name


def _task_number(task: str) -> int:
    return int(normalize_task(task)[2:])


# ----------------------------------------------------------------------------------------
# parsing


def parse_babi(lines: Iterable[str], task: str = "qa?", split: str = "?",
               source: str = "<string>") -> list[BabiSample]:
    """Parse bAbI lines (a file's text split on newlines) into samples.

    `source` only names the input in error messages.
    """
    samples: list[BabiSample] = []
    story = -1
    prev_id = 0
    # the current story: line id -> index into `facts`, or None for a question line
    line_kind: dict[int, int | None] = {}
    facts: list[str] = []
    n_questions = 0

    for lineno, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r").strip()
        if not line:
            continue
        head, sep, text = line.partition(" ")
        if not sep or not head.isdigit():
            raise DataError(f"{source}:{lineno}: expected '<id> <text>', got {line[:60]!r}")
        line_id = int(head)
        if line_id == 1:
            story += 1
            line_kind, facts, n_questions = {}, [], 0
        elif story < 0 or line_id != prev_id + 1:
            raise DataError(
                f"{source}:{lineno}: line id {line_id} does not follow {prev_id} "
                "(ids must restart at 1 for a new story and then count up by one)"
            )
        prev_id = line_id

        if "\t" not in text:
            line_kind[line_id] = len(facts)
            facts.append(text.strip())
            continue

        fields = text.split("\t")
        if len(fields) > 3:
            raise DataError(f"{source}:{lineno}: a question line has {len(fields)} TAB fields, "
                            "expected 3 (question, answer, supporting ids)")
        question = fields[0].strip()
        answer = fields[1].strip() if len(fields) > 1 else ""
        if not answer:
            raise DataError(f"{source}:{lineno}: the question {question!r} has an empty answer")
        ids = fields[2].split() if len(fields) > 2 else []
        if not ids:
            raise DataError(f"{source}:{lineno}: the question {question!r} lists no supporting ids")
        support = []
        for s in ids:
            if not s.isdigit():
                raise DataError(f"{source}:{lineno}: supporting id {s!r} is not an integer")
            ref = line_kind.get(int(s), -1)
            if ref is None or ref == -1:
                what = "a question line" if ref is None else "no earlier line of this story"
                raise DataError(f"{source}:{lineno}: supporting id {s} names {what}; "
                                "supporting ids must name statements before the question")
            support.append(ref)
        line_kind[line_id] = None
        samples.append(BabiSample(
            task=task, split=split, facts=tuple(facts), question=question, answer=answer,
            support=tuple(support), story_index=story, question_index=n_questions,
            sample_index=len(samples),
        ))
        n_questions += 1
    return samples


def parse_babi_file(path: str | Path, task: str | None = None, split: str | None = None
                    ) -> list[BabiSample]:
    """Parse one `qa{n}_{name}_{split}.txt` file (task and split read from the name)."""
    path = Path(path)
    stem = path.stem  # qa1_single-supporting-fact_test
    task = task or stem.split("_", 1)[0]
    split = split or stem.rsplit("_", 1)[-1]
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read bAbI file {path}: {e}") from e
    return parse_babi(text.split("\n"), task=task, split=split, source=str(path))


# ----------------------------------------------------------------------------------------
# locating task files


def default_babi_dir() -> Path | None:
    """Where to look for bAbI when no directory is given: $MEMLM_BABI_DIR,
    $MEMLM_SHARED_DATA/babi, ./data/babi, then ../shared/data/babi (relative to the working
    directory, then to the repository)."""
    candidates = []
    if os.environ.get("MEMLM_BABI_DIR"):
        candidates.append(Path(os.environ["MEMLM_BABI_DIR"]))
    if os.environ.get("MEMLM_SHARED_DATA"):
        candidates.append(Path(os.environ["MEMLM_SHARED_DATA"]) / "babi")
    candidates.append(Path("data") / "babi")
    candidates.append(Path.cwd().parent / "shared" / "data" / "babi")
    candidates.append(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "babi")
    return next((c for c in candidates if c.is_dir()), None)


def find_task_file(task: str, split: str, babi_dir: str | Path | None = None) -> Path:
    """The file of `task` ('qa1') and `split` ('train' | 'test').

    `babi_dir` may be the folder holding `en/` and `en-10k/` or one of those two.
    Training reads the 10k version when present (more stories); the test files
    are the same in both versions.
    """
    if split not in SPLITS:
        raise DataError(f"bAbI split must be 'train' or 'test', got {split!r}")
    n = _task_number(task)
    root = Path(babi_dir) if babi_dir is not None else default_babi_dir()
    if root is None or not root.is_dir():
        raise DataError(
            f"no bAbI directory found (looked at {babi_dir or '$MEMLM_BABI_DIR, ./data/babi, ../shared/data/babi'}). "
            "Download bAbI v1.2 (tasks_1-20_v1-2.tar.gz), pass its folder (the one holding en/ "
            "and en-10k/) or set MEMLM_BABI_DIR; or use the built-in task 'synth-qa1'."
        )
    order = ("en-10k", "en", ".") if split == "train" else ("en", "en-10k", ".")
    for sub in order:
        hits = sorted((root / sub).glob(f"qa{n}_*_{split}.txt"))
        if hits:
            return hits[0]
    raise DataError(f"no file qa{n}_*_{split}.txt under {root} (searched en-10k/, en/ and the "
                    "folder itself); is this the bAbI v1.2 folder?")


@functools.lru_cache(maxsize=64)
def _load_cached(task: str, split: str, babi_dir: str | None) -> tuple[BabiSample, ...]:
    if task in SYNTH_TASKS:
        n_stories = 2000 if split == "train" else 200
        text = synth_qa1_text(seed=0 if split == "train" else 1, n_stories=n_stories)
        return tuple(parse_babi(text.split("\n"), task=task, split=split, source=f"{task}:{split}"))
    path = find_task_file(task, split, babi_dir)
    return tuple(parse_babi_file(path, task=task, split=split))


def load_task(task: str | int, split: str, babi_dir: str | Path | None = None
              ) -> tuple[BabiSample, ...]:
    """All questions of `task` in `split`, in file order (parsed once per process)."""
    task = normalize_task(task)
    return _load_cached(task, split, None if babi_dir is None else str(Path(babi_dir).resolve()))


#: the answer marker between a question and its answer, in BABILong prompts and in the
#: `babi:` stories text (the same words, so what the stories teach transfers)
MARKER = "GEN"
#: share of a train file's stories held out for validation (BABILong's 'val' split)
VAL_FRACTION = 0.05


def split_train(items: tuple[BabiSample, ...], split: str,
                val_fraction: float = VAL_FRACTION) -> tuple[BabiSample, ...]:
    """The 'train' or 'val' part of a train file's questions, cut at a story boundary: the
    last `val_fraction` of the stories validate, so no val story is ever trained on."""
    n_stories = items[-1].story_index + 1
    n_val = max(1, int(round(val_fraction * n_stories)))
    first_val_story = n_stories - n_val
    cut = next(i for i, s in enumerate(items) if s.story_index >= first_val_story)
    return items[:cut] if split == "train" else items[cut:]


def story_documents(tasks: Iterable[str], split: str = "train",
                    babi_dir: str | Path | None = None, marker: str = MARKER,
                    permute: int = 0) -> list[str]:
    """bAbI stories as text, every question answered in place: one document per story.

        "Mary moved to the bathroom. John went to the hallway. Where is Mary?GEN bathroom.
         Daniel went back to the hallway. Sandra moved to the garden. Where is Daniel?GEN
         hallway. ..."

    It is what `data.source: babi:qa1` trains on. A language model reading it sees each
    question of a story answered from the statements before it (five per qa1 story,
    against one per BABILong sample, and no filler), which teaches a small model to look
    facts up in its context. Questions take BABILong's prompt form (question, answer
    marker, answer) so the skill carries over. Stories are separate documents (a corpus
    joins them with end-of-text), so a story's start is marked. 'train' and 'val' are the
    split `split_train` makes (BABILong's val stories are never in 'train'); 'test' is
    the test file.

    (One document per *question*, each answer followed by end-of-text as in a BABILong
    sequence, taught the 2-layer backbone less: 56% on qa1 test questions at 0k, and the
    RMT trained from it stayed on the most-recent-statement shortcut; docs/babilong.md.)

    `permute=K` adds K copies of every story with its persons and rooms renamed
    (`rename_entities`): the same facts and answers under other names, so a small model
    cannot answer a story it has seen by its words and has to look the answer up.
    """
    docs: list[str] = []
    for task in tasks:
        items = questions(task, split, babi_dir)
        persons = story_persons(items)
        for index, story in itertools.groupby(items, key=lambda q: q.story_index):
            lines, said = [], 0
            for q in story:  # the statements since the previous question, then its answer
                lines += [*q.facts[said:], f"{q.question}{marker} {q.answer}."]
                said = len(q.facts)
            doc = " ".join(lines)
            docs.append(doc)
            for k in range(permute):
                rng = np.random.default_rng([task_code(task), index, k, 0x7E2A])
                docs.append(rename_entities(doc, rng, (persons, _ROOMS)))
    return docs


def story_persons(items: Iterable[BabiSample]) -> list[str]:
    """The names of a task: capitalised words that open a statement and also appear
    elsewhere (in a question, an answer or mid-statement), which leaves out sentence
    openers such as "Then" or "Afterwards" (qa11, qa13). Conservative: qa2's names only
    ever open statements, so it gets none and only its rooms are renamed."""
    openers, elsewhere = set(), set()
    for q in items:
        for fact in q.facts:
            first, *rest = re.findall(r"[A-Za-z]+", fact)
            if first[:1].isupper():
                openers.add(first)
            elsewhere.update(rest)
        elsewhere.update(re.findall(r"[A-Za-z]+", f"{q.question} {q.answer}"))
    return sorted(openers & elsewhere)


def entity_token_groups(tasks: Iterable[str], tokenizer: Any,
                        babi_dir: str | Path | None = None) -> list[np.ndarray]:
    """Token ids of the tasks' persons and of the rooms, one array per class, for renaming
    them per training row (`data.rename`, `memlm.data.batches.RenameRows`).

    Renaming ids is exact only if every name is one token, the same wherever it stands
    (word-level ids); a tokenizer that splits or merges a name is refused.
    """
    persons: set[str] = set()
    for task in tasks:
        persons.update(story_persons(questions(task, "train", babi_dir)))
    groups = []
    for words in (sorted(persons), _ROOMS):
        ids = []
        for w in words:
            one = tokenizer.encode(w)
            if len(one) != 1 or tokenizer.encode(f"x {w}.")[1:2] != one:
                raise ConfigError(f"data.rename swaps names token by token, but tokenizer "
                                  f"{tokenizer.name!r} does not keep {w!r} one token; use "
                                  "data.tokenizer: word or data.rename: false.")
            ids.append(one[0])
        if len(ids) > 1:
            groups.append(np.asarray(ids, dtype=np.int64))
    return groups


def answer_token_mask(tokens: np.ndarray, tokenizer: Any, n_questions: int,
                      marker: str = MARKER) -> np.ndarray:
    """True at the answer tokens of `story_documents` text (`data.score: answers`): the
    tokens after each answer marker, up to the full stop that ends the answer.

    With every token scored, most of the gradient goes to the next name or room of a story,
    which nobody can predict; with the answers scored and renamed rows (`data.rename`) the
    backbone learned the lookup (docs/babilong.md, round 7). The marker must be found once
    per question, or the tokenizer split it.
    """
    mark = tokenizer.encode(marker)
    stop = set(tokenizer.encode("."))
    if tokenizer.eot_id is not None:
        stop.add(tokenizer.eot_id)
    toks = np.asarray(tokens)
    m = len(mark)
    hits = np.ones(len(toks) - m + 1, dtype=bool) if len(toks) >= m else np.zeros(0, bool)
    for j, t in enumerate(mark):
        hits &= toks[j : len(toks) - m + 1 + j] == t
    starts = np.flatnonzero(hits) + m
    if len(starts) != n_questions:
        raise ConfigError(f"data.score: answers found the answer marker {len(starts)} times "
                          f"in {n_questions} questions: tokenizer {tokenizer.name!r} does not "
                          "keep it whole; use data.tokenizer: word.")
    mask = np.zeros(len(toks), dtype=bool)
    for i in starts:
        while i < len(toks) and int(toks[i]) not in stop:
            mask[i] = True
            i += 1
    return mask


def rename_entities(text: str, rng: np.random.Generator,
                    classes: Iterable[Iterable[str]]) -> str:
    """`text` with the words of each class permuted among themselves, one draw per class.

    A whole-word rename keeps every fact and answer consistent (Mary's room is still the
    room the story says, under its new names), which is what makes it a fair augmentation.
    """
    mapping: dict[str, str] = {}
    for words in classes:
        words = list(words)
        mapping.update(zip(words, (words[i] for i in rng.permutation(len(words)))))
    return re.sub(r"[A-Za-z]+", lambda m: mapping.get(m.group(0), m.group(0)), text)


def questions(task: str, split: str, babi_dir: str | Path | None = None,
              val_fraction: float = VAL_FRACTION) -> tuple[BabiSample, ...]:
    """The questions of a split: 'train' and 'val' share the train file, cut at a story
    boundary (`split_train`); 'test' is the test file."""
    if split == "test":
        return load_task(task, "test", babi_dir)
    if split not in ("train", "val"):
        raise ConfigError(f"split must be 'train', 'val' or 'test', got {split!r}")
    return split_train(load_task(task, "train", babi_dir), split, val_fraction)


# ----------------------------------------------------------------------------------------
# synthetic qa1: runs everything end to end without bAbI files

_SYNTH_NAMES = ("Mary", "John", "Daniel", "Sandra")
_SYNTH_VERBS = ("went to", "moved to", "journeyed to", "travelled to", "went back to")


def synth_qa1_text(seed: int, n_stories: int) -> str:
    """Stories in bAbI file format: 5 blocks of (2 statements, 1 question) each.

    The answer to "Where is X?" is X's latest place and the support is the id of
    that statement, exactly the qa1 rule. Results on it are labelled synth-qa1
    and never compared with published bAbI numbers.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    lines: list[str] = []
    for _ in range(n_stories):
        where: dict[str, tuple[str, int]] = {}
        line_id = 0
        for _block in range(5):
            for _ in range(2):
                line_id += 1
                name = _SYNTH_NAMES[rng.integers(len(_SYNTH_NAMES))]
                verb = _SYNTH_VERBS[rng.integers(len(_SYNTH_VERBS))]
                place = _ROOMS[rng.integers(len(_ROOMS))]
                where[name] = (place, line_id)
                lines.append(f"{line_id} {name} {verb} the {place}.")
            line_id += 1
            seen = sorted(where)
            name = seen[rng.integers(len(seen))]
            place, support = where[name]
            lines.append(f"{line_id} Where is {name}? \t{place}\t{support}")
    return "\n".join(lines) + "\n"
