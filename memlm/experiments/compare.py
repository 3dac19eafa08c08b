"""Honest side-by-side comparison of architectures: `memlm compare` and `memlm demo`.

Every architecture gets the same data, the same token budget, the same seeds and
(by default) a parameter count matched to a target within 5%, found by sizing
`d_model`, and is scored on the same validation token positions (recorded in
results.json as `setup.eval_positions`). Results are reported as mean +- 95% confidence interval over seeds
(Student t), with the change against the dense baseline, never as a single lucky
run.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memlm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from memlm.errors import ConfigError
from memlm.registry import ARCHITECTURES, build
from memlm.specs import parse_count

# two-sided 95% Student t quantiles by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(dof: int) -> float:
    if dof <= 0:
        return float("nan")
    keys = sorted(_T95)
    for k in keys:
        if dof <= k:
            return _T95[k]
    return 1.96


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval (nan width for one value)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return float("nan"), float("nan")
    if len(vals) == 1:
        return vals[0], float("nan")
    return statistics.fmean(vals), t95(len(vals) - 1) * statistics.stdev(vals) / math.sqrt(
        len(vals))


# ----- parameter matching -------------------------------------------------------------------


def count_params(arch: str, **overrides: Any) -> int:
    """Parameter count of an architecture at a size, without allocating real weights."""
    try:
        with torch.device("meta"):
            return build(arch, **overrides).num_params()
    except (NotImplementedError, RuntimeError, TypeError):
        return build(arch, **overrides).num_params()


def _head_count(d_model: int, wanted: int) -> int | None:
    """The head count closest to `wanted` that splits d_model into even head sizes."""
    options = [h for h in range(1, d_model + 1) if d_model % h == 0 and (d_model // h) % 2 == 0]
    return min(options, key=lambda h: (abs(h - wanted), -h)) if options else None


def match_params(arch: str, target: int, base: dict[str, Any], tolerance: float = 0.05
                 ) -> tuple[dict[str, Any], int]:
    """Size d_model so the model has ~`target` parameters (within `tolerance`).

    d_model is first searched in multiples of 2 * n_head (keeping the head count); when
    that grid is too coarse for a small target, d_model moves in steps of 2 and n_head
    becomes the nearest count that still gives even head sizes (RoPE needs them).
    """
    n_head = base.get("n_head", 4)
    step = 2 * n_head
    lo, hi = 1, max(2, 4096 // step)
    # parameter count grows monotonically with d_model: binary search
    while lo < hi:
        mid = (lo + hi) // 2
        if count_params(arch, **{**base, "d_model": mid * step}) < target:
            lo = mid + 1
        else:
            hi = mid
    candidates = [{**base, "d_model": k * step} for k in (lo - 1, lo) if k >= 1]
    fine = [d for d in range(max(2, (lo - 1) * step), lo * step + 1, 2)]
    for d in fine:
        h = _head_count(d, n_head)
        if h is not None:
            candidates.append({**base, "d_model": d, "n_head": h})
    best: tuple[tuple[bool, bool, float], dict[str, Any], int] | None = None
    for cfg in candidates:
        n = count_params(arch, **cfg)
        err = abs(n - target) / target
        # prefer keeping the requested head count when it is within tolerance
        key = (err > tolerance, cfg.get("n_head", n_head) != n_head, err)
        if best is None or key < best[0]:
            best = (key, cfg, n)
    assert best is not None
    _, cfg, n = best
    if abs(n - target) / target > tolerance:
        raise ConfigError(
            f"cannot size {arch} to {target:,} parameters within {tolerance:.0%} by d_model "
            f"(closest: {n:,} at d_model={cfg['d_model']}); change n_layer or the target."
        )
    return cfg, n


# ----- running ----------------------------------------------------------------------------


@dataclass
class ArchRuns:
    arch: str
    model_overrides: dict[str, Any]
    params: int
    params_non_embedding: int
    seeds: list[int] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    curves: list[list[tuple[int, float]]] = field(default_factory=list)
    run_dirs: list[str] = field(default_factory=list)


MetricFn = Callable[[Any, Any, RunConfig], dict[str, float]]


def run_comparison(
    archs: Sequence[str],
    data: DataConfig,
    base_model: dict[str, Any],
    train_cfg: TrainConfig,
    seeds: Sequence[int],
    out_dir: str | Path,
    target_params: int | None = None,
    arch_overrides: dict[str, dict[str, Any]] | None = None,
    extra_metrics: MetricFn | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every arch x seed with the same data and budget; return results.json content."""
    from memlm.train.trainer import train

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arch_overrides = arch_overrides or {}
    results: list[ArchRuns] = []
    positions: dict[str, Any] | None = None  # fixed by the first run, used by all
    for arch in archs:
        ARCHITECTURES.get(arch)  # unknown names fail before any training
    for arch in archs:
        base = {**base_model, **arch_overrides.get(arch, {})}
        if target_params:
            base, _ = match_params(arch, target_params, base)
        probe = build(arch, **base)
        runs = ArchRuns(arch, base, probe.num_params(), probe.num_params(non_embedding=True))
        del probe
        for seed in seeds:
            run_dir = out_dir / "runs" / f"{arch}-seed{seed}"
            cfg = RunConfig(
                model=ARCHITECTURES.get(arch).config_cls.from_dict({**base, "arch": arch}),
                train=train_cfg.replace(seed=seed),
                data=data,
            )
            log(f"[compare] {arch} seed {seed}: {runs.params:,} params")
            res = train(cfg, run_dir, overwrite=True, progress=progress)
            scores, positions = score_on_shared_positions(res, cfg, positions)
            final = {f"val_{k}": v for k, v in scores.items() if isinstance(v, (int, float))}
            final["tokens_per_sec"] = res.tokens_per_sec
            final["wall_s"] = res.wall_time
            if extra_metrics is not None:
                final.update(extra_metrics(res.model, res.tokenizer, cfg))
            runs.seeds.append(seed)
            runs.metrics.append(final)
            runs.curves.append([(r["step"], r["val_nll"]) for r in res.history
                                if r.get("kind") == "val"])
            runs.run_dirs.append(str(run_dir))
        results.append(runs)
    payload = summarise(results, baseline=archs[0])
    payload["setup"] = {
        "archs": list(archs), "seeds": list(seeds), "data": data.to_dict(),
        "train": train_cfg.to_dict(), "base_model": base_model,
        "target_params": target_params,
        "eval_positions": positions,
        "tokens_per_run": train_cfg.max_steps * train_cfg.batch_size * train_cfg.grad_accum
        * (data.seq_len or base_model.get("context_len", 0)),
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    from memlm.plots import plot_curve_overlay

    curves = {}
    for r in results:
        if r.curves and r.curves[0]:
            steps = [s for s, _ in r.curves[0]]
            mean = np.mean([[v for _, v in c] for c in r.curves if len(c) == len(steps)], axis=0)
            curves[r.arch] = list(zip(steps, mean.tolist()))
    plot_curve_overlay(curves, out_dir / "curves.png", ylabel="val loss (nats/token)",
                       title="validation loss, mean over seeds")
    return payload


def shared_positions(n_val: int, batch_size: int, seq_len: int, eval_batches: int
                     ) -> dict[str, Any]:
    """The validation targets every architecture is scored on: tokens 1..N of the val split.

    The trainer's own validation caps batches, and a batch holds `batch_size`
    windows for a stateless model but one memory stream for a stateful one, so
    the two would be scored on different numbers of tokens (gpt 40,960 vs armt
    2,560 at the defaults). Here N is the trainer's budget for windows
    (eval_batches x batch_size x seq_len), cut to whole blocks of the val
    split, and every model scores exactly targets 1..N: stateless ones in
    windows, stateful ones as `rows` streams of N/rows tokens each.
    """
    block = batch_size * seq_len
    n = min(eval_batches * block, (n_val - 1) // block * block)
    rows = batch_size
    if n == 0:  # the val split is shorter than one batch of windows: all of it, one stream
        n, rows = n_val - 1, 1
    return {"split": "val", "first": 1, "last": n, "tokens": n, "rows": rows}


def score_on_shared_positions(res: Any, cfg: RunConfig, positions: dict[str, Any] | None
                              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics of the trained model on the shared positions, the positions).

    `positions` is None for the first run of a comparison: it is fixed from this
    run's val split and returned for the others. Data sources without a text val
    split (task generators such as builtin:recall) are scored by the trainer on
    the same seeded validation batches for every architecture; their positions
    record says so, and the trainer's final metrics are used.
    """
    from memlm.eval.perplexity import evaluate
    from memlm.train.trainer import prepare_bundle

    tcfg = cfg.train
    bundle = prepare_bundle(cfg, res.model.is_stateful, res.tokenizer, progress=False)
    if bundle.val_tokens is None:
        return res.final, positions or {"split": "val", "kind": "task batches",
                                        "batches": tcfg.eval_batches,
                                        "batch_size": tcfg.batch_size,
                                        "seed": tcfg.seed + 1}
    seq_len = cfg.data.seq_len or cfg.model.context_len
    if positions is None:
        positions = shared_positions(len(bundle.val_tokens), tcfg.batch_size, seq_len,
                                     tcfg.eval_batches)
    tokens = np.asarray(bundle.val_tokens[: positions["last"] + 1])
    scores = evaluate(res.model, tokens, seq_len=seq_len, batch_size=positions["rows"],
                      rows=positions["rows"], precision=tcfg.precision)
    if scores["tokens"] != positions["tokens"]:
        raise ConfigError(
            f"{cfg.model.arch} scored {scores['tokens']} validation tokens, not the "
            f"{positions['tokens']} every architecture must be scored on; the val split of "
            "this run differs from the first run's (different data or tokenizer?).")
    return scores, positions


def summarise(results: Sequence[ArchRuns], baseline: str) -> dict[str, Any]:
    rows = []
    base = next((r for r in results if r.arch == baseline), None)
    base_means = {}
    if base is not None:
        for key in base.metrics[0] if base.metrics else []:
            base_means[key] = mean_ci([m.get(key) for m in base.metrics])[0]
    for r in results:
        row: dict[str, Any] = {"arch": r.arch, "params": r.params,
                               "params_non_embedding": r.params_non_embedding,
                               "model": r.model_overrides, "seeds": r.seeds,
                               "runs": r.run_dirs, "metrics": {}}
        keys = r.metrics[0].keys() if r.metrics else []
        for key in keys:
            vals = [m.get(key) for m in r.metrics]
            mean, ci = mean_ci(vals)
            entry = {"mean": mean, "ci95": ci, "values": vals}
            if key in base_means and r.arch != baseline and base_means[key]:
                entry["delta_vs_baseline"] = mean - base_means[key]
            row["metrics"][key] = entry
        rows.append(row)
    return {"baseline": baseline, "rows": rows}


def format_table(payload: dict[str, Any], metrics: Sequence[tuple[str, str]]) -> str:
    """Rows = architectures; columns = 'mean +- ci (delta)' for each (key, label)."""
    head = ["arch", "params"] + [label for _, label in metrics]
    lines = []
    for row in payload["rows"]:
        cells = [row["arch"], f"{row['params'] / 1e6:.3f}M"]
        for key, _ in metrics:
            m = row["metrics"].get(key)
            if m is None:
                cells.append("n/a")
                continue
            text = f"{m['mean']:.4f}"
            if math.isfinite(m["ci95"]):
                text += f" ±{m['ci95']:.4f}"
            if "delta_vs_baseline" in m:
                text += f" ({m['delta_vs_baseline']:+.4f})"
            cells.append(text)
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)),
           "-+-".join("-" * w for w in widths)]
    out += [" | ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    return "\n".join(out)


def compare(
    archs: Sequence[str],
    out_dir: str | Path,
    *,
    config: str | Path | None = None,
    size: dict[str, int] | None = None,
    data: str | None = None,
    tokenizer: str | None = None,
    tokens: str | int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    params: str | int | None = None,
    seeds: Sequence[int] = (0,),
    progress: bool = True,
) -> str:
    """`memlm compare`: train every arch at a matched size, write results and a report.

    The base model, training and data settings come from the run config `config`, or
    from `size` (n_layer, n_head, d_model, context_len) with default training settings;
    `data`/`tokenizer` replace the data source. The run's length comes from a token
    budget or a step count (memlm.train.budget). Returns the printable summary.
    """
    from memlm.config import load_run_config
    from memlm.experiments.report import write_report
    from memlm.train.budget import budget_train_config

    if config:
        base_run = load_run_config(config)
        base_model = {k: v for k, v in base_run.model.to_dict().items() if k != "arch"}
        train_cfg, data_cfg = base_run.train, base_run.data
    else:
        base_model, train_cfg, data_cfg = dict(size or {}), TrainConfig(), DataConfig()
    if data:
        data_cfg = data_cfg.replace(source=data)
    if tokenizer:
        data_cfg = data_cfg.replace(tokenizer=tokenizer)
    seq_len = data_cfg.seq_len or base_model.get("context_len", 256)
    train_cfg = budget_train_config(train_cfg, seq_len, tokens, steps, batch_size)
    payload = run_comparison(archs, data_cfg, base_model, train_cfg, seeds, out_dir,
                             target_params=parse_count(params) if params else None,
                             progress=progress)
    keys = [("val_nll", "val loss"), ("val_ppl", "ppl"), ("val_top1", "top-1"),
            ("tokens_per_sec", "train tok/s")]
    report = write_report(out_dir)
    out_dir = Path(out_dir)
    return (format_table(payload, keys) + f"\nresults: {out_dir / 'results.json'}  curves: "
            f"{out_dir / 'curves.png'}  report: {report}")


__all__ = ["ModelConfig", "compare", "format_table", "match_params", "mean_ci",
           "run_comparison"]
