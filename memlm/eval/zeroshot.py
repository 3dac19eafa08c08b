"""Zero-shot multiple-choice evaluation through lm-evaluation-harness.

Two pieces:

* `MemlmLM`, an `lm_eval.api.model.LM` for any memlm model + memlm tokenizer.
  lm-eval hands it (context, continuation) strings; it returns the summed
  log-probability of the continuation and whether greedy decoding would have
  produced it. Sequences longer than the model's `context_len` are cut from the
  left for stateless models (every scored token keeps as much context as the
  window allows) and streamed segment by segment with the memory state carried
  for stateful ones, so a memory model really uses its memory. Every request
  starts from a fresh `init_state`.
* Local task definitions for ARC-Easy, PIQA, WinoGrande and HellaSwag, read
  from the JSONL files in `../shared/data/zeroshot/` and turned into lm-eval
  `ConfigurableTask`s, so lm-eval builds the requests and computes acc and
  acc_norm exactly as it does for its own tasks. Any other name is looked up in
  lm-eval's own task registry (which downloads from the Hugging Face hub).

    from memlm.eval.zeroshot import run_zeroshot
    run_zeroshot(model, tokenizer, ["arc_easy", "piqa"], limit=200)
    # {'arc_easy': {'acc': 0.41, 'acc_norm': 0.38, 'acc_stderr': 0.035, 'n': 200}, ...}

lm-eval is an optional dependency (`pip install -e ".[eval]"`); this module
imports without it and says so when it is needed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from memlm.errors import (
    DataError,
    MissingDependencyError,
    TokenizerMismatchError,
    UnknownNameError,
    closest,
)
from memlm.models.streaming import read_segments
from memlm.types import evaluating

try:
    from lm_eval.api.model import LM as _LMBase

    HAVE_LM_EVAL = True
except ImportError:  # the [eval] extra is not installed
    _LMBase = object  # type: ignore[assignment,misc]
    HAVE_LM_EVAL = False

INSTALL_HINT = 'pip install -e ".[eval]"'
ENV_DIR = "MEMLM_ZEROSHOT_DIR"
REPO = Path(__file__).resolve().parents[2]


def require_lm_eval() -> None:
    """Raise a clear error when lm-evaluation-harness is not installed."""
    if not HAVE_LM_EVAL:
        raise MissingDependencyError(
            "zero-shot evaluation needs lm-evaluation-harness (the `lm_eval` package), which "
            f"is not installed; install memlm's eval extra: {INSTALL_HINT}"
        )


# ----- the lm-eval adapter --------------------------------------------------------------------
@dataclass
class _Window:
    """One forward pass worth of scoring: logits at inputs[offset + i] predict targets[i]."""

    request: int
    inputs: list[int]
    offset: int
    targets: list[int]


class MemlmLM(_LMBase):
    """lm-eval's model interface over a memlm model and its tokenizer.

    batch_size: windows scored per forward pass (right-padded; a causal model's
        logits before the padding cannot depend on it, which `memlm audit` checks).
    precision: "fp32" (default, exact) or "bf16" (autocast; ~5x faster on CPU).
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8,
                 precision: str = "fp32", progress: bool = False):
        require_lm_eval()
        super().__init__()
        if tokenizer.vocab_size > model.config.vocab_size:
            raise TokenizerMismatchError(
                f"tokenizer {type(tokenizer).__name__} has {tokenizer.vocab_size} ids but the "
                f"model's vocab_size is {model.config.vocab_size}; use the tokenizer the model "
                "was trained with (saved in its run folder)."
            )
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.precision = precision
        self.progress = progress
        self.context_len = int(model.config.context_len)
        self.stateful = bool(getattr(model, "is_stateful", False))
        # lm-eval conditions an empty context (and rolling perplexity) on a prefix token
        eot = getattr(tokenizer, "eot_id", None)
        self.prefix_id = int(eot) if eot is not None else 0

    # ----- lm-eval's three request types -----------------------------------------------------
    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(log P(continuation | context), continuation is the greedy one) per request."""
        pairs = [self.encode_pair(*_args(r)[:2]) for r in requests]
        return self.score_pairs(pairs)

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        """Log-probability of each whole string, every token scored once, after the prefix token."""
        pairs = [([self.prefix_id], self.tok_encode(_args(r)[0])) for r in requests]
        return [ll for ll, _ in self.score_pairs(pairs)]

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy (or sampled) continuation of each context, cut at the first `until` string."""
        outputs = []
        for r in tqdm(requests, disable=not self.progress, desc="generate"):
            context, gen_kwargs = _args(r)[:2]
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            temperature = float(gen_kwargs.pop("temperature", 0.0))
            if not gen_kwargs.pop("do_sample", temperature > 0):
                temperature = 0.0
            ids = self.tok_encode(context) or [self.prefix_id]
            prompt = torch.tensor([ids[-(self.context_len - 1):]], device=self.device)
            stop = [self.tokenizer.eot_id] if self.tokenizer.eot_id is not None else []
            out = self.model.generate(prompt, max_new, temperature=temperature, stop_tokens=stop)
            new = [t for t in out[0, prompt.shape[1]:].tolist() if t not in stop]
            text = self.tokenizer.decode(new)
            for s in until:
                if s and s in text:
                    text = text[: text.index(s)]
            outputs.append(text)
        return outputs

    # ----- tokenisation ------------------------------------------------------------------------
    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, split the way lm-eval's HF model does.

        Trailing spaces of the context move to the continuation, and the pair is
        encoded as one string (BPE merges across the boundary as in real text);
        the continuation is what follows the context's own encoding.
        """
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        cont = whole[len(ctx):]
        if not ctx:
            ctx = [self.prefix_id]
        if not cont:  # a BPE merge swallowed the boundary: score the continuation alone
            cont = self.tok_encode(continuation)
        return ctx, cont

    # ----- scoring -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score_pairs(self, pairs: Sequence[tuple[list[int], list[int]]]
                    ) -> list[tuple[float, bool]]:
        """Summed log-prob and greedy flag of each continuation given its context (token ids)."""
        totals = [0.0] * len(pairs)
        greedy = [True] * len(pairs)
        windows: list[_Window] = []
        streamed: list[int] = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                continue
            full = list(ctx) + list(cont)
            if self.stateful and len(full) - 1 > self.context_len:
                streamed.append(i)
            else:
                windows.extend(self._windows(i, full, len(cont)))
        with evaluating(self.model):
            for w, lp, g in self._run_windows(windows):
                totals[w.request] += lp
                greedy[w.request] &= g
            for i in tqdm(streamed, disable=not self.progress, desc="stream"):
                totals[i], greedy[i] = self._score_streamed(list(pairs[i][0]) + list(pairs[i][1]),
                                                            len(pairs[i][1]))
        return list(zip(totals, greedy))

    def _windows(self, request: int, full: list[int], n_score: int) -> list[_Window]:
        """Cover the last n_score targets with windows of at most context_len inputs.

        Each block of up to context_len targets gets the longest left context
        that fits, so a long text is scored once per token (lm-eval's rolling
        scheme) and a long context is truncated from the left.
        """
        L, n = self.context_len, len(full)
        out = []
        for a in range(n - n_score, n, L):
            b = min(a + L, n)
            start = max(0, b - 1 - L)
            out.append(_Window(request, full[start : b - 1], a - 1 - start, full[a:b]))
        return out

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _run_windows(self, windows: list[_Window]):
        """Yield (window, log-prob, greedy) for windows batched longest first."""
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i].inputs))
        batches = [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, disable=not self.progress, desc="loglikelihood"):
            rows = [windows[i] for i in batch]
            width = max(len(w.inputs) for w in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            for r, w in enumerate(rows):
                ids[r, : len(w.inputs)] = torch.tensor(w.inputs)
            ids = ids.to(self.device)
            with self._autocast():
                logits = self.model(ids, state=self.model.init_state(len(rows), self.device)).logits
            for r, w in enumerate(rows):
                lp, g = _score(logits[r, w.offset : w.offset + len(w.targets)], w.targets)
                yield w, lp, g

    def _score_streamed(self, full: list[int], n_score: int) -> tuple[float, bool]:
        """Stateful model, text longer than its context: the one segment loop (the model's
        own segments, memory carried from a fresh state), scoring the last n_score tokens."""
        inputs = torch.tensor([full[:-1]], device=self.device)
        first = len(full) - 1 - n_score  # input position predicting the first scored token
        total, greedy = 0.0, True
        for step in read_segments(self.model, inputs, context=self._autocast):
            s, e = step.start, step.start + step.output.logits.shape[1]
            lo = max(first, s)
            if lo < e:
                lp, g = _score(step.output.logits[0, lo - s : e - s], full[lo + 1 : e + 1])
                total += lp
                greedy &= g
        return total, greedy


def _args(request: Any) -> tuple:
    """lm-eval Instances carry their arguments in `.args`; plain tuples are accepted too."""
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


def _score(logits: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    logp = logits.float().log_softmax(-1)
    t = torch.tensor(targets, device=logits.device)
    return logp.gather(-1, t[:, None]).sum().item(), bool((logp.argmax(-1) == t).all())


# ----- local task definitions -----------------------------------------------------------------
@dataclass(frozen=True)
class LocalTask:
    """A multiple-choice task read from one JSONL file of ../shared/data/zeroshot.

    The prompt functions reproduce lm-eval's own task YAMLs on the fields these
    files carry (query / choices / gold, or context_options / continuation / gold).
    """

    name: str
    file: str
    fields: tuple[str, ...]
    doc_to_text: Callable[[dict], Any]
    doc_to_choice: Callable[[dict], list[str]]
    doc_to_target: Callable[[dict], Any]
    metrics: tuple[str, ...] = ("acc", "acc_norm")


def _strip_one_space(s: str) -> str:
    return s[1:] if s.startswith(" ") else s


LOCAL_TASKS: dict[str, LocalTask] = {
    # lm-eval arc_easy: "Question: {q}\nAnswer:" + " " + choice
    "arc_easy": LocalTask(
        "arc_easy", "arc_easy.jsonl", ("query", "choices", "gold"),
        lambda d: d["query"] + "\nAnswer:", lambda d: list(d["choices"]), lambda d: d["gold"]),
    # lm-eval piqa: "Question: {goal}\nAnswer:" + " " + solution (the file's query ends in "\n")
    "piqa": LocalTask(
        "piqa", "piqa.jsonl", ("query", "choices", "gold"),
        lambda d: d["query"].rstrip("\n") + "\nAnswer:", lambda d: list(d["choices"]),
        lambda d: d["gold"]),
    # lm-eval hellaswag: preprocessed context + " " + ending (the file's endings carry the space)
    "hellaswag": LocalTask(
        "hellaswag", "hellaswag.jsonl", ("query", "choices", "gold"),
        lambda d: d["query"], lambda d: [_strip_one_space(c) for c in d["choices"]],
        lambda d: d["gold"]),
    # lm-eval winogrande (partial scoring): each option's context + " " + the shared rest;
    # doc_to_text returning the gold index is lm-eval's "multiple inputs" convention
    "winogrande": LocalTask(
        "winogrande", "winogrande.jsonl", ("context_options", "continuation", "gold"),
        lambda d: d["gold"], lambda d: list(d["context_options"]), lambda d: d["continuation"],
        metrics=("acc",)),
}


def resolve_zeroshot_dir(zeroshot_dir: str | Path | None = None) -> Path:
    """The folder of task JSONL files: the argument, else $MEMLM_ZEROSHOT_DIR, else
    ../shared/data/zeroshot relative to the working directory, then to the repository."""
    if zeroshot_dir is not None or os.environ.get(ENV_DIR):
        path = Path(zeroshot_dir if zeroshot_dir is not None else os.environ[ENV_DIR])
        where = "zeroshot_dir" if zeroshot_dir is not None else f"${ENV_DIR}"
        if not path.is_dir():
            raise DataError(f"zero-shot data folder {str(path)!r} (from {where}) does not exist; "
                            "point it at the folder holding arc_easy.jsonl, piqa.jsonl, ...")
        return path
    candidates = [Path.cwd() / ".." / "shared" / "data" / "zeroshot",
                  REPO.parent / "shared" / "data" / "zeroshot"]
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    raise DataError(
        "zero-shot data folder not found (looked in "
        f"{', '.join(str(p) for p in candidates)}); pass zeroshot_dir=... (CLI --zeroshot-dir) "
        f"or set ${ENV_DIR} to the folder holding arc_easy.jsonl, piqa.jsonl, hellaswag.jsonl, "
        "winogrande.jsonl."
    )


def load_items(task: str, zeroshot_dir: str | Path | None = None,
               limit: int | None = None) -> list[dict]:
    """The first `limit` items of a local task, each checked for the fields it needs."""
    spec = _local_spec(task)
    path = resolve_zeroshot_dir(zeroshot_dir) / spec.file
    if not path.is_file():
        raise DataError(f"{path} is missing; task {task!r} reads its items from {spec.file} in "
                        "the zero-shot data folder.")
    items = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no} is not valid JSON ({e}).") from e
            missing = [k for k in spec.fields if k not in item]
            if missing:
                raise DataError(f"{path}:{line_no} lacks field(s) {missing}; task {task!r} needs "
                                f"{list(spec.fields)}.")
            items.append(item)
    if not items:
        raise DataError(f"{path} holds no items.")
    return items


def _local_spec(task: str) -> LocalTask:
    if task not in LOCAL_TASKS:
        raise UnknownNameError(f"unknown local zero-shot task {task!r}.{closest(task, LOCAL_TASKS)}"
                               f" Local tasks: {', '.join(sorted(LOCAL_TASKS))}.")
    return LOCAL_TASKS[task]


def build_task(task: str, zeroshot_dir: str | Path | None = None, limit: int | None = None):
    """An lm-eval ConfigurableTask over the local JSONL items of `task`."""
    require_lm_eval()
    import datasets
    from lm_eval.api.task import ConfigurableTask

    spec = _local_spec(task)
    items = load_items(task, zeroshot_dir, limit)

    def dataset(**_: Any):
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})

    config = {
        "task": f"memlm_{spec.name}",
        "output_type": "multiple_choice",
        "custom_dataset": dataset,
        "test_split": "test",
        "doc_to_text": spec.doc_to_text,
        "doc_to_choice": spec.doc_to_choice,
        "doc_to_target": spec.doc_to_target,
        "target_delimiter": " ",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                        for m in spec.metrics],
        "metadata": {"version": 1.0, "source": str(resolve_zeroshot_dir(zeroshot_dir))},
    }
    with _quiet_lm_eval():  # lm-eval warns about custom datasets on every build
        return ConfigurableTask(config=config)


@contextlib.contextmanager
def _quiet_lm_eval():
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ----- running ---------------------------------------------------------------------------------
def evaluate_tasks(lm: Any, tasks: Sequence[str], limit: int | None = None,
                   zeroshot_dir: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Run `tasks` with an lm-eval LM (a MemlmLM or any lm_eval LM).

    A local task name (arc_easy, piqa, winogrande, hellaswag) reads the JSONL
    files; `lmeval:NAME` or any other name goes to lm-eval's task registry
    (needs the Hugging Face hub). Returns task -> {acc, acc_norm, acc_stderr, ..., n}.
    WinoGrande scores the same continuation after each option, so normalising
    by its length cannot change the choice: its acc_norm is its acc.
    """
    require_lm_eval()
    from lm_eval import evaluator

    results: dict[str, dict[str, float]] = {}
    for name in tasks:
        registry_name = name.removeprefix("lmeval:")
        if name in LOCAL_TASKS:
            task_dict = {f"memlm_{name}": build_task(name, zeroshot_dir, limit)}
            run_limit = None  # items were already cut to `limit`
        else:
            task_dict = _registry_tasks(registry_name)
            run_limit = limit
        with _quiet_lm_eval():
            out = evaluator.evaluate(lm, task_dict, limit=run_limit, bootstrap_iters=100,
                                     log_samples=False)
        for key, metrics in out["results"].items():
            label = name if name in LOCAL_TASKS else key
            row = {k.split(",")[0]: v for k, v in metrics.items()
                   if "," in k and isinstance(v, (int, float))}
            if name == "winogrande" and "acc" in row:
                row["acc_norm"] = row["acc"]
            samples = out.get("n-samples", {}).get(key, {})
            row["n"] = int(samples.get("effective", metrics.get("sample_len", 0)) or 0)
            results[label] = row
    return results


