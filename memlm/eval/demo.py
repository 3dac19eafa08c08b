"""`memlm demo`: the main job on built-in data, offline, in a few minutes on a laptop CPU.

It trains a tiny dense baseline and a tiny model of every registered memory
architecture on generated recall text (a fact is stated, then asked for one to two
attention windows later), with the same data, steps, batch and seed for all, then
prints the comparison (validation loss, exact-answer recall beyond the window,
recall by distance, speed) and writes an HTML report with a recall-vs-distance plot.
The verdict is computed from the measured numbers (a two-proportion z-test against
the dense baseline); where a memory model does not beat the baseline, it says so.

Why the task looks the way it does (each point was measured, see docs/demo.md):

* A few minutes of CPU are about a thousand optimizer steps of a ~120k-parameter
  model. Carrying a value across segments is a two-hop skill (write it, read it
  back), learned only when recalls are dense in the text and the rest of the text
  is easy. So the recall corpus is used in its easiest form: one fact open at a
  time, one-digit values, filler from two words per slot, a word-level BPE
  tokenizer, and an attention window of 8 tokens, so that every fact is 1-2
  windows back when asked. What matters is the distance in windows, not in tokens.
* The training text is short (20k characters, read many times). Stream rows are
  then ~20 segments long, so a stateful model restarts its memory often; with a
  100k-character text (rows ~100 segments long) ARMT learned nothing in 1,500 steps.
* Stateful models back-propagate through 2 segments per step (truncated BPTT), so
  the gradient from an answer reaches the segment of its fact.

Speed: every model here is tiny, so CPU time goes into per-operation overhead,
not arithmetic. fp32 is faster than bf16 autocast at this size, one thread per
model is faster than two (and does not collapse when the machine is busy), and two
models train at once in separate processes, one per core.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from memlm.config import DataConfig, TrainConfig
from memlm.errors import ConfigError
from memlm.eval.compare import ArchRuns, format_table, run_comparison, summarise
from memlm.eval.recall import BUCKETS
from memlm.registry import ARCHITECTURES

#: attention window in tokens (the BPE tokenizer makes most words one token)
WINDOW = 8
TOKENIZER = "bpe:400"
#: the recall text (`recall_stream` options). Every gap is beyond the window: a value plus
#: its question ("what is the code of ned?") already take 9 tokens, so no fact is inside
#: the attention window when its question comes. One fact is open at a time (the answer
#: is the most recently stated value) and a one-digit value (1-9) makes chance 1 in 9.
#: Gaps are 28-60 characters, 9-18 tokens: 1-2 windows, a few just past 2. Scoring text comes
#: from the same generator with another seed (fresh facts, the same distances).
TRAIN_RECALL = dict(gap_range=(28, 60), near_range=(30, 56), near_fraction=0.0, max_open=1,
                    digits=1, fact_prob=1.0, filler_words=2)
EVAL_RECALL = dict(TRAIN_RECALL)
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


MODES = {
    "full": DemoMode(steps=1000, batch_size=32, bptt_window=3, lr=3e-3, eval_batches=16,
                     train_chars=20_000, recall_rows=96, recall_chars=800, layout="episodes"),
    "ci": DemoMode(steps=20, batch_size=8, bptt_window=3, lr=3e-3, eval_batches=2,
                   train_chars=20_000, recall_rows=8, recall_chars=400, layout="episodes",
                   workers=1),
}

BASE_MODEL = dict(n_layer=2, n_head=4, d_model=64, context_len=WINDOW, dropout=0.0)

#: per-architecture settings that make a tiny model of it (memory sizes, local windows);
#: each keeps the shared backbone size above, so parameter counts stay comparable
ARCH_OVERRIDES: dict[str, dict[str, Any]] = {
    "armt": dict(num_mem_tokens=4, d_mem=16),
    "rmt": dict(num_mem_tokens=4),
    "dnc": dict(mem_slots=16, mem_width=16, num_reads=1, mem_kl=False),
    "gmt": dict(memory_slots=128, nav_dim=64),
    "tmt": dict(mesh_window=4, mesh_k=4, mesh_block_q=8, mesh_block_k=8, n_anchors=4),
    "tmt-xmem": dict(mesh_window=4, mesh_k=4, mesh_block_q=8, mesh_block_k=8, n_anchors=4),
}

#: slowest first, so two workers finish at about the same time (unknown archs go last)
COST_ORDER = ("dnc", "armt", "tmt-xmem", "rmt", "tmt", "gmt", "gpt")


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
            f"filler={r['filler_words']}")


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
        for label, _, _ in BUCKETS:
            out[bucket_key(label)] = res["buckets"][label]["accuracy"]
            out[f"n_{label}"] = res["buckets"][label]["n"]
        return out


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
                              arch_overrides=ARCH_OVERRIDES,
                              extra_metrics=RecallMetric(mode.recall_rows, mode.recall_chars),
                              progress=progress, log=lambda _: None)
    finally:
        torch.set_num_threads(before)
    row = part["rows"][0]
    curves = []
    for run_dir in row["runs"]:
        records = [json.loads(line) for line in
                   (Path(run_dir) / runlayout.METRICS).read_text().splitlines() if line.strip()]
        curves.append([(r["step"], r["val_nll"]) for r in records if r.get("kind") == "val"])
    return {"row": row, "curves": curves, "seconds": time.perf_counter() - t0}


def _to_arch_runs(row: dict[str, Any], curves: list[list[tuple[int, float]]]) -> ArchRuns:
    n = len(row["seeds"])
    metrics = [{k: m["values"][i] for k, m in row["metrics"].items()} for i in range(n)]
    return ArchRuns(row["arch"], row["model"], row["params"], row["params_non_embedding"],
                    list(row["seeds"]), metrics, curves, list(row["runs"]))


def _order_for_workers(archs: Sequence[str]) -> list[str]:
    rank = {a: i for i, a in enumerate(COST_ORDER)}
    return sorted(archs, key=lambda a: rank.get(a, len(COST_ORDER)))


def default_workers() -> int:
    """One training process per core, at most two (the demo's models are tiny)."""
    return max(1, min(2, os.cpu_count() or 1))


# ----- verdict, tables, plot -------------------------------------------------------------------


def _z_two_proportions(p1: float, p0: float, n1: int, n0: int) -> float:
    """z statistic of p1 - p0 for two independent proportions (pooled variance)."""
    if not (n1 and n0) or not (math.isfinite(p1) and math.isfinite(p0)):
        return float("nan")
    pooled = (p1 * n1 + p0 * n0) / (n1 + n0)
    var = pooled * (1 - pooled) * (1 / n1 + 1 / n0)
    if var <= 0:
        return 0.0 if p1 == p0 else math.copysign(math.inf, p1 - p0)
    return (p1 - p0) / math.sqrt(var)


def _far(row: dict[str, Any]) -> tuple[float, int]:
    """Mean far recall over seeds and the number of far answers scored in all seeds."""
    m = row["metrics"]
    acc = m.get("recall_far", {}).get("mean", float("nan"))
    n = int(sum(v for v in m.get("n_far", {}).get("values", []) if v))
    return acc, n


def verdict(payload: dict[str, Any], chance: float = CHANCE) -> str:
    """One line per memory architecture: does it beat the dense baseline on far recall?

    "Beats" needs two things, each with z > 1.96 (p < 0.025 one-sided): a higher
    exact-answer accuracy than the baseline on answers beyond the window
    (two-proportion z-test), so a lucky handful of answers is not a win; and an
    accuracy above chance (one-sample z-test), so a model that merely guesses digits
    does not "win" against a baseline that has not yet learned to answer with one.
    """
    rows = {r["arch"]: r for r in payload["rows"]}
    base = rows.get(payload["baseline"])
    if base is None or "recall_far" not in base["metrics"]:
        return "no baseline far recall measured"
    b, nb = _far(base)
    lines = [f"dense baseline far recall (answers beyond the {WINDOW}-token window, "
             f"chance {chance:.3f}): {b:.3f} over {nb} answers"]
    for name, row in rows.items():
        if name == payload["baseline"]:
            continue
        m, n = _far(row)
        z = _z_two_proportions(m, b, n, nb)
        z_chance = ((m - chance) / math.sqrt(chance * (1 - chance) / n) if n and 0 < chance < 1
                    else float("nan"))
        if not math.isfinite(m):
            lines.append(f"{name}: far recall not measured")
        elif z > 1.96 and z_chance > 1.96:
            lines.append(f"{name}: beats the baseline on far recall ({m:.3f} vs {b:.3f}, "
                         f"z = {z:.1f}; above chance, z = {z_chance:.1f})")
        else:
            why = "" if z <= 1.96 else f", but not above chance: z = {z_chance:.1f}"
            lines.append(f"{name}: does NOT beat the baseline on far recall ({m:.3f} vs "
                         f"{b:.3f}, z = {z:.1f}{why})")
    return "\n".join(lines)


def distance_table(payload: dict[str, Any]) -> str:
    """Exact-answer recall by fact distance (in windows), one row per architecture."""
    first = payload["rows"][0]["metrics"]
    labels = [label for label, _, _ in BUCKETS if bucket_key(label) in first]
    answers = payload.get("setup", {}).get("answers_per_bucket", {})
    counts = [answers.get(label, 0) for label in labels]
    head = ["arch"] + [f"{lab} (n={c})" for lab, c in zip(labels, counts)]
    lines = [[r["arch"]] + [_fmt_acc(r["metrics"].get(bucket_key(lab), {}).get("mean"))
                            for lab in labels] for r in payload["rows"]]
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)),
           "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(out)


