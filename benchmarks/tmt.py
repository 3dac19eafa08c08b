"""TMT benchmarks: mesh attention cost, early-exit savings, TMT vs dense, and the leak.

    python benchmarks/tmt.py --quick                 # reduced run (minutes on a laptop CPU)
    python benchmarks/tmt.py                          # full run
    python benchmarks/tmt.py --parts attention,leak   # a subset

Parts (each prints a table; everything goes to benchmarks/results/tmt.json):

* attention: one attention layer, forward + backward, B=1, at growing S. Causal
  mesh attention (exact top-k selection) against PyTorch SDPA (fused/flash
  causal kernel) and an eager dense softmax(QK^T) that materialises S x S (what
  the original TMT did). Wall time is the median of a few runs; peak memory is
  the growth of the process's peak RSS, each point measured in a fresh
  subprocess (CPU has no allocator statistics).
* exits: a TMT trained with the lead's trainer, then swept over the exit
  threshold lambda: mean layers run, counted FLOPs (torch FlopCounterMode) and
  wall time of prefill and of cached decoding (B=1 and B=8), and the held-out
  loss change against full depth. The calibrated lambda (eps = 0.05) is marked;
  "compute-all" reruns the lowest lambda with nothing skipped (the original's
  behaviour: same outputs, no saving).
* compare: TMT vs the dense GPT at (nearly) equal parameters, same data, steps
  and seeds (3), trained with `memlm.train.trainer.train`; validation loss.
* leak: the fenced `tmt_faithful_leaky` mode next to causal TMT, same data,
  steps and seed. (a) full-sequence CE, the original's evaluation; (b) honest
  CE at positions t = 7, 15, ..., each scored on x[:t+1] alone; (c) uniform
  random tokens, whose floor is ln V.

Numbers depend on the machine and its load; the JSON records threads and
torch version. No number here is typed in: every one is measured by this run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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

import memlm  # noqa: E402
from benchmarks._common import time_with_peak  # noqa: E402
from memlm.config import load_run_config  # noqa: E402
from memlm.memory.mesh_attention import (  # noqa: E402
    Bias,
    LeakyModeWarning,
    alibi_slopes,
    dense_reference_attention,
    mesh_attention,
)

RESULTS = ROOT / "benchmarks" / "results" / "tmt.json"


# ----- attention: time and peak memory against S --------------------------------------------------


def attention_worker(impl: str, s: int, d_model: int, n_head: int, k: int, window: int,
                     reps: int, threads: int) -> dict[str, Any]:
    """Run in a fresh process: time and peak-memory growth of one fwd+bwd at length s."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    d = d_model // n_head
    bias = Bias(alibi_slopes(n_head))

    def make(length: int):
        q, kk, v = (torch.randn(1, n_head, length, d, requires_grad=True) for _ in range(3))
        qpos = torch.arange(length)[None]

        def run() -> None:
            if impl == "mesh":
                out, _ = mesh_attention(q, kk, v, qpos, bias, topk=k, window=window)
            elif impl == "sdpa":
                out = F.scaled_dot_product_attention(q, kk, v, is_causal=True)
            else:  # eager dense, S x S materialised, same bias
                out = dense_reference_attention(q, kk, v, qpos, bias)
            out.sum().backward()
        return run

    timing = time_with_peak(make, s, 256, reps)
    return {"impl": impl, "S": s, "time_s": timing["time_s"], "peak_mb": timing["peak_mb"]}