def _registry_tasks(name: str):
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager()
    if name not in manager.all_tasks:
        raise UnknownNameError(
            f"unknown zero-shot task {name!r}.{closest(name, list(LOCAL_TASKS) + manager.all_tasks)}"
            f" Local tasks: {', '.join(sorted(LOCAL_TASKS))}; other names come from lm-eval's "
            "registry (`lm-eval ls tasks`).")
    try:
        return get_task_dict([name], manager)
    except Exception as e:  # noqa: BLE001 - datasets/hub errors come in many types
        raise DataError(f"lm-eval task {name!r} could not load its dataset ({e}); registry tasks "
                        "download from the Hugging Face hub. Offline, use the local tasks "
                        f"{', '.join(sorted(LOCAL_TASKS))}.") from e


def run_zeroshot(model: Any, tokenizer: Any, tasks: Sequence[str], limit: int | None = None,
                 zeroshot_dir: str | Path | None = None, batch_size: int = 8,
                 precision: str = "fp32", progress: bool = False
                 ) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy of a memlm model on `tasks`: task -> {acc, acc_norm, n, ...}.

    acc picks the choice with the highest summed log-probability; acc_norm
    divides it by the choice's length first (lm-eval's definitions and code).
    """
    require_lm_eval()
    lm = MemlmLM(model, tokenizer, batch_size=batch_size, precision=precision,
                 progress=progress)
    return evaluate_tasks(lm, tasks, limit=limit, zeroshot_dir=zeroshot_dir)


def format_zeroshot(results: dict[str, dict[str, float]]) -> str:
    """A small table: task, n, acc, acc_norm."""
    lines = [f"{'task':<14} {'n':>6} {'acc':>7} {'acc_norm':>9}"]
    for task, row in results.items():
        acc, norm = row.get("acc"), row.get("acc_norm")
        lines.append(f"{task:<14} {row.get('n', 0):>6} "
                     f"{'-' if acc is None else f'{acc:.4f}':>7} "
                     f"{'-' if norm is None else f'{norm:.4f}':>9}")
    return "\n".join(lines)


__all__ = ["HAVE_LM_EVAL", "LOCAL_TASKS", "MemlmLM", "build_task", "evaluate_tasks",
           "format_zeroshot", "load_items", "require_lm_eval", "resolve_zeroshot_dir",
           "run_zeroshot"]
