"""Routed vs exact mesh attention vs SDPA: scaling, quality at matched steps, TMT vs dense speed.

    python benchmarks/mesh_scaling.py                        # everything (about 30-60 min, 1 thread)
    python benchmarks/mesh_scaling.py --parts scaling        # the attention layer only
    python benchmarks/mesh_scaling.py --parts loss --steps 300 --seeds 3
    python benchmarks/mesh_scaling.py --parts speed
    python benchmarks/mesh_scaling.py --quick                # smoke run (minutes)

Parts (each prints a table; all go to benchmarks/results/mesh_scaling.json):

* scaling: one attention layer, forward + backward, batch 1, d_model 256, 8 heads
  (head dim 32), fp32, at S = 1K, 2K, ..., 64K. `routed` is mesh_mode="routed"
  (cluster assignment of the keys included; window 128, bucket 64, 8 clusters),
  `exact` the exact top-k mesh (k 32, window 128), `sdpa` PyTorch's fused causal
  scaled_dot_product_attention. Q/K/V projections are left out (the same for all
  three). Each point runs in a fresh process: wall time is the median of the
  timed runs after one warm-up, peak memory the growth of the process's peak
  RSS. A point whose predicted time (from the exponent of the last two points)
  exceeds --max-seconds, or whose predicted memory exceeds --mem-limit-gb, is
  skipped and the reason recorded. The scaling exponent is the least-squares
  slope of log time against log S; the crossover is the first S from which
  routed is faster (and uses less memory) than SDPA at every measured length.
* loss: TMT with mesh_mode exact vs routed, trained with the lead's trainer on
  tiny Shakespeare (character level, ../shared/data; skipped with a reason when
  absent), same seeds and steps; held-out loss at matched steps, mean and a 95%
  t-interval over the seeds.
* speed: training tokens/s of TMT (exact and routed) against the dense gpt at
  the issue's `small` size (6 layers, 8 heads, d 256, seq 256, batch 8, vocab
  256), fp32 AdamW steps in one process, measurement windows interleaved
  gpt/tmt/gpt/... so all see the same machine load; the median ratio per round.
  --speed-ablations adds TMT with a fixed decay (no bias gradient, so SDPA can
  use its fused kernel) and that without exits, anchors and the dual FFN.

The machine and its load go into the JSON; nothing here is typed in.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import RESULTS, SHARED_DATA, machine, time_with_peak  # noqa: E402

OUT = RESULTS / "mesh_scaling.json"
IMPLS = ("sdpa", "routed", "exact")
#: t-quantiles (two-sided 95%) for n - 1 degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# ----- scaling: one layer, fresh process per point ---------------------------------------------


def layer_worker(impl: str, s: int, d_model: int, n_head: int, reps: int, threads: int
                 ) -> dict[str, Any]:
    """Time and peak-memory growth of one forward + backward at length s (fresh process)."""
    from memlm.memory.mesh_attention import Bias, RouteCentroids, alibi_slopes, mesh_attention

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    d = d_model // n_head
    bias = Bias(alibi_slopes(n_head))
    router = RouteCentroids(n_head, 8, d, 0.99)

    def make(length: int):
        q, k, v = (torch.randn(1, n_head, length, d, requires_grad=True) for _ in range(3))
        qpos = torch.arange(length)[None]

        def run() -> None:
            if impl == "sdpa":
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif impl == "routed":
                out, _ = mesh_attention(q, k, v, qpos, bias, topk=0, window=128, mode="routed",
                                        route=router.assign(k), bucket=64, want_selection=False)
            else:
                out, _ = mesh_attention(q, k, v, qpos, bias, topk=32, window=128)
            out.sum().backward()
        return run

    return {"impl": impl, "S": s, **time_with_peak(make, s, 512, reps)}


def _fit_exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log y against log S."""
    if len(points) < 2:
        return None
    xs = [math.log(s) for s, _ in points]
    ys = [math.log(max(y, 1e-9)) for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _predict(rows: list[dict[str, Any]], key: str, s: int, default_exp: float) -> float | None:
    """Extrapolate `key` to length s from the last two measured points (or one and default_exp)."""
    if not rows:
        return None
    last = rows[-1]
    exp = default_exp
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        exp = max(math.log(max(b[key], 1e-9) / max(a[key], 1e-9)) / math.log(b["S"] / a["S"]), 1.0)
    return last[key] * (s / last["S"]) ** exp


def _crossover(by: dict[tuple[str, int], dict], lengths: list[int], metric: str) -> int | None:
    """First S from which routed beats SDPA on `metric` at every length where both ran."""
    both = [s for s in lengths if ("routed", s) in by and ("sdpa", s) in by]
    for i, s in enumerate(both):
        if all(by[("routed", x)][metric] < by[("sdpa", x)][metric] for x in both[i:]):
            return s
    return None


def bench_scaling(args, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure the points asked for; with --impls, merge them into the previous result."""
    lengths = [1024 * 2 ** i for i in range(7)] if not args.quick else [1024, 2048, 4096]
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    impls = [i for i in IMPLS if i in args.impls.split(",")]
    d_model, n_head = 256, 8
    quadratic = {"sdpa": 2.0, "exact": 2.0, "routed": 1.0}
    rows: dict[str, list[dict[str, Any]]] = {impl: [] for impl in IMPLS}
    skipped: list[dict[str, Any]] = []
    if previous and set(impls) != set(IMPLS):  # keep the other points of the earlier run
        for r in previous.get("rows", []):
            if r["impl"] not in impls or r["S"] not in lengths:
                rows[r["impl"]].append(r)
        skipped = [x for x in previous.get("skipped", [])
                   if x["impl"] not in impls or x["S"] not in lengths]
        for impl in IMPLS:
            rows[impl].sort(key=lambda r: r["S"])
    for s in lengths:
        for impl in impls:
            if any(x["impl"] == impl and x["S"] < s for x in skipped):
                skipped.append({"impl": impl, "S": s, "reason": "a shorter length was skipped"})
                continue
            reps = args.reps if s <= 8192 else 1
            t_pred = _predict(rows[impl], "time_s", s, quadratic[impl])
            m_pred = _predict(rows[impl], "peak_mb", s, 1.0)
            if t_pred is not None and t_pred * (1 + reps) > args.max_seconds:
                skipped.append({"impl": impl, "S": s, "reason": f"predicted {t_pred:.0f} s per "
                                f"fwd+bwd x {1 + reps} runs > --max-seconds {args.max_seconds}"})
                print(f"  S={s:>6} {impl:<6} skipped: {skipped[-1]['reason']}", flush=True)
                continue
            if m_pred is not None and m_pred > args.mem_limit_gb * 1024:
                skipped.append({"impl": impl, "S": s, "reason": f"predicted {m_pred / 1024:.1f} GiB"
                                f" > --mem-limit-gb {args.mem_limit_gb}"})
                print(f"  S={s:>6} {impl:<6} skipped: {skipped[-1]['reason']}", flush=True)
                continue
            cmd = [sys.executable, __file__, "--_layer", impl, str(s), str(d_model), str(n_head),
                   str(reps), str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                reason = (out.stderr.strip().splitlines() or ["no output"])[-1][:200]
                skipped.append({"impl": impl, "S": s, "reason": f"worker failed: {reason}"})
                print(f"  S={s:>6} {impl:<6} failed: {reason}", flush=True)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows[impl].append(row)
            print(f"  S={s:>6} {impl:<6} {row['time_s']:9.3f} s {row['peak_mb']:9.1f} MB",
                  flush=True)
    for impl in IMPLS:
        rows[impl].sort(key=lambda r: r["S"])
    lengths = sorted({r["S"] for impl in IMPLS for r in rows[impl]} | set(lengths))
    by = {(r["impl"], r["S"]): r for impl in IMPLS for r in rows[impl]}
    exps = {impl: _fit_exponent([(r["S"], r["time_s"]) for r in rows[impl] if r["S"] >= 2048])
            for impl in IMPLS}
    mem_exps = {impl: _fit_exponent([(r["S"], r["peak_mb"]) for r in rows[impl]
                                     if r["S"] >= 2048]) for impl in IMPLS}
    res = {"d_model": d_model, "n_head": n_head, "dtype": "float32", "batch": 1,
           "routed": {"window": 128, "bucket": 64, "clusters": 8},
           "exact": {"window": 128, "k": 32}, "rows": [r for impl in IMPLS for r in rows[impl]],
           "skipped": skipped, "time_exponent_from_2k": exps, "memory_exponent_from_2k": mem_exps,
           "crossover_time_S": _crossover(by, lengths, "time_s"),
           "crossover_memory_S": _crossover(by, lengths, "peak_mb")}
    print("  time exponent (S >= 2K): " + ", ".join(
        f"{k} {v:.2f}" for k, v in exps.items() if v is not None))
    print(f"  crossover with SDPA: time from S = {res['crossover_time_S']}, memory from "
          f"S = {res['crossover_memory_S']}")
    return res


# ----- loss at matched steps: exact vs routed on tiny Shakespeare ------------------------------


def bench_loss(args) -> dict[str, Any]:
    from memlm.config import load_run_config
    from memlm.train.trainer import train

    path = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not path.exists():
        print(f"  loss: skipped, {path} is absent")
        return {"skipped": f"{path} is absent"}
    modes = {"exact": {"mesh_mode": "exact"}, "routed": {"mesh_mode": "routed"}}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    every = max(args.steps // 6, 1)
    for seed in range(1337, 1337 + args.seeds):
        for mode, extra in modes.items():
            over = {"train.max_steps": args.steps, "train.seed": seed, "train.eval_every": every,
                    "train.eval_batches": args.eval_batches, "train.save_every": 10**9,
                    "train.log_every": every, "train.warmup_steps": args.steps // 10,
                    "train.batch_size": 8, "train.precision": "fp32",
                    "data.source": str(path), "data.tokenizer": "char",
                    "model.context_len": args.seq_len, "model.mesh_window": args.loss_window,
                    "model.mesh_k": args.loss_k, "model.mesh_bucket": args.loss_bucket,
                    "model.mesh_clusters": args.loss_clusters,
                    "model.mesh_block_q": 64, "model.mesh_block_k": 128}
            over.update({f"model.{k}": v for k, v in extra.items()})
            cfg = load_run_config("tmt-char-tiny").with_overrides(over)
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = train(cfg, out_dir=None, progress=False)
            wall = time.perf_counter() - t
            curve = [(h["step"], h["val_nll"]) for h in res.history if h.get("kind") == "val"]
            runs[mode].append({"seed": seed, "val_loss": curve[-1][1], "curve": curve,
                               "wall_s": wall, "tokens_per_s": res.tokens_per_sec})
            print(f"  loss seed {seed} {mode:<6} val {curve[-1][1]:.4f}  ({wall:.0f} s)",
                  flush=True)
    summary = {}
    for mode in modes:
        vals = [r["val_loss"] for r in runs[mode]]
        mean = statistics.fmean(vals)
        half = T95.get(len(vals) - 1, 1.96) * statistics.stdev(vals) / math.sqrt(len(vals)) \
            if len(vals) > 1 else float("nan")
        summary[mode] = {"mean": mean, "ci95": half}
    diffs = [r["val_loss"] - e["val_loss"] for r, e in zip(runs["routed"], runs["exact"])]
    d_mean = statistics.fmean(diffs)
    d_half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs)) \
        if len(diffs) > 1 else float("nan")
    for mode in modes:
        print(f"  {mode:<6} val loss {summary[mode]['mean']:.4f} +- {summary[mode]['ci95']:.4f}")
    print(f"  routed - exact (paired by seed): {d_mean:+.4f} +- {d_half:.4f}")
    return {"steps": args.steps, "seq_len": args.seq_len, "window": args.loss_window,
            "k": args.loss_k, "bucket": args.loss_bucket, "clusters": args.loss_clusters,
            "preset": "tmt-char-tiny", "data": "tinyshakespeare (char)", "runs": runs,
            "summary": summary, "routed_minus_exact": {"mean": d_mean, "ci95": d_half}}


# ----- training speed at `small`: TMT vs dense gpt, interleaved ----------------------------------


def bench_speed(args) -> dict[str, Any]:
    import memlm

    torch.set_num_threads(args.threads)
    small = dict(vocab_size=256, n_layer=6, n_head=8, d_model=256, context_len=256)
    models = {"gpt": ("gpt", {}), "tmt-exact": ("tmt", {"mesh_mode": "exact"}),
              "tmt-routed": ("tmt", {"mesh_mode": "routed"})}
    if args.speed_ablations:  # what limits TMT: a bias with a gradient, then the extras
        models["tmt-routed-fixed-decay"] = ("tmt", {"mesh_mode": "routed",
                                                    "decay": "alibi_fixed"})
        models["tmt-routed-bare"] = ("tmt", {"mesh_mode": "routed", "decay": "alibi_fixed",
                                             "depth_mode": "none", "n_anchors": 0,
                                             "ffn_type": "dense"})
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (8, 257), generator=g)
    x, y = batch[:, :-1], batch[:, 1:]
    states = {}
    for name, (arch, over) in models.items():
        torch.manual_seed(0)
        model = memlm.build(arch, **small, **over).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        states[name] = (model, opt)

    def window(name: str, steps: int) -> float:
        model, opt = states[name]
        t = time.perf_counter()
        for _ in range(steps):
            out = model(x, targets=y)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            model.on_train_step_end(1, 10)
        return steps * x.numel() / (time.perf_counter() - t)

    for name in models:
        window(name, 2)  # warm-up
    tps: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.speed_rounds):
        for name in models:
            tps[name].append(window(name, args.speed_steps))
    med = {name: statistics.median(v) for name, v in tps.items()}
    ratios = {name: statistics.median(a / b for a, b in zip(tps[name], tps["gpt"]))
              for name in models if name != "gpt"}
    for name in models:
        extra = f"  ratio vs gpt {ratios[name]:.2f}" if name in ratios else ""
        print(f"  {name:<11} {med[name]:8.0f} tokens/s{extra}", flush=True)
    return {"config": {**small, "batch": 8, "precision": "fp32", "optimizer": "AdamW"},
            "tokens_per_s": tps, "median_tokens_per_s": med, "ratio_vs_gpt": ratios,
            "rounds": args.speed_rounds, "steps_per_window": args.speed_steps}


# ----- driver ----------------------------------------------------------------------------------


def impls_of(args) -> list[str]:
    return [i for i in IMPLS if i in args.impls.split(",")]



def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_layer":
        impl, s, dm, nh, reps, th = argv[1:7]
        print(json.dumps(layer_worker(impl, int(s), int(dm), int(nh), int(reps), int(th))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="scaling,loss,speed")
    p.add_argument("--quick", action="store_true", help="smoke sizes: S <= 4K, 60 steps, 2 seeds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lengths", default="", help="comma-separated S for the scaling part")
    p.add_argument("--impls", default=",".join(IMPLS),
                   help="scaling: which of sdpa,routed,exact to measure (a subset is merged "
                        "into the scaling result already in --out)")
    p.add_argument("--reps", type=int, default=2, help="timed runs per point (1 above 8K)")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="skip a scaling point predicted to take longer (all its runs)")
    p.add_argument("--mem-limit-gb", type=float, default=12.0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--loss-window", type=int, default=32)
    p.add_argument("--loss-k", type=int, default=16)
    p.add_argument("--loss-bucket", type=int, default=32)
    p.add_argument("--loss-clusters", type=int, default=4)
    p.add_argument("--speed-rounds", type=int, default=3)
    p.add_argument("--speed-steps", type=int, default=3)
    p.add_argument("--speed-ablations", action="store_true",
                   help="speed: also TMT with a fixed (gradient-free) decay, and that without "
                        "exits, anchors and the dual FFN")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.speed_rounds = 60, 2, 1
    torch.set_num_threads(args.threads)
    out_path = Path(args.out)
    results: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    results["machine"] = machine()
    results["machine"]["note"] = "shared 2-core machine: other jobs ran alongside, timings noisy"
    for part in args.parts.split(","):
        print(f"== {part}", flush=True)
        t = time.perf_counter()
        if part == "scaling":
            res = bench_scaling(args, results.get("scaling"))
        else:
            res = {"loss": bench_loss, "speed": bench_speed}[part](args)
        command = "python benchmarks/mesh_scaling.py " + " ".join(argv)
        prev = results.get(part, {}) if part == "scaling" else {}
        earlier = prev.get("commands") or ([prev["command"]] if "command" in prev else [])
        res["commands"] = [*earlier, command] if len(impls_of(args)) < 3 and earlier \
            else [command]
        res["wall_s"] = time.perf_counter() - t
        res["loadavg_1_5_15_after"] = machine().get("loadavg_1_5_15")
        results[part] = res
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