def bench_attention(args) -> dict[str, Any]:
    lengths = [1024, 2048, 4096, 8192] if args.quick else [1024, 2048, 4096, 8192, 16384]
    d_model, n_head = (256, 4) if args.quick else (512, 8)
    eager_max = 4096 if args.quick else 8192  # S x S fp32 x heads beyond this is many GB
    rows = []
    for s in lengths:
        for impl in ("sdpa", "mesh", "eager"):
            if impl == "eager" and s > eager_max:
                continue
            cmd = [sys.executable, __file__, "--_attn", impl, str(s), str(d_model), str(n_head),
                   str(args.mesh_k), str(args.mesh_window), str(1 if s >= 8192 else 2),
                   str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  attention S={s:>6} {impl:<6} {row['time_s']:8.3f} s  {row['peak_mb']:9.1f} MB",
                  flush=True)
    by = {(r["impl"], r["S"]): r for r in rows}

    def crossover(metric: str, other: str) -> int | None:
        for s in lengths:
            if ("mesh", s) in by and (other, s) in by and \
                    by[("mesh", s)][metric] < by[(other, s)][metric]:
                return s
        return None

    growth = [by[("mesh", b)]["peak_mb"] / max(by[("mesh", a)]["peak_mb"], 1e-9)
              for a, b in zip(lengths, lengths[1:])]
    return {
        "d_model": d_model, "n_head": n_head, "k": args.mesh_k, "window": args.mesh_window,
        "rows": rows,
        "mesh_peak_growth_per_doubling": growth,
        "crossover_time_vs_sdpa": crossover("time_s", "sdpa"),
        "crossover_time_vs_eager": crossover("time_s", "eager"),
        "crossover_memory_vs_eager": crossover("peak_mb", "eager"),
        "crossover_memory_vs_sdpa": crossover("peak_mb", "sdpa"),
    }


# ----- training helpers ---------------------------------------------------------------------------


def _run_config(arch_preset: str, args, seed: int, **model_overrides: Any):
    cfg = load_run_config(arch_preset)
    over = {"train.max_steps": args.steps, "train.seed": seed, "train.eval_every": args.steps,
            "train.eval_batches": args.eval_batches, "train.save_every": 10**9,
            "train.log_every": max(args.steps // 4, 1), "train.warmup_steps": args.steps // 10,
            "train.batch_size": args.batch_size,
            "data.source": f"builtin:stories:chars={args.chars}",
            "model.context_len": args.seq_len}
    if args.d_model:
        over["model.d_model"] = args.d_model
    over.update({f"model.{k}": v for k, v in model_overrides.items()})
    return cfg.with_overrides(over)


def _train(cfg):
    from memlm.train.trainer import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LeakyModeWarning)
        t = time.perf_counter()
        res = train(cfg, out_dir=None, progress=False)
    return res, time.perf_counter() - t


