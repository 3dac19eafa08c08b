"""BABILong evaluation: accuracy of any memlm model at growing context lengths.

    table = evaluate_babilong(model, tokenizer, "qa1", "0k,1k,4k", n_samples=100)
    print(table)                       # task x length accuracy, with notes
    table.accuracy("qa1", 4000)        # 0-100

Each sample's prompt is `context + question + "GEN"`; the model's answer is
generated greedily (up to 10 tokens, stopping at eos) and scored by normalised
exact match (case, surrounding whitespace, one trailing period and spaces
around commas do not matter; word order does). Label match, the reference's
rule for prompted models, is reported as a secondary number.

How each kind of model reads a prompt longer than its window:

* a stateful model (RMT/ARMT, DNC, ...) reads the prompt segment by segment
  with its memory carried, under memlm's one protocol (`prompt_segments`): the
  context is cut into segments that end where the question starts, so the final
  segment is the question and marker at every length, exactly as in training;
  it then generates in that segment with the carried memory;
* a dense model sees only the last `context_len - 10` tokens of the prompt (10
  positions stay free for the answer; the training rows are cut the same way).
  The table says so, because then a miss is not a memory failure but a window one.

`mode="score"` replaces generation by one teacher-forced pass (correct when
every answer token and the eos are the argmax): the same verdict as greedy
exact match for answers without case or punctuation variants, and cheaper.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from memlm.data.babi import TASK_LABELS
from memlm.data.babilong import (
    MARKER,
    BabilongBuilder,
    BabilongSample,
    dense_view,
    expand_tasks,
    prompt_segments,
)
from memlm.data.background import load_background
from memlm.errors import ConfigError
from memlm.models.streaming import read_segments, segment_length
from memlm.specs import length_name, parse_lengths
from memlm.types import evaluating

DEFAULT_LENGTHS = (0, 1000, 4000)
QA1_5 = ("qa1", "qa2", "qa3", "qa4", "qa5")

# ----------------------------------------------------------------------------------------
# task specs: "babilong:qa1@0k,1k,4k"


class BabilongTaskSpec(NamedTuple):
    task: str  # "qa1", or several joined by "+" ("qa1+qa2")
    lengths: list[int]


def parse_task_spec(spec: str) -> BabilongTaskSpec:
    """'babilong:qa1@0k,1k,4k' -> ('qa1', [0, 1000, 4000]).

    Several tasks join with '+' ('babilong:qa1+qa2@1k') or form a range
    ('babilong:qa1-qa5@1k'); without '@' the lengths are 0k, 1k and 4k.
    """
    head, sep, rest = spec.strip().partition(":")
    if head != "babilong" or not sep:
        raise ConfigError(f"{spec!r} is not a BABILong task; write e.g. babilong:qa1@0k,1k,4k")
    tasks, at, lengths = rest.partition("@")
    names = expand_tasks(tasks.replace(",", "+") if tasks else "qa1")
    parsed = parse_lengths(lengths) if at else list(DEFAULT_LENGTHS)
    if not parsed:
        raise ConfigError(f"{spec!r} lists no length after '@'; write e.g. @0k,1k,4k")
    return BabilongTaskSpec("+".join(names), parsed)


# ----------------------------------------------------------------------------------------
# scoring


def normalize_answer(text: str) -> str:
    """Lower-case, strip, drop one trailing '.', collapse spaces, no spaces around commas."""
    s = text.lower().strip()
    if s.endswith("."):
        s = s[:-1]
    s = " ".join(s.split())
    return re.sub(r"\s*,\s*", ",", s).strip()


def extract_prediction(pred_ids: Sequence[int], tokenizer, eos: int | None = None,
                       marker: str = MARKER) -> str:
    """The answer text of a generated continuation: cut at eos, then at the first
    newline, then keep what follows the last answer marker, if any."""
    ids = [int(i) for i in pred_ids]
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    text = tokenizer.decode(ids).split("\n", 1)[0]
    if marker and marker in text:
        text = text.rsplit(marker, 1)[1]
    return text


def exact_match(prediction: str, target: str) -> bool:
    """The primary BABILong metric (order of multi-part answers matters)."""
    return normalize_answer(prediction) == normalize_answer(target)


def label_match(output: str, target: str, question: str, labels: Sequence[str]) -> bool:
    """The reference's label rule for prompted models, kept for comparability.

    Labels are found as substrings of the output's first sentence (so "no"
    matches inside "north"), labels that occur in the question are ignored, and
    the answer is right iff exactly the target's labels remain.
    """
    out = output.lower().split(".")[0]
    out = out.split("<context>")[0].split("<example>")[0]
    out = out.split("Question")[0]  # never matches after lower-casing; kept as in the reference
    labels = {label.lower() for label in labels}
    found = {label for label in labels if label in out}
    found -= {label for label in labels if label in question.lower()}
    target = target.lower()
    if "," in target and len(target) > 3:
        parts = target.split(",")
        return all(p in found for p in parts) and len(found) == len(parts)
    return target in found and len(found) == 1


# ----------------------------------------------------------------------------------------
# results


@dataclass
class LengthResult:
    """Accuracy of one (task, length) cell."""

    task: str
    length: int
    C: int
    n_evaluated: int = 0
    n_skipped: int = 0
    correct: int = 0
    label_correct: int = 0
    depth_n: list[int] = field(default_factory=lambda: [0] * 10)  # samples per depth decile
    depth_correct: list[int] = field(default_factory=lambda: [0] * 10)
    # samples and hits by statements after the last supporting one: 0, 1, 2 or more
    recency_n: list[int] = field(default_factory=lambda: [0] * 3)
    recency_correct: list[int] = field(default_factory=lambda: [0] * 3)
    prompt_tokens: int = 0  # longest prompt
    visible_tokens: int = 0  # how many of them the model attended to directly

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / max(self.n_evaluated, 1)

    @property
    def label_accuracy(self) -> float:
        return 100.0 * self.label_correct / max(self.n_evaluated, 1)

    def add(self, sample: BabilongSample, em: bool, lm: bool) -> None:
        self.n_evaluated += 1
        self.correct += int(em)
        self.label_correct += int(lm)
        decile = min(int(sample.support_depth * 10), 9)
        self.depth_n[decile] += 1
        self.depth_correct[decile] += int(em)
        after = sample.statements_after_support
        if after is not None:
            self.recency_n[min(after, 2)] += 1
            self.recency_correct[min(after, 2)] += int(em)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task, "length": self.length, "length_name": length_name(self.length),
            "C": self.C, "accuracy": self.accuracy, "label_accuracy": self.label_accuracy,
            "n_evaluated": self.n_evaluated, "n_skipped": self.n_skipped,
            "depth_n": self.depth_n, "depth_correct": self.depth_correct,
            "recency_n": self.recency_n, "recency_correct": self.recency_correct,
            "prompt_tokens": self.prompt_tokens, "visible_tokens": self.visible_tokens,
        }


@dataclass
class BabilongTable:
    """Accuracy per task and length, with what is needed to read it honestly."""

    rows: list[LengthResult]
    model: str
    background: str
    split: str
    mode: str
    seed: int
    notes: list[str] = field(default_factory=list)

    def tasks(self) -> list[str]:
        return list(dict.fromkeys(r.task for r in self.rows))

    def lengths(self) -> list[int]:
        return list(dict.fromkeys(r.length for r in self.rows))

    def cell(self, task: str, length: int) -> LengthResult:
        for r in self.rows:
            if r.task == task and r.length == length:
                return r
        raise KeyError(f"no result for {task} at {length_name(length)}")

    def accuracy(self, task: str, length: int | str) -> float:
        return self.cell(task, parse_lengths([length])[0]).accuracy

    def mean_accuracy(self, length: int | str) -> float:
        """Mean over the evaluated tasks at one length (the BABILong score for qa1-qa5)."""
        length = parse_lengths([length])[0]
        accs = [r.accuracy for r in self.rows if r.length == length]
        return float(np.mean(accs))

    def by_length(self) -> dict[str, float]:
        return {length_name(n): self.mean_accuracy(n) for n in self.lengths()}

    def to_dict(self) -> dict[str, Any]:
        out = {
            "model": self.model, "background": self.background, "split": self.split,
            "mode": self.mode, "seed": self.seed, "notes": self.notes,
            "by_length": self.by_length(), "rows": [r.to_dict() for r in self.rows],
        }
        if tuple(self.tasks()) == QA1_5:
            out["babilong_score"] = out["by_length"]
            out["babilong_avg"] = float(np.mean(list(out["by_length"].values())))
        return out

    def to_csv(self) -> str:
        lines = ["task,length,C,accuracy,label_accuracy,n_evaluated,n_skipped"]
        for r in self.rows:
            lines.append(f"{r.task},{length_name(r.length)},{r.C},{r.accuracy:.2f},"
                         f"{r.label_accuracy:.2f},{r.n_evaluated},{r.n_skipped}")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        lengths = self.lengths()
        head = f"{'task':<10}" + "".join(f"{length_name(n):>9}" for n in lengths)
        lines = [f"BABILong exact match (%), model {self.model}, background {self.background}, "
                 f"split {self.split}, mode {self.mode}", head]
        for task in self.tasks():
            cells = []
            for n in lengths:
                try:
                    cells.append(f"{self.cell(task, n).accuracy:>9.1f}")
                except KeyError:
                    cells.append(f"{'-':>9}")
            lines.append(f"{task:<10}" + "".join(cells))
        if len(self.tasks()) > 1:
            name = "score" if tuple(self.tasks()) == QA1_5 else "mean"
            lines.append(f"{name:<10}" + "".join(f"{self.mean_accuracy(n):>9.1f}"
                                                 for n in lengths))
        n_eval = sorted({r.n_evaluated for r in self.rows})
        skipped = sum(r.n_skipped for r in self.rows)
        lines.append(f"samples per cell: {','.join(map(str, n_eval))}; skipped (facts do not "
                     f"fit): {skipped}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# running a model


def _consume_prefix(model, prompt: torch.Tensor, C: int, reset_memory: bool = False
                    ) -> tuple[Any, torch.Tensor]:
    """Feed a stateful model the context segments of `prompt` (memlm's protocol,
    `prompt_segments`: segments end where the question starts); return the
    carried state and the final segment (question + marker).

    `reset_memory=True` is the control that proves the memory does the work: each
    segment starts from the initial state, so the question segment sees nothing.
    """
    bounds = prompt_segments(C, prompt.shape[1], segment_length(model))
    # the protocol fixes the cuts (the context ends where the question starts, only the
    # first segment may be short); the one segment loop reads them, memory carried or reset
    context = ((prompt[:, a:b], None, a) for a, b in bounds[:-1])
    state = model.init_state(prompt.shape[0], prompt.device)
    for step in read_segments(model, context, state, reset_memory=reset_memory):
        state = step.state
    if reset_memory:  # a sliding window (RMT/ARMT) is context, not memory: it stays
        forget = getattr(model, "forget_memory", None)
        state = (forget(state, prompt.shape[0], prompt.device) if forget is not None
                 else model.init_state(prompt.shape[0], prompt.device))
    return state, prompt[:, C:]


@torch.no_grad()
def _generate(model, prompt: torch.Tensor, C: int, eos: int, max_new_tokens: int,
              reset_memory: bool = False) -> torch.Tensor:
    """Greedy continuation ids [B, <= max_new_tokens] of each prompt row."""
    if model.is_stateful:
        state, tail = _consume_prefix(model, prompt, C, reset_memory)
        out = model.generate(tail, max_new_tokens, state=state, stop_tokens=[eos])
    else:
        tail = prompt[:, dense_view(prompt.shape[1], int(model.config.context_len)):]
        out = model.generate(tail, max_new_tokens, stop_tokens=[eos])
    return out[:, tail.shape[1]:]


@torch.no_grad()
def _teacher_forced(model, prompt: torch.Tensor, C: int, answer: torch.Tensor,
                    reset_memory: bool = False) -> torch.Tensor:
    """Argmax predictions [B, |answer|] at the answer positions (answer ends with eos)."""
    n = answer.shape[1]
    if model.is_stateful:
        state, tail = _consume_prefix(model, prompt, C, reset_memory)
        x = torch.cat([tail, answer[:, :-1]], dim=1)
        logits = model(x, state=state).logits
    else:
        start = dense_view(prompt.shape[1], int(model.config.context_len))
        x = torch.cat([prompt[:, start:], answer[:, :-1]], dim=1)
        logits = model(x).logits
    return logits[:, -n:].argmax(-1)


def evaluate_babilong(
    model,
    tokenizer,
    task: str | Sequence[str],
    lengths: str | Sequence[int | str] = DEFAULT_LENGTHS,
    n_samples: int = 100,
    seed: int = 0,
    split: str = "test",
    *,
    background: str | Path | None = None,
    background_format: str | None = None,
    babi_dir: str | Path | None = None,
    batch_size: int = 8,
    mode: str = "generate",
    max_new_tokens: int = 10,
    precision: str = "fp32",
    records: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    builder: BabilongBuilder | None = None,
    reset_memory: bool = False,
) -> BabilongTable:
    """Accuracy of `model` on BABILong `task` at each length (see the module docstring).

    task: 'qa1', 'qa1+qa2', 'qa1-qa5' or a list. lengths: named lengths ('0k,1k,4k' or
    ints in tokens; 0 = facts only, X > 0 gives X - 300 context tokens). The first
    `n_samples` questions of the bAbI *test* file that fit are used. background: a
    text corpus (file/folder) or None for the built-in filler. records: a JSONL path
    for one record per sample. precision 'bf16' runs under CPU/GPU autocast.
    reset_memory: the control run, a stateful model's memory is reset before every
    segment (it should fall to chance once the facts are outside the last segment).
    """
    if mode not in ("generate", "score"):
        raise ConfigError(f"mode must be 'generate' or 'score', got {mode!r}")
    from memlm.nn.precision import autocast_context

    tasks = expand_tasks(task)
    lengths = parse_lengths(lengths)
    if builder is None:
        bg = load_background(background, tokenizer, seed=seed, fmt=background_format,
                             cache_dir=cache_dir)
        builder = BabilongBuilder(tokenizer, bg, seed=seed, babi_dir=babi_dir)
    eos = builder.eos
    device = next(model.parameters()).device
    arch = getattr(model.config, "arch", type(model).__name__)
    ctx_len = int(model.config.context_len)
    table = BabilongTable([], model=f"{arch} (context_len {ctx_len})",
                          background=builder.background.name, split=split, mode=mode, seed=seed)
    if builder.background.name == "filler":
        table.notes.append("background: memlm's generated filler, not PG19; not directly "
                           "comparable with published BABILong numbers")
    if any(t.startswith("synth") for t in tasks):
        table.notes.append("synth-qa1 is memlm's generated stand-in for qa1, not bAbI")
    if model.is_stateful:
        table.notes.append(f"stateful model: prompts read in segments of {segment_length(model)} "
                           "tokens ending where the question starts, memory "
                           + ("RESET before every segment (control)" if reset_memory
                              else "carried"))

    out_records = open(records, "w") if records is not None else None  # noqa: SIM115
    with evaluating(model):
        for t in tasks:
            for length in lengths:
                es = builder.eval_set(t, length, n_samples, split)
                row = LengthResult(t, length, es.C, n_skipped=es.n_skipped)
                # equal prompt (and answer) lengths batch together without padding
                groups: dict[tuple[int, int, int], list[BabilongSample]] = defaultdict(list)
                for s in es.samples:
                    key = (len(s.prompt()), len(s.context),
                           len(s.answer_ids) if mode == "score" else 0)
                    groups[key].append(s)
                batches = [g[i:i + batch_size] for g in groups.values()
                           for i in range(0, len(g), batch_size)]
                it = batches
                if progress:
                    from tqdm.auto import tqdm

                    it = tqdm(batches, desc=f"babilong {t}@{length_name(length)}", leave=False)
                for group in it:
                    prompt = torch.from_numpy(np.stack([s.prompt() for s in group]).astype(
                        np.int64)).to(device)
                    C = len(group[0].context)
                    row.prompt_tokens = max(row.prompt_tokens, prompt.shape[1])
                    seen = (prompt.shape[1] if model.is_stateful
                            else prompt.shape[1] - dense_view(prompt.shape[1], ctx_len))
                    row.visible_tokens = max(row.visible_tokens, seen)
                    with autocast_context(device, precision):
                        if mode == "generate":
                            new = _generate(model, prompt, C, eos, max_new_tokens,
                                            reset_memory).tolist()
                        else:
                            ans = torch.from_numpy(np.stack([
                                np.append(s.answer_ids, eos) for s in group]).astype(np.int64)
                            ).to(device)
                            new = _teacher_forced(model, prompt, C, ans, reset_memory).tolist()
                    for s, ids in zip(group, new):
                        pred = extract_prediction(ids, tokenizer, eos)
                        if mode == "score":
                            want = np.append(s.answer_ids, eos).tolist()
                            em = ids == want
                        else:
                            em = exact_match(pred, s.babi.answer)
                        lm = label_match(pred, s.babi.answer, s.babi.question,
                                         TASK_LABELS.get(t, ()))
                        row.add(s, em, lm)
                        if out_records is not None:
                            out_records.write(json.dumps(_record(s, pred, em, lm, table,
                                                                 tokenizer)) + "\n")
                table.rows.append(row)
                if not model.is_stateful and row.prompt_tokens > row.visible_tokens:
                    table.notes.append(
                        f"{t}@{length_name(length)}: prompts of up to {row.prompt_tokens} tokens "
                        f"exceed the dense model's view; it saw only the last "
                        f"{row.visible_tokens} tokens of each")
        if out_records is not None:
            out_records.close()
    return table


def _record(s: BabilongSample, pred: str, em: bool, lm: bool, table: BabilongTable,
            tokenizer) -> dict[str, Any]:
    fp = getattr(tokenizer, "fingerprint", None)
    return {
        "task": s.task, "split": s.split, "length_name": length_name(s.length or 0), "C": s.C,
        "sample_index": s.babi.sample_index, "story_index": s.babi.story_index,
        "n_facts": len(s.babi.facts), "fact_offsets": list(map(int, s.fact_offsets)),
        "support_offsets": list(map(int, s.support_offsets)), "support_depth": s.support_depth,
        "question": s.babi.question, "target": s.babi.answer, "prediction": pred,
        "exact_match": bool(em), "label_match": bool(lm), "background": table.background,
        "background_wraps": s.background_wraps, "model": table.model,
        "tokenizer": fp() if callable(fp) else type(tokenizer).__name__,
    }


def _background_texts(background: str | Path | None, n: int = 2000) -> list[str]:
    """Up to n sentences of a background's evaluation text (for token-ratio estimates)."""
    from memlm.data.background import corpus_files, corpus_sentences
    from memlm.data.filler import filler_sentence

    if background is None or str(background) == "filler":
        return [filler_sentence(1, k) for k in range(n)]  # the evaluation filler (seed 2*0+1)
    sentences = corpus_sentences(corpus_files(background))
    return sentences[int(0.9 * len(sentences)):][:n]


