"""`memlm demo`: the main job on built-in data, offline, in a few minutes on a laptop CPU.

It trains a tiny dense baseline and a tiny model of every memory architecture on
the generated recall corpus (facts stated, then asked for far beyond the
attention window), with the same data, steps, batch and seed for all, then
prints the comparison (validation loss, recall accuracy within and beyond the
window, speed) and writes an HTML report. The verdict column is computed from
the measured numbers: where a memory model does not beat the baseline on far
recall, the table says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memlm.config import DataConfig, TrainConfig
from memlm.eval.compare import format_table, run_comparison
from memlm.registry import ARCHITECTURES

WINDOW = 64  # attention window (tokens = characters, byte tokenizer)
# facts are asked 1.5-5 windows later (far) or inside the window (near)
DATA_SPEC = "builtin:recall"
GAP_RANGE = (96, 320)
NEAR_FRACTION = 0.3
RECALL_EVAL = dict(seed=12345, gap_range=GAP_RANGE, near_fraction=NEAR_FRACTION)


@dataclass(frozen=True)
class DemoMode:
    steps: int
    batch_size: int
    eval_batches: int
    recall_chars: int


MODES = {
    "full": DemoMode(steps=300, batch_size=16, eval_batches=8, recall_chars=40_000),
    "ci": DemoMode(steps=20, batch_size=8, eval_batches=2, recall_chars=6_000),
}

BASE_MODEL = dict(n_layer=2, n_head=4, d_model=64, context_len=WINDOW, dropout=0.0)

#: per-architecture settings that make a tiny model of it (memory sizes, segment lengths)
ARCH_OVERRIDES: dict[str, dict[str, Any]] = {}


def demo_archs() -> list[str]:
    """The dense baseline first, then every registered memory architecture."""
    names = ARCHITECTURES.names()
    return ["gpt"] + [n for n in names if n != "gpt"]


def _recall_metric(mode: DemoMode) -> Callable[..., dict[str, float]]:
    from memlm.data.synthetic import recall_stream
    from memlm.eval.recall import recall_accuracy

    params = {**RECALL_EVAL, "n_chars": mode.recall_chars}
    text, spans = recall_stream(**params)

    def metric(model, tokenizer, cfg) -> dict[str, float]:
        res = recall_accuracy(model, tokenizer, text, spans, window=WINDOW)
        return {"recall_near": res["recall_near"], "recall_far": res["recall_far"]}

    return metric


def verdict(payload: dict[str, Any]) -> str:
    rows = {r["arch"]: r for r in payload["rows"]}
    base = rows.get(payload["baseline"])
    if base is None or "recall_far" not in base["metrics"]:
        return "no baseline recall measured"
    b = base["metrics"]["recall_far"]["mean"]
    lines = [f"dense baseline far recall (beyond the {WINDOW}-token window): {b:.3f}"]
    for name, row in rows.items():
        if name == payload["baseline"]:
            continue
        m = row["metrics"].get("recall_far", {}).get("mean", float("nan"))
        if not math.isfinite(m):
            lines.append(f"{name}: far recall not measured")
        elif m > b + 0.02:
            lines.append(f"{name}: beats the baseline on far recall ({m:.3f} vs {b:.3f})")
        else:
            lines.append(f"{name}: does NOT beat the baseline on far recall ({m:.3f} vs {b:.3f})")
    return "\n".join(lines)


def run_demo(out_dir: str | Path = "memlm-demo", mode: str = "full",
             archs: Sequence[str] | None = None, seeds: Sequence[int] = (0,),
             progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    m = MODES[mode]
    archs = list(archs or demo_archs())
    t0 = time.perf_counter()
    data = DataConfig(source=f"{DATA_SPEC}:chars=400000,gap={GAP_RANGE[0]}-{GAP_RANGE[1]},"
                             f"near={NEAR_FRACTION}",
                      tokenizer="byte", seq_len=WINDOW)
    train_cfg = TrainConfig(max_steps=m.steps, batch_size=m.batch_size, lr=3e-3, min_lr=3e-4,
                            warmup_steps=max(m.steps // 10, 1), eval_every=m.steps,
                            eval_batches=m.eval_batches, save_every=m.steps,
                            log_every=max(m.steps // 10, 1), precision="bf16")
    log(f"memlm demo ({mode}): {', '.join(archs)} on {DATA_SPEC}, window {WINDOW}, "
        f"{m.steps} steps x {m.batch_size} x {WINDOW} tokens each")
    payload = run_comparison(archs, data, BASE_MODEL, train_cfg, seeds, out_dir,
                             arch_overrides=ARCH_OVERRIDES, extra_metrics=_recall_metric(m),
                             progress=progress, log=log)
    payload["verdict"] = verdict(payload)
    payload["wall_s"] = time.perf_counter() - t0
    import json

    (Path(out_dir) / "results.json").write_text(json.dumps(payload, indent=2, default=float))
    table = format_table(payload, [("val_nll", "val loss"), ("recall_near", "recall<=win"),
                                   ("recall_far", "recall>win"),
                                   ("tokens_per_sec", "train tok/s")])
    log("\n" + table + "\n\n" + payload["verdict"])
    from memlm.inspect.report import write_report

    report = write_report(out_dir, title="memlm demo: memory architectures vs dense baseline")
    log(f"\nreport: {report}   (total {payload['wall_s']:.0f}s)")
    payload["report"] = str(report)
    payload["table"] = table
    return payload
