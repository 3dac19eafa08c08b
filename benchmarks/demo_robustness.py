"""Does memory win the demo on every seed, precision and thread count? (issue 15)

    python benchmarks/demo_robustness.py                       # the 12-run grid
    python benchmarks/demo_robustness.py --seeds 0 --precisions fp32 --threads 1   # one run
    python benchmarks/demo_robustness.py --markdown            # the measured rows as a table

Each run is the full `memlm demo` (its task, models, steps and scoring) for the dense
baseline and the architectures that carry memory across segments (ARMT, RMT, DNC,
tmt-xmem), at one seed, one precision (fp32, or bf16 autocast for training and
scoring) and one torch thread count. Different precisions and thread counts sum
floats in different orders, which stands in for running on other CPUs: a result that
holds only for one summation order is luck, not a property of the task.

Writes benchmarks/results/demo_robustness.json after every run (so an interrupted grid
keeps what it measured, and a rerun skips the runs already there): one row per
(memory architecture, run) with {"arch", "seed", "precision", "threads", "recall_far",
"baseline_recall_far", "z"} plus the answer count, z against chance and the run's wall
time, and the machine it ran on. Prints, per architecture, the smallest z and how many
runs clear z > 3.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine  # noqa: E402

MEMORY_ARCHS = ("armt", "rmt", "dnc", "tmt-xmem")


def one_run(seed: int, precision: str, threads: int, archs: list[str], work: str,
            steps: int | None) -> list[dict[str, Any]]:
    """Train and score the demo's models for one (seed, precision, threads); one row per
    memory architecture."""
    from memlm.experiments.demo import run_demo, verdict_rows

    overrides: dict[str, Any] = {"precision": precision, "threads": threads}
    if steps:
        overrides["steps"] = steps
    t0 = time.perf_counter()
    payload = run_demo(Path(work) / f"s{seed}-{precision}-t{threads}", mode="full",
                       archs=["gpt", *archs], seeds=(seed,), progress=False,
                       log=lambda _: None, workers=1, **overrides)
    wall = time.perf_counter() - t0
    rows = {r["arch"]: r for r in verdict_rows(payload)}
    base = rows["gpt"]
    return [{"arch": a, "seed": seed, "precision": precision, "threads": threads,
             "recall_far": rows[a]["recall_far"], "baseline_recall_far": base["recall_far"],
             "z": rows[a]["z"], "z_chance": rows[a]["z_chance"], "n_far": rows[a]["n_far"],
             "run_wall_s": round(wall, 1)} for a in archs]


def task_setup(steps: int | None) -> dict[str, Any]:
    """What a grid row's numbers depend on besides (seed, precision, threads): the demo's
    task, training settings and tiny models, as JSON data. Rows measured under another setup
    are not this grid's: a rerun after the demo changed starts the grid again."""
    from memlm.experiments.demo import (
        BASE_MODEL,
        EVAL_RECALL,
        MODES,
        RECALL_SEED,
        WINDOW,
        arch_overrides,
        recall_source,
    )

    m = MODES["full"]
    setup = {"source": recall_source(m.train_chars), "window": WINDOW,
             "steps": steps or m.steps, "batch_size": m.batch_size, "lr": m.lr,
             "bptt_window": m.bptt_window, "curriculum": m.curriculum, "layout": m.layout,
             "base_model": BASE_MODEL,
             "eval": {**EVAL_RECALL, "seed": RECALL_SEED, "rows": m.recall_rows,
                      "chars": m.recall_chars},
             "models": {a: arch_overrides(a) for a in ("gpt", *MEMORY_ARCHS)}}
    return json.loads(json.dumps(setup))  # tuples as lists, as read back from the file


