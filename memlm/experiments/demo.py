"""`memlm demo`: the main job on built-in data, offline, on a laptop CPU.

It trains a tiny dense baseline and a tiny model of every registered memory
architecture on generated recall text (a fact is stated, then asked for one to three
attention windows later), with the same data, steps, batch and seed for all, then
prints the verdict table (exact-answer recall beyond the window with its Wilson
interval, z against the baseline and against chance), the comparison (validation
loss, recall, speed), recall by distance and memory-health numbers, and writes an
HTML report. The verdict is computed from the measured numbers; where a memory model
does not beat the baseline, it says so, and architectures that keep nothing from one
window to the next (GMT, TMT) are listed with that reason.

Why the task looks the way it does (measured, see docs/demo.md):

* A few minutes of CPU are about a thousand optimizer steps of a ~130k-parameter
  model. Carrying a value across segments is a two-hop skill (write it, read it
  back); it is learned more reliably when the one-hop part is learned first. So half
  of the training facts are asked inside the 16-token window, where attention alone
  answers them; the memory then only has to carry the value that attention already
  knows how to use. Scoring asks only facts 1.2-2.8 windows back.
* One fact open at a time, one-digit values, filler from two words per slot and a
  word-level BPE tokenizer keep the rest of the text easy.
* Stateful models train on 4-segment episodes from a fresh memory (the RMT paper's
  regime), back-propagating through all four, so the gradient from an answer reaches
  the segment of its fact; they are scored on the same episode shape.

Speed: every model here is tiny, so CPU time goes into per-operation overhead, not
arithmetic. The demo trains in fp32 with one thread per model and two models at a time
in separate processes; `precision` and `threads` can be changed to check that the
result does not depend on the summation order (benchmarks/demo_robustness.py).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from memlm.config import DataConfig, TrainConfig
from memlm.errors import ConfigError
from memlm.eval.recall import BUCKETS
from memlm.experiments.compare import ArchRuns, run_comparison, summarise
from memlm.inspect.fmt import sig3, wilson
from memlm.registry import ARCHITECTURES

#: attention window in tokens, also the stateful models' segment length
WINDOW = 16
TOKENIZER = "bpe:400"
#: the recall text (`recall_stream` options). One fact is open at a time (the answer is the
#: most recently stated value) and a one-digit value (1-9) makes chance 1 in 9. Far gaps are
#: 60-140 characters, about 19-44 tokens: 1.2-2.8 windows back. In the TRAINING text half of
#: the facts are asked again right away (28-36 characters, inside the window): there a dense
#: model learns the local skill "the answer is the value stated for this name", and the
#: memory models then only have to learn to carry the value across segments. Without these
#: near facts (the previous demo, 8-token window) memory learned the recall on some seeds and
#: CPUs and not on others.
TRAIN_RECALL = dict(gap_range=(60, 140), near_range=(28, 36), near_fraction=0.5, max_open=1,
                    digits=1, fact_prob=1.0, filler_words=2)
#: scoring text: the same generator with another seed and only far facts
EVAL_RECALL = dict(TRAIN_RECALL, near_fraction=0.0)
RECALL_SEED = 12345  # scoring text is generated from its own seed: never seen in training
#: a d-digit value is drawn uniformly from 9 * 10^(d-1) numbers (no leading zero)
CHANCE = 1.0 / (9 * 10 ** (TRAIN_RECALL["digits"] - 1))


@dataclass(frozen=True)
class DemoMode:
    steps: int
    batch_size: int
    bptt_window: int  # segments a stateful model back-propagates through per step
    lr: float
    eval_batches: int
    train_chars: int
    recall_rows: int  # independent scoring streams, read as one batch
    recall_chars: int  # characters per scoring stream
    #: "episodes": each step a stateful model reads `bptt_window` segments from a fresh
    #: memory (and is scored the same way); "stream": memory carried along long rows
    layout: str = "stream"
    #: training processes (None: one per core, at most two); the CI mode trains in-process,
    #: where starting a worker (importing torch) costs more than its 20 steps
    workers: int | None = None
    #: "fp32" or "bf16" (autocast), for training and scoring
    precision: str = "fp32"
    #: torch threads per training process
    threads: int = 1
    #: segment-count curriculum of the stateful models: leading stages (share of `steps`,
    #: segments per episode), the remaining steps at `bptt_window` segments (empty: all).
    #: Short episodes first let attention learn the in-window skill before the memory has
    #: to carry anything (the RMT/ARMT papers' curriculum)
    curriculum: tuple[tuple[float, int], ...] = ()
    #: which training targets carry the loss: "answers" (the recall answers only, as QA
    #: fine-tuning scores only the answer) or "all" (language modelling of the whole text,
    #: the demo before this setting: the recall is then ~4% of the tokens, the rest filler and
    #: unpredictable fact values, and memory learned it on some seeds only; docs/demo.md)
    score: str = "answers"

    def stages(self) -> list[dict[str, int]]:
        """`train.curriculum` stages for the trainer ([] without a curriculum)."""
        if not self.curriculum:
            return []
        out, used = [], 0
        for share, segments in self.curriculum:
            n = max(1, round(share * self.steps))
            out.append({"steps": n, "bptt_window": segments})
            used += n
        if used >= self.steps:
            raise ConfigError(f"the demo curriculum {self.curriculum} leaves no steps of the "
                              f"{self.steps} for the final {self.bptt_window}-segment stage.")
        return out + [{"steps": self.steps - used, "bptt_window": self.bptt_window}]


MODES = {
    "full": DemoMode(steps=1000, batch_size=32, bptt_window=4, lr=3e-3, eval_batches=16,
                     train_chars=20_000, recall_rows=96, recall_chars=1600, layout="episodes"),
    "ci": DemoMode(steps=20, batch_size=8, bptt_window=4, lr=3e-3, eval_batches=2,
                   train_chars=20_000, recall_rows=8, recall_chars=600, layout="episodes",
                   workers=1),
}

BASE_MODEL = dict(n_layer=2, n_head=4, d_model=64, context_len=WINDOW, dropout=0.0)

#: every field of the segment-recurrent wrappers that the demo relies on, set here for any
#: architecture whose config has them, so a change of a library default cannot move the demo's
#: result; the segment is the demo's window
_RECURRENT = dict(segment_len=WINDOW, backbone="gpt", trainable="all", bptt_depth=-1,
                  segment_alignment="left", output_only_last_segment=False,
                  loss_from_first_segment=True)


def arch_overrides(arch: str) -> dict[str, Any]:
    """Config overrides of the demo's tiny `arch` on top of BASE_MODEL.

    The wrapper fields above where the config has them, then the architecture's own tiny
    settings, declared at its registration (`ArchSpec.tiny`: memory sizes, local windows).
    Each keeps the shared backbone size, so parameter counts stay comparable.
    """
    spec = ARCHITECTURES.get(arch)
    names = {f.name for f in fields(spec.config_cls)}
    return {**{k: v for k, v in _RECURRENT.items() if k in names}, **spec.tiny}


def window_only(arch: str) -> str | None:
    """Why `arch` keeps nothing from one window for the next (declared at registration)."""
    return ARCHITECTURES.get(arch).window_only if arch in ARCHITECTURES else None


def demo_archs() -> list[str]:
    """The dense baseline first, then every registered memory architecture."""
    names = ARCHITECTURES.names()
    return ["gpt"] + [n for n in names if n != "gpt"]


def recall_source(chars: int) -> str:
    """The `builtin:recall` data source with the demo's options."""
    r = TRAIN_RECALL
    return (f"builtin:recall:chars={chars},gap={r['gap_range'][0]}-{r['gap_range'][1]},"
            f"neargap={r['near_range'][0]}-{r['near_range'][1]},near={r['near_fraction']},"
            f"open={r['max_open']},digits={r['digits']},facts={r['fact_prob']},"
            f"filler={r['filler_words']}"
            + (f",keys={r['n_keys']}" if r.get("n_keys") else "")
            + (f",attrs={r['n_attributes']}" if r.get("n_attributes") else ""))