def gpt2_lengths(tokenizer, background: str | Path | None, task: str, lengths: Sequence[int],
                 *, babi_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                 gpt2_dir: str | Path | None = None, n_samples: int = 5,
                 seed: int = 0) -> dict[int, dict[str, float | None]]:
    """What each named length is in the model's tokens and in GPT-2 tokens.

    A named length counts the evaluated model's tokens (C = X - 300 context tokens),
    while the BABILong paper counts GPT-2 tokens; with a word or byte tokenizer the two
    differ. For each length this builds `n_samples` test prompts and reports their mean
    length in model tokens and in GPT-2 tokens: facts, question and marker are
    GPT-2-tokenised exactly; background tokens are converted with the background's
    measured GPT-2/model token ratio (words hashed into buckets cannot be decoded, so
    the exact text is not available). gpt2_tokens is None without GPT-2's BPE files
    (../shared/data/gpt2-bpe or `gpt2_dir`).
    """
    from memlm.data.tokenizers import make_tokenizer

    folder = Path(gpt2_dir) if gpt2_dir is not None else None
    if folder is None:
        for cand in (Path.cwd().parent / "shared" / "data" / "gpt2-bpe",
                     Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gpt2-bpe"):
            if cand.is_dir():
                folder = cand
                break
    gpt2 = make_tokenizer(f"gpt2:{folder}") if folder is not None and folder.is_dir() else None
    ratio = None
    if gpt2 is not None:
        texts = _background_texts(background)
        ratio = (sum(len(gpt2.encode(" " + t)) for t in texts)
                 / max(1, sum(len(tokenizer.encode(" " + t)) for t in texts)))
    bg = load_background(background, tokenizer, seed=seed, cache_dir=cache_dir)
    builder = BabilongBuilder(tokenizer, bg, seed=seed, babi_dir=babi_dir)
    out: dict[int, dict[str, float | None]] = {}
    for length in lengths:
        es = builder.eval_set(task, length, n_samples)
        model_tok, gpt_tok = [], []
        for smp in es.samples:
            model_tok.append(len(smp.prompt()))
            if gpt2 is None or ratio is None:
                continue
            facts = sum(len(gpt2.encode(" " + f)) for f in smp.babi.facts)
            fact_model = sum(len(f) for f in builder.fact_ids(smp.babi))
            tail = len(gpt2.encode(" " + smp.babi.question)) + len(gpt2.encode(MARKER))
            gpt_tok.append(facts + ratio * (smp.C - fact_model) + tail)
        out[length] = {"model_tokens": float(np.mean(model_tok)),
                       "gpt2_tokens": float(np.mean(gpt_tok)) if gpt_tok else None,
                       "gpt2_per_token": ratio}
    return out


__all__ = [
    "BabilongTable", "BabilongTaskSpec", "LengthResult", "evaluate_babilong", "exact_match",
    "gpt2_lengths",
    "extract_prediction", "label_match", "normalize_answer", "parse_task_spec",
]
