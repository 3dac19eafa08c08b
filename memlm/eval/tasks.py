"""`memlm eval --tasks ppl,babilong:qa1@0k,1k,zeroshot:piqa`: one evaluation per task.

A task string names its kind before the first ':' (`ppl` has no options); the kind
picks one scoring function of this package:

    ppl               perplexity (memlm/eval/perplexity.py) on held-out tokens
    babilong:TASKS@LENGTHS   BABILong accuracy per context length (memlm/eval/babilong.py)
    zeroshot:NAME[+NAME]     multiple-choice accuracy (memlm/eval/zeroshot.py)

A new benchmark adds one entry to TASK_KINDS. The list grammar (where a comma starts a
new task) is memlm.specs.split_eval_tasks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memlm.errors import unknown_name
from memlm.specs import split_eval_tasks


@dataclass
class EvalOptions:
    """The knobs of every task kind (each kind reads its own; defaults are the CLI's)."""

    seq_len: int | None = None  # ppl: tokens per window (None: the model's context)
    stride: int | None = None  # ppl: sliding-window stride (None: seq_len)
    batch_size: int = 8  # ppl: windows per batch
    max_batches: int | None = None  # ppl: stop early (bits/byte then counts the prefix)
    precision: str = "auto"  # ppl: auto, bf16, fp32
    samples: int = 50  # babilong: samples per length
    seed: int = 0  # babilong: sampling seed
    babi: str | None = None  # babilong: bAbI v1.2 folder
    background: str | None = None  # babilong: background text file
    limit: int | None = None  # zeroshot: items per task
    zeroshot_dir: str | None = None  # zeroshot: folder of task JSONL files

    @classmethod
    def from_object(cls, obj: Any) -> EvalOptions:
        """The options found as attributes of `obj` (e.g. parsed CLI flags); others default."""
        return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)
                      if hasattr(obj, f.name)})


def _ppl(model: Any, tokenizer: Any, task: str, opts: EvalOptions,
         tokens: Callable[[], Any]) -> dict[str, Any]:
    from memlm.eval.perplexity import evaluate

    # bits_per_byte counts the bytes of the tokens scored (a prefix with max_batches)
    return {"ppl": evaluate(model, tokens(), seq_len=opts.seq_len or model.config.context_len,
                            batch_size=opts.batch_size, stride=opts.stride,
                            max_batches=opts.max_batches, tokenizer=tokenizer,
                            precision=opts.precision, progress=True)}


def _babilong(model: Any, tokenizer: Any, task: str, opts: EvalOptions,
              tokens: Callable[[], Any]) -> dict[str, Any]:
    from memlm.eval.babilong import evaluate_babilong, parse_task_spec

    name, lengths = parse_task_spec(task)
    return {task: evaluate_babilong(model, tokenizer, name, lengths, n_samples=opts.samples,
                                    seed=opts.seed, babi_dir=opts.babi,
                                    background=opts.background)}


def _zeroshot(model: Any, tokenizer: Any, task: str, opts: EvalOptions,
              tokens: Callable[[], Any]) -> dict[str, Any]:
    from memlm.eval.zeroshot import run_zeroshot

    names = task.split(":", 1)[1].split("+")
    return run_zeroshot(model, tokenizer, names, limit=opts.limit, zeroshot_dir=opts.zeroshot_dir)


#: task kind (the text before ':') -> scorer(model, tokenizer, task, options, tokens) -> results
TASK_KINDS: dict[str, Callable[..., dict[str, Any]]] = {
    "ppl": _ppl, "babilong": _babilong, "zeroshot": _zeroshot,
}
_USAGE = ["ppl", "babilong:TASK@LENGTHS", "zeroshot:NAME"]


def run_tasks(model: Any, tokenizer: Any, tasks: str | None, options: EvalOptions,
              ppl_tokens: Callable[[], Any]) -> dict[str, Any]:
    """Evaluate `model` on every task of the list (default: ppl); results by task name.

    `ppl_tokens()` returns the held-out token ids, called only when ppl is asked for
    (reading a run's validation split is not free).
    """
    results: dict[str, Any] = {}
    for task in split_eval_tasks(tasks) if tasks else ["ppl"]:
        kind, colon, _ = task.partition(":")
        scorer = TASK_KINDS.get(kind)
        if scorer is None or (kind == "ppl") == bool(colon):  # ppl takes no options
            raise unknown_name("eval task", task, _USAGE)
        results.update(scorer(model, tokenizer, task, options, ppl_tokens))
    return results


def format_results(results: dict[str, Any]) -> str:
    """The plain-text block `memlm eval` and `memlm stream` print: one section per result."""
    lines = []
    for name, value in results.items():
        lines.append(f"== {name}")
        if isinstance(value, dict):
            lines += [f"  {k:<22} {v:.4f}" if isinstance(v, float) else f"  {k:<22} {v}"
                      for k, v in value.items()]
        else:
            lines.append(f"  {value}")
    return "\n".join(lines)