def bucket_key(label: str) -> str:
    return f"recall_{label}"


class RecallMetric:
    """`extra_metrics` for run_comparison: exact-answer recall, near/far and by distance.

    A class rather than a closure so it can be sent to a worker process.
    """

    def __init__(self, rows: int, chars: int):
        self.rows, self.chars = rows, chars

    def __call__(self, model, tokenizer, cfg) -> dict[str, float]:
        from memlm.eval.recall import make_recall_streams, recall_eval

        ids, spans = make_recall_streams(tokenizer, self.rows, self.chars, RECALL_SEED,
                                         **EVAL_RECALL)
        # a model trained on episodes is scored on episodes: the K segments ending at each
        # answer, read from a fresh memory (K = its BPTT window)
        episodes = cfg.data.layout == "episodes"
        res = recall_eval(model, ids, spans, WINDOW, seq_len=WINDOW,
                          precision=cfg.train.precision,
                          episode_segments=cfg.train.bptt_window if episodes else None)
        out = {"recall_near": res["recall_near"], "recall_far": res["recall_far"],
               "n_near": res["n_near"], "n_far": res["n_far"]}
        # memory health on the same held-out text: the first episode of every scoring row
        import torch

        from memlm.inspect.health import memory_health

        span = WINDOW * (cfg.train.bptt_window if episodes else 1)
        out.update(memory_health(model, torch.as_tensor(ids[:, :span])))
        for label, _, _ in BUCKETS:
            out[bucket_key(label)] = res["buckets"][label]["accuracy"]
            out[f"n_{label}"] = res["buckets"][label]["n"]
        return out