def _fmt_acc(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"


def plot_recall_by_distance(payload: dict[str, Any], path: Path) -> Path:
    """One line per architecture: exact-answer recall per distance bucket, chance dashed."""
    from memlm.inspect.plots import plt

    labels = [label for label, _, _ in BUCKETS]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    answers = payload.get("setup", {}).get("answers_per_bucket", {})
    for i, row in enumerate(payload["rows"]):
        m = row["metrics"]
        ys = [m.get(bucket_key(lab), {}).get("mean", float("nan")) for lab in labels]
        ns = [answers.get(lab, 0) * len(row["seeds"]) for lab in labels]
        # 95% binomial interval of each point (normal approximation), so a point resting on
        # a few dozen answers does not look as solid as one resting on hundreds
        err = [1.96 * math.sqrt(y * (1 - y) / n) if n and math.isfinite(y) else float("nan")
               for y, n in zip(ys, ns)]
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
    ax.set_title("exact-answer recall vs distance (bars: 95% interval; no point: no answers)",
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

    from memlm.inspect.plots import plot_curve_overlay
    from memlm.inspect.report import write_report

    unknown = set(mode_overrides) - {f.name for f in dataclasses.fields(DemoMode)}
    if unknown:
        raise ConfigError(f"unknown demo setting(s) {sorted(unknown)}; valid: "
                          f"{[f.name for f in dataclasses.fields(DemoMode)]}.")
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
                      layout="auto" if m.layout == "stream" else m.layout)
    train_cfg = TrainConfig(max_steps=m.steps, batch_size=m.batch_size, lr=m.lr, min_lr=m.lr / 10,
                            warmup_steps=max(m.steps // 20, 1), schedule="constant",
                            eval_every=max(m.steps // 5, 1), eval_batches=m.eval_batches,
                            save_every=m.steps, log_every=max(m.steps // 10, 1),
                            precision="fp32", bptt_window=m.bptt_window, weight_decay=0.0)
    log(f"memlm demo ({mode}): {', '.join(archs)}\n  data: {data.source} ({TOKENIZER})\n"
        f"  window {WINDOW} tokens; {m.steps} steps x {m.batch_size} rows; stateful models "
        f"read {m.bptt_window} segments per step ("
        + ("each step a fresh memory; recall scored the same way" if m.layout == "episodes"
           else "memory carried along the rows, truncated BPTT")
        + f"); {workers} worker(s)")

    jobs = {a: dict(arch=a, data=data, train_cfg=train_cfg, seeds=list(seeds),
                    out_dir=str(out / "archs" / a), mode=m, threads=1) for a in archs}
    done: dict[str, dict[str, Any]] = {}

    def finished(arch: str, res: dict[str, Any]) -> None:
        done[arch] = res
        far = res["row"]["metrics"].get("recall_far", {}).get("mean", float("nan"))
        log(f"[demo] {arch}: far recall {_fmt_acc(far)} ({res['seconds']:.0f}s)")

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
        "base_model": BASE_MODEL, "arch_overrides": {a: ARCH_OVERRIDES.get(a, {}) for a in archs},
        "window": WINDOW, "train_recall": TRAIN_RECALL,
        "eval_recall": {**EVAL_RECALL, "seed": RECALL_SEED, "rows": m.recall_rows,
                        "chars": m.recall_chars, "chance": CHANCE},
        "answers_per_bucket": answers,
        "tokens_per_step": {"stateless": m.batch_size * WINDOW,
                            "stateful": m.batch_size * WINDOW * m.bptt_window},
        "workers": workers,
    }
    payload["verdict"] = verdict(payload)
    curves = {r.arch: r.curves[0] for r in results if r.curves and r.curves[0]}
    plot_curve_overlay(curves, out / "curves.png", ylabel="val loss (nats/token)",
                       title="validation loss")
    plot_recall_by_distance(payload, out / "recall_vs_distance.png")
    table = format_table(payload, [("val_nll", "val loss"), ("recall_far", "recall>win"),
                                   ("tokens_per_sec", "train tok/s")])
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