def _heldout(tokenizer, seq_len: int, n_rows: int, seed: int = 12345) -> torch.Tensor:
    """(n_rows, seq_len + 1) windows of fresh stories text the model never trained on."""
    from memlm.data.synthetic import stories_text

    ids = torch.tensor(tokenizer.encode(stories_text(n_rows * (seq_len + 1) * 2, seed=seed)))
    n = (len(ids) // (seq_len + 1)) * (seq_len + 1)
    return ids[:n].view(-1, seq_len + 1)[:n_rows]


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def _timed(fn, reps: int) -> float:
    with torch.no_grad():
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# ----- exits ----------------------------------------------------------------------------------------


def bench_exits(args) -> dict[str, Any]:
    cfg = _run_config("tmt-char-tiny", args, seed=1337)
    res, wall = _train(cfg)
    model = res.model.float().eval()
    n_layer = model.config.n_layer
    data = _heldout(res.tokenizer, args.seq_len, 24)
    x, y = data[:, :-1], data[:, 1:]
    calib, evalx, evaly = x[:8], x[8:], y[8:]
    from memlm.memory.early_exit import calibrate_exit_threshold

    cal = calibrate_exit_threshold(model, [calib], eps=0.05)
    prompt, new = 16, args.decode_tokens

    def decode(batch: int):
        ids = evalx[:batch, :prompt]

        def go():
            cache = model.make_cache(batch, prompt + new + 1)
            out = model(ids, cache=cache)
            for _ in range(new):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(nxt, cache=cache)
        return go

    rows = []
    lambdas: list[float | None] = [None, 0.9, 0.7, 0.5, 0.3, 0.0]
    if cal["lambda"] is not None and cal["lambda"] not in lambdas:
        lambdas.insert(1, cal["lambda"])
    for lam, skip in [(lam, True) for lam in lambdas] + [(0.0, False)]:
        model.config.exit_threshold = lam
        model.config.exit_skip = skip
        with torch.no_grad():
            out = model(evalx, targets=evaly, trace=True)
        row = {
            "lambda": lam, "skip": skip, "calibrated": lam is not None and lam == cal["lambda"],
            "val_loss": float(out.lm_loss),
            "mean_layers": float(out.trace["exit_layer"].float().mean()),
            "frac_exited_early": float((out.trace["exit_layer"] < n_layer).float().mean()),
            "prefill_gflops": _flops(lambda: model(evalx)) / 1e9,
            "prefill_s": _timed(lambda: model(evalx), args.reps),
            "decode_b1_s": _timed(decode(1), args.reps),
            "decode_b8_s": _timed(decode(8), args.reps),
            "decode_b8_gflops": _flops(decode(8)) / 1e9,
        }
        rows.append(row)
    model.config.exit_skip = True
    model.config.exit_threshold = None
    full = rows[0]
    for r in rows:
        r["loss_change"] = r["val_loss"] - full["val_loss"]
        for key in ("prefill_gflops", "prefill_s", "decode_b1_s", "decode_b8_s",
                    "decode_b8_gflops"):
            r[f"{key}_rel"] = r[key] / full[key]
    return {"train_wall_s": wall, "train_steps": args.steps, "n_layer": n_layer,
            "exit_min_layer": model.config.exit_min_layer, "calibration": cal, "rows": rows}


# ----- compare ----------------------------------------------------------------------------------------


def bench_compare(args) -> dict[str, Any]:
    rows = []
    for seed in args.seeds:
        for preset in ("gpt-char-tiny", "tmt-char-tiny"):
            res, wall = _train(_run_config(preset, args, seed))
            row = {"arch": res.model.config.arch, "seed": seed,
                   "params": res.model.num_params(), "val_loss": res.final["nll"],
                   "val_ppl": res.final["ppl"], "tokens_per_sec": res.tokens_per_sec,
                   "wall_s": wall, "causal": True}
            rows.append(row)
            print(f"  compare {row['arch']:<4} seed {seed}: val loss {row['val_loss']:.4f} "
                  f"({row['params']:,} params, {row['tokens_per_sec']:.0f} tok/s)", flush=True)
    summary = {}
    for arch in ("gpt", "tmt"):
        losses = [r["val_loss"] for r in rows if r["arch"] == arch]
        summary[arch] = {"mean": statistics.mean(losses),
                         "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                         "params": next(r["params"] for r in rows if r["arch"] == arch)}
    return {"steps": args.steps, "rows": rows, "summary": summary}


# ----- leak ----------------------------------------------------------------------------------------------


@torch.no_grad()
def honest_prefix_ce(model, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(full-sequence CE, prefix-only CE) at positions 7, 15, 23, ...

    Full-sequence: one forward over the whole window, the original's method.
    Prefix-only: position t scored from a forward over x[:, :t+1] alone, so no
    token after t can be seen. A causal model gives the same number twice.
    """
    positions = list(range(7, x.shape[1], 8))
    full_logits = model(x).logits
    full = [F.cross_entropy(full_logits[:, t].float(), y[:, t]) for t in positions]
    prefix = [F.cross_entropy(model(x[:, : t + 1]).logits[:, t].float(), y[:, t])
              for t in positions]
    return float(torch.stack(full).mean()), float(torch.stack(prefix).mean())


def _random_token_ce(mode: str, args, vocab: int = 64, seq: int = 64) -> float:
    """Held-out CE after training on i.i.d. uniform tokens (the floor is ln vocab)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LeakyModeWarning)
        model = memlm.build("tmt", vocab_size=vocab, n_layer=2, d_model=64, n_head=4,
                            context_len=seq, mesh_k=seq, mesh_window=0, pos_emb="rope",
                            n_anchors=4, attn_mode=mode, exit_min_layer=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(args.random_steps):
        ids = torch.randint(0, vocab, (16, seq + 1), generator=g)
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ids = torch.randint(0, vocab, (32, seq + 1), generator=g)
    with torch.no_grad():
        return float(model(ids[:, :-1], targets=ids[:, 1:]).lm_loss)


def bench_leak(args) -> dict[str, Any]:
    rows = []
    for mode in ("mesh", "tmt_faithful_leaky"):
        cfg = _run_config("tmt-char-tiny", args, seed=1337, attn_mode=mode, pos_emb="rope")
        res, wall = _train(cfg)
        model = res.model.float().eval()
        data = _heldout(res.tokenizer, args.seq_len, 16)
        full, prefix = honest_prefix_ce(model, data[:, :-1], data[:, 1:])
        rand = _random_token_ce(mode, args)
        leaky = mode != "mesh"
        rows.append({
            "mode": mode, "causal": not leaky, "label": "LEAKY" if leaky else "causal",
            "trainer_val_loss": res.final["nll"], "full_sequence_ce": full,
            "full_sequence_ppl": math.exp(full), "prefix_only_ce": prefix,
            "prefix_only_ppl": math.exp(prefix), "gap": prefix - full,
            "random_token_ce": rand, "random_token_floor": math.log(64), "train_wall_s": wall,
        })
        print(f"  leak {rows[-1]['label']:<6}: full-seq CE {full:.3f}  prefix-only CE {prefix:.3f}  "
              f"random-token CE {rand:.3f} (floor {math.log(64):.3f})", flush=True)
    return {"steps": args.steps, "random_steps": args.random_steps, "rows": rows}


# ----- main ---------------------------------------------------------------------------------------------


def print_tables(results: dict[str, Any]) -> None:
    if "attention" in results:
        a = results["attention"]
        print(f"\nMesh attention vs dense, fwd+bwd, B=1, D={a['d_model']}, H={a['n_head']}, "
              f"k={a['k']}, window={a['window']}")
        print(f"{'S':>6} | {'sdpa s':>8} {'mesh s':>8} {'eager s':>8} | "
              f"{'sdpa MB':>8} {'mesh MB':>8} {'eager MB':>9}")
        by = {(r["impl"], r["S"]): r for r in a["rows"]}
        for s in sorted({r["S"] for r in a["rows"]}):
            def cell(impl, key, fmt, s=s):
                r = by.get((impl, s))
                return format(r[key], fmt) if r else "-"
            print(f"{s:>6} | {cell('sdpa', 'time_s', '8.3f'):>8} {cell('mesh', 'time_s', '8.3f'):>8} "
                  f"{cell('eager', 'time_s', '8.3f'):>8} | {cell('sdpa', 'peak_mb', '8.1f'):>8} "
                  f"{cell('mesh', 'peak_mb', '8.1f'):>8} {cell('eager', 'peak_mb', '9.1f'):>9}")
        print("mesh peak-memory growth per doubling:",
              " ".join(f"{g:.2f}x" for g in a["mesh_peak_growth_per_doubling"]))
        for key in ("crossover_time_vs_sdpa", "crossover_time_vs_eager",
                    "crossover_memory_vs_eager", "crossover_memory_vs_sdpa"):
            print(f"{key}: {a[key] if a[key] is not None else 'none in the measured range'}")
    if "exits" in results:
        e = results["exits"]
        print(f"\nEarly exit sweep ({e['n_layer']} layers, exits from layer {e['exit_min_layer']}, "
              f"calibrated lambda = {e['calibration']['lambda']})")
        print(f"{'lambda':>7} {'mode':<11} {'layers':>6} {'early%':>6} {'dloss':>7} | "
              f"{'prefill FLOP':>12} {'prefill t':>9} | {'dec B1 t':>8} {'dec B8 t':>8} "
              f"{'dec FLOP':>8}")
        for r in e["rows"]:
            lam = "full" if r["lambda"] is None else f"{r['lambda']:.2f}"
            mode = ("skip" if r["skip"] else "compute-all") + ("*" if r["calibrated"] else "")
            print(f"{lam:>7} {mode:<11} {r['mean_layers']:6.2f} {100 * r['frac_exited_early']:6.1f} "
                  f"{r['loss_change']:+7.3f} | {r['prefill_gflops_rel']:11.2f}x "
                  f"{r['prefill_s_rel']:8.2f}x | {r['decode_b1_s_rel']:7.2f}x "
                  f"{r['decode_b8_s_rel']:7.2f}x {r['decode_b8_gflops_rel']:7.2f}x")
        print("(relative to full depth; * = calibrated at eps 0.05; dloss = held-out CE change)")
    if "compare" in results:
        c = results["compare"]
        print(f"\nTMT vs dense GPT, {c['steps']} steps, seeds "
              f"{sorted({r['seed'] for r in c['rows']})}")
        for arch, s in c["summary"].items():
            print(f"  {arch:<4} params {s['params']:>9,}  val loss {s['mean']:.4f} +- {s['std']:.4f}")
    if "leak" in results:
        lk = results["leak"]
        print(f"\nFaithful (LEAKY) vs causal TMT, {lk['steps']} steps, same data and seed")
        print(f"{'mode':<8} {'full-seq CE':>11} {'(ppl)':>7} {'prefix CE':>9} {'(ppl)':>7} "
              f"{'gap':>6} | {'random CE':>9} {'floor':>6}")
        for r in lk["rows"]:
            print(f"{r['label']:<8} {r['full_sequence_ce']:11.3f} {r['full_sequence_ppl']:7.2f} "
                  f"{r['prefix_only_ce']:9.3f} {r['prefix_only_ppl']:7.2f} {r['gap']:6.3f} | "
                  f"{r['random_token_ce']:9.3f} {r['random_token_floor']:6.3f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced sizes and steps")
    p.add_argument("--parts", default="attention,exits,compare,leak")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared, loaded machine)")
    p.add_argument("--mesh-k", type=int, default=32)
    p.add_argument("--mesh-window", type=int, default=128)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--random-steps", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (median)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    q = args.quick
    args.steps = args.steps or (150 if q else 2000)
    args.random_steps = args.random_steps or (100 if q else 300)
    args.seq_len = 64
    args.batch_size = 8 if q else 12
    args.d_model = 64 if q else None
    args.chars = 300_000 if q else 2_000_000
    args.eval_batches = 4 if q else 20
    args.reps = args.reps or (3 if q else 5)
    args.decode_tokens = 16 if q else 48
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    out = Path(args.out)
    # parts run separately accumulate in one file; each part records its own command
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results.update({"torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "machine": platform.processor() or platform.machine()})
    command = "python benchmarks/tmt.py " + " ".join(argv if argv is not None else sys.argv[1:])
    bench = {"attention": bench_attention, "exits": bench_exits, "compare": bench_compare,
             "leak": bench_leak}
    for part in parts:
        print(f"[{part}]", flush=True)
        t = time.perf_counter()
        results[part] = bench[part](args)
        results[part].update({"wall_s": time.perf_counter() - t, "command": command,
                              "quick": q, "threads": args.threads})
    print_tables({k: v for k, v in results.items() if k in parts})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_attn":
        impl, *nums = sys.argv[2:]
        s, d_model, n_head, k, window, reps, threads = map(int, nums)
        print(json.dumps(attention_worker(impl, s, d_model, n_head, k, window, reps, threads)))
    else:
        main()