def inspect_example(tokenizer, window: int, seed: int = RECALL_SEED) -> dict[str, Any]:
    """A recall example for "What the memory did": the fact in segment 1, its question in
    segment 3 (of `window`-token segments), so a memory must carry the value across a whole
    segment and the inspection shows where it was written and what was read at the question.

    Cut from the scoring generator's text at the fact's sentence; the first excerpt whose
    answer falls in the third segment is used (the furthest one when none does).
    """
    from memlm.data.synthetic import recall_stream

    best: tuple[int, str, int, int] | None = None
    for i in range(8):
        text, spans = recall_stream(2000, seed=seed + i, **EVAL_RECALL)
        for sp in spans:
            start = sp.fact_start - len(f"the {sp.attribute} of {sp.key} is ")
            excerpt = text[start : sp.end + 1]
            ids = tokenizer.encode(excerpt)
            fact_tok = len(tokenizer.encode(text[start : sp.fact_start]))
            answer_tok = len(tokenizer.encode(text[start : sp.start]))
            if fact_tok // window == 0 and answer_tok // window == 2 and len(ids) <= 3 * window:
                return {"text": excerpt, "fact_token": fact_tok, "answer_token": answer_tok,
                        "about": f" (fact value at token {fact_tok}, in segment 1; its "
                                 f"answer at token {answer_tok}, in segment 3 of "
                                 f"{window}-token segments)"}
            if best is None or answer_tok > best[0]:
                best = (answer_tok, excerpt, fact_tok, answer_tok)
    assert best is not None
    _, excerpt, fact_tok, answer_tok = best
    return {"text": excerpt, "fact_token": fact_tok, "answer_token": answer_tok,
            "about": f" (fact value at token {fact_tok}, answer at token {answer_tok}; "
                     f"{window}-token segments)"}


# ----- training, one architecture per worker ------------------------------------------------