def summary(rows: list[dict[str, Any]], z_needed: float) -> str:
    lines = [f"{'arch':<9} {'runs':>4} {'z > ' + format(z_needed, 'g'):>7} {'min z':>7} "
             f"{'min recall':>10} {'dense max':>9}"]
    for arch in dict.fromkeys(r["arch"] for r in rows):
        mine = [r for r in rows if r["arch"] == arch]
        zs = [r["z"] for r in mine if math.isfinite(r["z"])]
        lines.append(f"{arch:<9} {len(mine):>4} {sum(z > z_needed for z in zs):>7} "
                     f"{min(zs, default=math.nan):>7.3g} "
                     f"{min(r['recall_far'] for r in mine):>10.3g} "
                     f"{max(r['baseline_recall_far'] for r in mine):>9.3g}")
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]], z_needed: float = 3.0) -> str:
    """The measured runs as a markdown table: far recall (z against the dense baseline) per
    memory architecture and run, then per architecture how many runs clear z > z_needed."""
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    runs = list(dict.fromkeys((r["seed"], r["precision"], r["threads"]) for r in rows))
    by = {(r["seed"], r["precision"], r["threads"], r["arch"]): r for r in rows}
    head = ["seed", "precision", "threads", "dense", *archs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        first = next(by[(*run, a)] for a in archs if (*run, a) in by)
        cells = [str(run[0]), run[1], str(run[2]), f"{first['baseline_recall_far']:.3g}"]
        for a in archs:
            r = by.get((*run, a))
            cells.append("" if r is None else f"{r['recall_far']:.3g} (z {r['z']:.3g})"
                         + (" **" if r["z"] > z_needed else ""))
        lines.append("| " + " | ".join(cells) + " |")
    wins = []
    for a in archs:
        mine = [r for r in rows if r["arch"] == a]
        wins.append(f"{a} {sum(r['z'] > z_needed for r in mine)}/{len(mine)}")
    return ("\n".join(lines) + f"\n\nRuns with z > {z_needed:g} against the dense baseline "
            f"(marked **): " + ", ".join(wins) + f" (of {len(runs)} runs measured).")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--archs", default=",".join(MEMORY_ARCHS))
    ap.add_argument("--steps", type=int, default=None, help="override the demo's steps")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (separate processes)")
    ap.add_argument("--work", default="/tmp/memlm-demo-robustness", help="run folders")
    ap.add_argument("--out", default=str(RESULTS / "demo_robustness.json"))
    ap.add_argument("--fresh", action="store_true", help="ignore rows already in --out")
    ap.add_argument("--markdown", action="store_true",
                    help="print the rows already in --out as a markdown table; run nothing")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())["rows"]))
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    precisions = args.precisions.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    archs = args.archs.split(",")
    out = Path(args.out)
    setup = task_setup(args.steps)
    done: list[dict[str, Any]] = []
    if out.exists() and not args.fresh:
        old = json.loads(out.read_text())
        if old.get("setup") == setup:
            done = old.get("rows", [])
        elif old.get("rows"):
            # measured under another task or model setting: kept beside, not mixed in
            aside, n = out.with_name(out.stem + ".previous.json"), 1
            while aside.exists():  # never overwrite rows set aside before
                n += 1
                aside = out.with_name(f"{out.stem}.previous-{n}.json")
            aside.write_text(out.read_text())
            print(f"{out} was measured under another demo setup; moved its "
                  f"{len(old['rows'])} row(s) to {aside}", flush=True)
    have = {(r["seed"], r["precision"], r["threads"], r["arch"]) for r in done}
    # seeds vary fastest, so a grid cut short still has every seed at the first setting; a
    # run trains the baseline and only the architectures it still lacks (a grid measured for
    # ARMT first can be completed for the others later)
    grid = [((s, p, t), missing) for t, p, s in itertools.product(threads, precisions, seeds)
            if (missing := [a for a in archs if (s, p, t, a) not in have])]
    print(f"{len(grid)} run(s) to do, "
          f"{len({(r['seed'], r['precision'], r['threads']) for r in done})} already in {out}",
          flush=True)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine(), "z_needed": 3.0,
                                   "command": "python benchmarks/demo_robustness.py",
                                   "setup": setup, "rows": done}, indent=1) + "\n")

    def record(key: tuple[int, str, int], rows: list[dict[str, Any]]) -> None:
        done.extend(rows)
        save()
        print(f"seed {key[0]} {key[1]} threads {key[2]}: "
              + ", ".join(f"{r['arch']} {r['recall_far']:.3g} (z {r['z']:.3g})" for r in rows)
              + f" | dense {rows[0]['baseline_recall_far']:.3g} | {rows[0]['run_wall_s']:.0f}s",
              flush=True)

    if args.jobs <= 1:
        for key, missing in grid:
            record(key, one_run(*key, missing, args.work, args.steps))
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(one_run, *key, missing, args.work, args.steps): key
                       for key, missing in grid}
            for fut in as_completed(futures):
                record(futures[fut], fut.result())
    print(summary(done, 3.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