def _train_arch(arch: str, data: DataConfig, train_cfg: TrainConfig, seeds: Sequence[int],
                out_dir: str, mode: DemoMode, progress: bool, threads: int) -> dict[str, Any]:
    """Train one architecture (all seeds) with run_comparison; return its results row + curves.

    Runs in a worker process; the result is plain data so it pickles.
    """
    import torch

    from memlm.train import run as runlayout

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        part = run_comparison([arch], data, BASE_MODEL, train_cfg, seeds, out_dir,
                              arch_overrides={arch: arch_overrides(arch)},
                              extra_metrics=RecallMetric(mode.recall_rows, mode.recall_chars),
                              progress=progress, log=lambda _: None)
    finally:
        torch.set_num_threads(before)
    row = part["rows"][0]
    _log_health(row, train_cfg.max_steps)
    curves = []
    for run_dir in row["runs"]:
        records = [json.loads(line) for line in
                   (Path(run_dir) / runlayout.METRICS).read_text().splitlines() if line.strip()]
        curves.append([(r["step"], r["val_nll"]) for r in records if r.get("kind") == "val"])
    return {"row": row, "curves": curves, "seconds": time.perf_counter() - t0}


def _log_health(row: dict[str, Any], step: int) -> None:
    """Append each run's memory-health numbers to its metrics.jsonl (kind "memory_health")."""
    from memlm.train import run as runlayout

    keys = [k for k in row["metrics"] if k.startswith("health_")]
    if not keys:
        return
    for i, run_dir in enumerate(row["runs"]):
        record = {"kind": "memory_health", "step": step,
                  **{k: row["metrics"][k]["values"][i] for k in keys}}
        with open(Path(run_dir) / runlayout.METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")


def _to_arch_runs(row: dict[str, Any], curves: list[list[tuple[int, float]]]) -> ArchRuns:
    n = len(row["seeds"])
    metrics = [{k: m["values"][i] for k, m in row["metrics"].items()} for i in range(n)]
    return ArchRuns(row["arch"], row["model"], row["params"], row["params_non_embedding"],
                    list(row["seeds"]), metrics, curves, list(row["runs"]))


def _order_for_workers(archs: Sequence[str]) -> list[str]:
    """Slowest first (ArchSpec.cost), so two workers finish at about the same time."""
    return sorted(archs, key=lambda a: -ARCHITECTURES.get(a).cost)


def default_workers() -> int:
    """One training process per core, at most two (the demo's models are tiny)."""
    return max(1, min(2, os.cpu_count() or 1))


# ----- verdict, tables, plot -------------------------------------------------------------------

#: a memory model "beats" the baseline when both z statistics exceed this (one-sided p < 0.025)
Z_BEATS = 1.96
#: the robustness target of benchmarks/demo_robustness.py (issue 15): z > 3 in every run
Z_ROBUST = 3.0


def _z_two_proportions(p1: float, p0: float, n1: int, n0: int) -> float:
    """z statistic of p1 - p0 for two independent proportions (pooled variance)."""
    if not (n1 and n0) or not (math.isfinite(p1) and math.isfinite(p0)):
        return float("nan")
    pooled = (p1 * n1 + p0 * n0) / (n1 + n0)
    var = pooled * (1 - pooled) * (1 / n1 + 1 / n0)
    if var <= 0:
        return 0.0 if p1 == p0 else math.copysign(math.inf, p1 - p0)
    return (p1 - p0) / math.sqrt(var)


def _z_chance(p: float, n: int, chance: float) -> float:
    """One-sample z of an accuracy p over n answers against the chance level."""
    if not n or not 0 < chance < 1 or not math.isfinite(p):
        return float("nan")
    return (p - chance) / math.sqrt(chance * (1 - chance) / n)


def _far(row: dict[str, Any]) -> tuple[float, int]:
    """Mean far recall over seeds and the number of far answers scored in all seeds."""
    m = row["metrics"]
    acc = m.get("recall_far", {}).get("mean", float("nan"))
    n = int(sum(v for v in m.get("n_far", {}).get("values", []) if v))
    return acc, n


def _far_per_seed(row: dict[str, Any]) -> list[tuple[float, int]]:
    m = row["metrics"]
    return [(float(a), int(n or 0)) for a, n in zip(m.get("recall_far", {}).get("values", []),
                                                    m.get("n_far", {}).get("values", []))]


def verdict_rows(payload: dict[str, Any], chance: float = CHANCE) -> list[dict[str, Any]]:
    """Per architecture: far recall, its Wilson 95% interval, z against the baseline and chance,
    the smallest per-seed z, and the verdict.

    "beats" needs two things, each with z > 1.96 (p < 0.025 one-sided): a higher exact-answer
    accuracy than the baseline on answers beyond the window (two-proportion z-test, all
    seeds' answers pooled), so a lucky handful of answers is not a win; and an accuracy above
    chance (one-sample z-test), so a model that merely guesses digits does not "win" against
    a baseline that has not yet learned to answer with one. Architectures with no memory
    across segments get their reason instead of a verdict.
    """
    rows = {r["arch"]: r for r in payload["rows"]}
    base_name = payload["baseline"]
    base = rows.get(base_name)
    if base is None or "recall_far" not in base["metrics"]:
        return []
    b, nb = _far(base)
    base_seeds = _far_per_seed(base)
    out = []
    for name, row in rows.items():
        m, n = _far(row)
        lo, hi = wilson(m * n, n) if math.isfinite(m) else (math.nan, math.nan)
        entry: dict[str, Any] = {"arch": name, "recall_far": m, "n_far": n, "ci_low": lo,
                                 "ci_high": hi, "z": math.nan, "z_chance": _z_chance(m, n, chance),
                                 "z_min_seed": math.nan, "note": ""}
        if name == base_name:
            entry.update(verdict="baseline", note="dense attention sees only its window")
            out.append(entry)
            continue
        z = _z_two_proportions(m, b, n, nb)
        per_seed = [_z_two_proportions(a, ab, na, nab)
                    for (a, na), (ab, nab) in zip(_far_per_seed(row), base_seeds)]
        entry.update(z=z, z_min_seed=min(per_seed) if per_seed else math.nan)
        if window_only(name):
            entry.update(verdict="no memory across segments", note=window_only(name))
        elif not math.isfinite(m):
            entry.update(verdict="not measured")
        elif z > Z_BEATS and entry["z_chance"] > Z_BEATS:
            entry.update(verdict="beats the baseline")
        else:
            entry.update(verdict="does NOT beat the baseline",
                         note="" if z <= Z_BEATS else "higher than the baseline, not above chance")
        out.append(entry)
    return out


def _stars(z: float) -> str:
    """Significance marks of a one-sided z: * p < 0.025 (z > 1.96), ** z > 3 (p < 0.0014)."""
    return "**" if z > Z_ROBUST else "*" if z > Z_BEATS else ""


def verdict_table(payload: dict[str, Any], chance: float = CHANCE) -> dict[str, Any]:
    """The verdict as a table of strings (3 significant digits), for the terminal and report."""
    rows = verdict_rows(payload, chance)
    several = len(payload.get("setup", {}).get("seeds", [0])) > 1
    columns = ["arch", "recall beyond window", "95% CI (Wilson)", "answers", "z vs dense",
               "z vs chance"] + (["min z over seeds"] if several else []) + ["verdict"]
    cells = []
    for r in rows:
        line = [r["arch"], sig3(r["recall_far"]),
                f"{sig3(r['ci_low'])}-{sig3(r['ci_high'])}", f"{r['n_far']:,}",
                "" if r["verdict"] == "baseline" else sig3(r["z"]) + _stars(r["z"]),
                sig3(r["z_chance"]) + _stars(r["z_chance"])]
        if several:
            line.append("" if r["verdict"] == "baseline" else sig3(r["z_min_seed"]))
        line.append(r["verdict"])
        cells.append(line)
    notes = [f"{r['arch']}: {r['note']}" for r in rows if r["note"]]
    notes.append(f"chance is {sig3(chance)}; * z > {Z_BEATS} (p < 0.025, one-sided), "
                 f"** z > {Z_ROBUST:g}; CI: Wilson 95% interval over all answers of all seeds")
    return {"columns": columns, "rows": cells, "notes": notes, "rows_raw": rows}


def text_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with aligned columns (the terminal's version of the report's)."""
    widths = [max(len(h), *(len(c[i]) for c in rows)) if rows else len(h)
              for i, h in enumerate(columns)]
    out = [" | ".join(h.ljust(w) for h, w in zip(columns, widths)).rstrip(),
           "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in rows]
    return "\n".join(out)


def verdict(payload: dict[str, Any], chance: float = CHANCE) -> str:
    """The verdict table as text, with its notes."""
    table = verdict_table(payload, chance)
    if not table["rows"]:
        return "no baseline far recall measured"
    return (f"far recall: exact answers whose fact is beyond the {WINDOW}-token window\n"
            + text_table(table["columns"], table["rows"]) + "\n"
            + "\n".join("  " + n for n in table["notes"]))


def comparison_table(payload: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Validation loss, far recall and speed per architecture: mean (+- 95% CI over seeds),
    change against the baseline, all at 3 significant digits."""
    keys = [("val_nll", "val loss"), ("recall_far", "recall>win"), ("tokens_per_sec", "train tok/s")]
    columns = ["arch", "params"] + [label for _, label in keys]
    rows = []
    for row in payload["rows"]:
        cells = [row["arch"], f"{sig3(row['params'] / 1e6)}M"]
        for key, _ in keys:
            m = row["metrics"].get(key)
            if m is None:
                cells.append("n/a")
                continue
            text = sig3(m["mean"])
            if math.isfinite(m.get("ci95", math.nan)):
                text += f" ±{sig3(m['ci95'])}"
            if "delta_vs_baseline" in m:
                text += f" ({sig3(m['delta_vs_baseline'], signed=True)})"
            cells.append(text)
        rows.append(cells)
    return columns, rows


def distance_table(payload: dict[str, Any]) -> str:
    """Exact-answer recall by fact distance (in windows), one row per architecture."""
    first = payload["rows"][0]["metrics"]
    labels = [label for label, _, _ in BUCKETS if bucket_key(label) in first]
    answers = payload.get("setup", {}).get("answers_per_bucket", {})
    counts = [answers.get(label, 0) for label in labels]
    head = ["arch"] + [f"{lab} (n={c})" for lab, c in zip(labels, counts)]
    lines = [[r["arch"]] + [sig3(r["metrics"].get(bucket_key(lab), {}).get("mean"))
                            for lab in labels] for r in payload["rows"]]
    return text_table(head, lines)


def plot_recall_by_distance(payload: dict[str, Any], path: Path) -> Path:
    """One line per architecture: exact-answer recall per distance bucket, chance dashed."""
    from memlm.plots import plt

    labels = [label for label, _, _ in BUCKETS]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    answers = payload.get("setup", {}).get("answers_per_bucket", {})
    for i, row in enumerate(payload["rows"]):
        m = row["metrics"]
        ys = [m.get(bucket_key(lab), {}).get("mean", float("nan")) for lab in labels]
        ns = [answers.get(lab, 0) * len(row["seeds"]) for lab in labels]
        # Wilson 95% interval of each point, so a point resting on a few dozen answers does
        # not look as solid as one resting on hundreds, and 0% keeps an upper bound
        bounds = [wilson(y * n, n) if n and math.isfinite(y) else (math.nan, math.nan)
                  for y, n in zip(ys, ns)]
        # clamped at 0: at 0% and 100% the bound equals the point up to rounding (-1e-17),
        # and matplotlib refuses any negative error bar
        err = [[max(0.0, y - lo) for y, (lo, _) in zip(ys, bounds)],
               [max(0.0, hi - y) for y, (_, hi) in zip(ys, bounds)]]
        xs = [x + (i - len(payload["rows"]) / 2) * 0.025 for x in range(len(labels))]
        style = "s--" if row["arch"] == payload["baseline"] else "o-"
        ax.errorbar(xs, ys, yerr=err, fmt=style, label=row["arch"], ms=4, lw=1.4, capsize=2,
                    elinewidth=0.8)
    ax.axhline(CHANCE, color="grey", ls=":", lw=1, label=f"chance ({CHANCE:.2f})")
    ax.set_xticks(range(len(labels)), [f"{lab}\n({_span(lab)} tokens)" for lab in labels])
    ax.set_xlabel(f"distance from the fact to its question (window = {WINDOW} tokens)")
    ax.set_ylabel("exact-answer recall")
    shown = [v for row in payload["rows"] for lab in labels
             if math.isfinite(v := row["metrics"].get(bucket_key(lab), {}).get("mean", math.nan))]
    # zoom in when every model is far from perfect, so differences near chance are visible
    ax.set_ylim(-0.02, min(1.02, max(0.4, *shown, CHANCE) + 0.12))
    ax.set_title("exact-answer recall vs distance (bars: Wilson 95% interval; no point: "
                 "no answers)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _span(label: str) -> str:
    low, high = next((lo, hi) for lab, lo, hi in BUCKETS if lab == label)
    return (f"{int(low * WINDOW) + 1}-{int(high * WINDOW)}" if math.isfinite(high)
            else f">{int(low * WINDOW)}")


# ----- the demo -----------------------------------------------------------------------------


def run_demo(out_dir: str | Path = "memlm-demo", mode: str = "full",
             archs: Sequence[str] | None = None, seeds: Sequence[int] = (0,),
             progress: bool = True, log: Callable[[str], None] = print,
             workers: int | None = None, **mode_overrides: Any) -> dict[str, Any]:
    """Train every architecture on the recall text, score recall, print and write the report.

    `mode_overrides` change fields of the mode (steps, bptt_window, layout, train_chars,
    lr, batch_size, ...), for exploring the setup: `run_demo(steps=2000, layout="stream")`.
    With more than one worker, architectures train in spawned processes: a script that
    calls this must do so under ``if __name__ == "__main__":`` (or pass ``workers=1``).
    """
    import dataclasses

    from memlm.data.tokenizers import load_tokenizer
    from memlm.experiments.report import write_report
    from memlm.plots import plot_curve_overlay

    unknown = set(mode_overrides) - {f.name for f in dataclasses.fields(DemoMode)}
    if unknown:
        raise ConfigError(f"unknown demo setting(s) {sorted(unknown)}; valid: "
                          f"{[f.name for f in dataclasses.fields(DemoMode)]}.")
    if mode_overrides.get("precision", "fp32") not in ("fp32", "bf16"):
        raise ConfigError(f"demo precision must be fp32 or bf16, got "
                          f"{mode_overrides['precision']!r}.")
    if int(mode_overrides.get("threads", 1)) < 1:
        raise ConfigError(f"demo threads must be >= 1, got {mode_overrides['threads']!r}.")
    if mode_overrides.get("score", "answers") not in ("answers", "all"):
        raise ConfigError(f"demo score must be answers or all, got {mode_overrides['score']!r}.")
    if mode_overrides.get("layout", "stream") not in ("stream", "episodes"):
        raise ConfigError(f"demo layout must be stream or episodes, got "
                          f"{mode_overrides['layout']!r}.")
    m = dataclasses.replace(MODES[mode], **mode_overrides)
    archs = list(archs or demo_archs())
    for arch in archs:
        ARCHITECTURES.get(arch)  # unknown names fail before any training
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = min(workers or m.workers or default_workers(), len(archs))
    t0 = time.perf_counter()
    data = DataConfig(source=recall_source(m.train_chars), tokenizer=TOKENIZER, seq_len=WINDOW,
                      layout="auto" if m.layout == "stream" else m.layout, score=m.score)
    train_cfg = TrainConfig(max_steps=m.steps, batch_size=m.batch_size, lr=m.lr, min_lr=m.lr / 10,
                            warmup_steps=max(m.steps // 20, 1), schedule="constant",
                            eval_every=max(m.steps // 5, 1), eval_batches=m.eval_batches,
                            save_every=m.steps, log_every=max(m.steps // 10, 1),
                            precision=m.precision, bptt_window=m.bptt_window,
                            curriculum=m.stages(),
                            weight_decay=0.0)
    log(f"memlm demo ({mode}): {', '.join(archs)}\n  data: {data.source} ({TOKENIZER})\n"
        f"  window {WINDOW} tokens; {m.steps} steps x {m.batch_size} rows; stateful models "
        f"read {m.bptt_window} segments per step ("
        + ("each step a fresh memory; recall scored the same way" if m.layout == "episodes"
           else "memory carried along the rows, truncated BPTT")
        + f"); {workers} worker(s)")

    jobs = {a: dict(arch=a, data=data, train_cfg=train_cfg, seeds=list(seeds),
                    out_dir=str(out / "archs" / a), mode=m, threads=m.threads) for a in archs}
    done: dict[str, dict[str, Any]] = {}

    def finished(arch: str, res: dict[str, Any]) -> None:
        done[arch] = res
        far = res["row"]["metrics"].get("recall_far", {}).get("mean", float("nan"))
        log(f"[demo] {arch}: far recall {sig3(far)} ({res['seconds']:.0f}s)")

    if workers <= 1:
        for arch in archs:
            finished(arch, _train_arch(**jobs[arch], progress=progress))
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_train_arch, **jobs[a], progress=False): a
                       for a in _order_for_workers(archs)}
            for fut in as_completed(futures):
                finished(futures[fut], fut.result())

    results = [_to_arch_runs(done[a]["row"], done[a]["curves"]) for a in archs]
    payload = summarise(results, baseline=archs[0])
    # answers per distance bucket: the same scoring text for every run, so kept once
    answers: dict[str, int] = {}
    for row in payload["rows"]:
        for label, _, _ in BUCKETS:
            counts = row["metrics"].pop(f"n_{label}", {}).get("values", [0])
            answers[label] = int(counts[0] or 0)
    payload["setup"] = {
        "archs": archs, "seeds": list(seeds), "data": data.to_dict(), "train": train_cfg.to_dict(),
        "base_model": BASE_MODEL, "arch_overrides": {a: arch_overrides(a) for a in archs},
        "window": WINDOW, "train_recall": TRAIN_RECALL,
        "eval_recall": {**EVAL_RECALL, "seed": RECALL_SEED, "rows": m.recall_rows,
                        "chars": m.recall_chars, "chance": CHANCE},
        "answers_per_bucket": answers,
        "tokens_per_step": {"stateless": m.batch_size * WINDOW,
                            "stateful": m.batch_size * WINDOW * m.bptt_window},
        "workers": workers,
    }
    payload["memory_health"] = {
        r["arch"]: {k: m["mean"] for k, m in r["metrics"].items() if k.startswith("health_")}
        for r in payload["rows"]}
    # the measured numbers are on disk before any table, plot or report is made from them
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    payload["inspect"] = inspect_example(load_tokenizer(results[0].run_dirs[0]), WINDOW)
    payload["verdict"] = verdict(payload)
    curves = {r.arch: r.curves[0] for r in results if r.curves and r.curves[0]}
    plot_curve_overlay(curves, out / "curves.png",
                       ylabel=("val loss (nats/answer token)" if m.score == "answers"
                               else "val loss (nats/token)"),
                       title="validation loss")
    plot_recall_by_distance(payload, out / "recall_vs_distance.png")
    columns, cells = comparison_table(payload)
    payload["comparison_table"] = {"columns": columns, "rows": cells}
    payload["verdict_table"] = verdict_table(payload)
    table = text_table(columns, cells)
    by_distance = distance_table(payload)
    payload["train_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    log("\n" + table + "\n\nexact-answer recall by distance from the fact (w = window):\n"
        + by_distance + "\n\n" + payload["verdict"])
    report = write_report(out, title="memlm demo: memory architectures vs dense baseline")
    payload["wall_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    log(f"\nreport: {report}   (total {payload['wall_s']:.0f}s)")
    payload["report"] = str(report)
    payload["table"] = table
    payload["distance_table"] = by_distance
    return payload
