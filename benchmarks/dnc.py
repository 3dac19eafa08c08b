"""DNC benchmark: training speed next to the dense baseline, and recall beyond the window.

    python benchmarks/dnc.py --quick          # a few minutes on 2 CPU cores
    python benchmarks/dnc.py                  # larger shapes, distances 1-3, 3 seeds

Part 1, speed. Training tokens/s (forward + backward + AdamW step, bf16 autocast as in
the trainer) of the DNC and of the dense GPT with the same backbone shape. The DNC's
per-token memory recurrence is also timed alone (forward + backward of the memory
module on a random hidden state of the same shape), so the table shows how much of the
step the sequential loop costs. With `--compile` the memory step is torch.compile'd too.

Part 2, recall vs distance. A fact (KEY value) ends segment 0; segment D opens with
QUERY and the target is the value. The attention window is one segment, so the dense
model cannot see the fact for D >= 1 and sits at chance (1 / n_values). Both models
train on fresh episodes with truncated BPTT over the whole episode (D + 1 segments).
A dense model whose window holds the whole episode is the "more context" reference.

Prints tables and writes benchmarks/results/dnc.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import memlm
from memlm.models.dnc import DNCConfig
from memlm.types import IGNORE_INDEX

RESULTS = Path(__file__).resolve().parent / "results" / "dnc.json"


# ----- part 1: speed --------------------------------------------------------------------------
def _train_step_time(model, batch: int, seq_len: int, vocab: int,
                     iters: int) -> tuple[float, float]:
    """Best-of-N seconds of one training step (fwd + bwd + AdamW) on random tokens, and the
    first step's seconds (which include any compilation)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    state = model.init_state(batch)
    times = []
    for i in range(iters + 2):  # two warm-up steps
        ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids[:, :-1], targets=ids[:, 1:], state=state)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state = model.detach_state(out.state)
        if i == 0:
            first = time.perf_counter() - t0
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return min(times), first  # best of N: the least disturbed by other processes


def _recurrence_time(model, batch: int, seq_len: int, iters: int) -> float:
    """Best-of-N seconds of the memory module alone (fwd + bwd) on a random hidden state."""
    mem = model.memory
    d = model.config.d_model
    times = []
    for i in range(iters + 2):
        h = torch.randn(batch, seq_len, d, requires_grad=True)
        t0 = time.perf_counter()
        res = mem(h, mem.init_state(batch))
        (res.out.float().square().mean() + res.address.mean()).backward()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return min(times)  # best of N: the least disturbed by other processes on a shared CPU


def bench_speed(shape: dict, memory: dict, batch: int, iters: int,
                compile_chunks: list[int]) -> dict:
    """The dense GPT, the eager DNC and the DNC with `compile_step` at each `compile_chunk`."""
    seq_len = shape["context_len"]
    torch.manual_seed(0)
    dense = memlm.build("gpt", **shape)
    t_dense, _ = _train_step_time(dense, batch, seq_len, shape["vocab_size"], iters)
    rows = {"gpt": {"params": dense.num_params(), "step_s": t_dense,
                    "tokens_per_s": batch * seq_len / t_dense}}
    variants = [("dnc", {})] + [(f"dnc+compile/{c}", {"compile_step": True, "compile_chunk": c})
                                for c in compile_chunks]
    for name, extra in variants:
        torch.manual_seed(0)
        model = memlm.build("dnc", **shape, **memory, **extra)
        t, first = _train_step_time(model, batch, seq_len, shape["vocab_size"], iters)
        t_rec = _recurrence_time(model, batch, seq_len, iters)
        rows[name] = {"params": model.num_params(), "step_s": t, "first_step_s": first,
                      "tokens_per_s": batch * seq_len / t, "recurrence_s": t_rec,
                      "recurrence_share": t_rec / t, "slowdown_vs_gpt": t / t_dense}
    return rows


# ----- part 2: recall vs distance --------------------------------------------------------------
KEY, QUERY = 0, 1


def recall_episodes(g, batch, seg_len, distance, vocab, n_values):
    """[B, D+1, T] inputs and targets: KEY value at the end of segment 0, QUERY at segment D."""
    x = torch.randint(2 + n_values, vocab, (batch, distance + 1, seg_len), generator=g)
    value = torch.randint(2, 2 + n_values, (batch,), generator=g)
    x[:, 0, -2], x[:, 0, -1], x[:, -1, 0] = KEY, value, QUERY
    y = torch.full_like(x, IGNORE_INDEX)
    y[:, -1, 0] = value
    return x, y


def train_recall(arch: str, distance: int, steps: int, seed: int, seg_len: int, vocab: int,
                 n_values: int, batch: int = 32, lr: float = 3e-3,
                 full_window: bool = False) -> float:
    """Query accuracy after `steps` AdamW steps; `full_window` gives the dense model the episode."""
    torch.manual_seed(seed)
    window = seg_len * (distance + 1) if full_window else seg_len
    cfg = dict(vocab_size=vocab, n_layer=1, d_model=32, n_head=2, context_len=window)
    if arch == "dnc":
        cfg.update(mem_slots=8, mem_width=16, num_reads=1, mem_kl=False)
    model = memlm.build(arch, **cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)

    def run(x, y=None):
        if full_window:
            flat_y = None if y is None else y.flatten(1)
            return model(x.flatten(1), targets=flat_y).logits[:, -seg_len:]
        state, out = model.init_state(x.shape[0]), None
        for s in range(distance + 1):
            out = model(x[:, s], targets=None if y is None else y[:, s], state=state)
            state = out.state
        return out

    for _ in range(steps):
        x, y = recall_episodes(g, batch, seg_len, distance, vocab, n_values)
        if full_window:
            out = model(x.flatten(1), targets=y.flatten(1))
        else:
            out = run(x, y)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    x, y = recall_episodes(torch.Generator().manual_seed(10_000), 512, seg_len, distance, vocab,
                           n_values)
    with torch.no_grad():
        logits = run(x) if full_window else run(x).logits
    return (logits[:, 0].argmax(-1) == y[:, -1, 0]).float().mean().item()


def bench_recall(distances: list[int], seeds: list[int], steps: int, seg_len: int = 8,
                 vocab: int = 16, n_values: int = 4) -> dict:
    out = {"chance": 1.0 / n_values, "steps": steps, "seg_len": seg_len, "results": {}}
    for d in distances:
        row = {}
        for name, arch, full in (("dnc", "dnc", False), ("gpt", "gpt", False),
                                 ("gpt_full_window", "gpt", True)):
            accs = [train_recall(arch, d, steps, s, seg_len, vocab, n_values, full_window=full)
                    for s in seeds]
            row[name] = {"per_seed": accs, "mean": sum(accs) / len(accs)}
        out["results"][str(d)] = row
        print(f"  distance {d}: " + "  ".join(f"{k} {v['mean']:.3f}" for k, v in row.items()),
              flush=True)
    return out


# ----- main -------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, fewer steps and seeds")
    ap.add_argument("--parts", default="speed,recall", help="comma list of speed, recall")
    ap.add_argument("--compile", action="store_true",
                    help="also time compile_step=True (the default compile_chunk)")
    ap.add_argument("--compile-chunks", default=None,
                    help="comma list of compile_chunk values to time with compile_step, e.g. 1,8")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--distances", default=None, help="recall distances, e.g. 1,2,3")
    ap.add_argument("--seeds", default=None, help="recall seeds, e.g. 1,2,3")
    ap.add_argument("--steps", type=int, default=None, help="recall training steps")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    if args.quick:
        shape = dict(vocab_size=256, n_layer=2, n_head=4, d_model=64, context_len=64)
        memory = dict(mem_slots=16, mem_width=32, num_reads=2)
        batch, iters, distances, seeds, steps = 8, 5, [1, 2], [1], 300
    else:
        shape = dict(vocab_size=256, n_layer=4, n_head=4, d_model=128, context_len=128)
        memory = dict(mem_slots=64, mem_width=128, num_reads=4)
        batch, iters, distances, seeds, steps = 8, 10, [1, 2, 3], [1, 2, 3], 500
    if args.distances:
        distances = [int(d) for d in args.distances.split(",")]
    if args.seeds:
        seeds = [int(x) for x in args.seeds.split(",")]
    steps = args.steps or steps
    items = args.compile_chunks.split(",") if args.compile_chunks else []
    if not all(c.strip().isdigit() and int(c) >= 1 for c in items):
        print(f"dnc.py: error: --compile-chunks wants integers >= 1, got "
              f"{args.compile_chunks!r}", file=sys.stderr)
        raise SystemExit(2)
    chunks = [int(c) for c in items]
    if args.compile and not chunks:  # the config's default, without building a model for it
        chunks = [DNCConfig.compile_chunk]
    result = {"machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "quick": args.quick}
    if "speed" in parts:
        print(f"speed: backbone {shape}, memory {memory}, batch {batch}, bf16 autocast")
        speed = bench_speed(shape, memory, batch, iters, chunks)
        result["speed"] = {"shape": shape, "memory": memory, "batch": batch, "rows": speed}
        print(f"  {'model':<16} {'params':>10} {'step ms':>9} {'tok/s':>9} {'recur ms':>9} "
              f"{'recur %':>8} {'x gpt':>6} {'first s':>8}")
        for name, r in speed.items():
            rec = f"{1e3 * r['recurrence_s']:9.1f} {100 * r['recurrence_share']:7.0f}%" \
                if "recurrence_s" in r else f"{'-':>9} {'-':>8}"
            ratio = f"{r.get('slowdown_vs_gpt', 1.0):6.2f}"
            first = f"{r['first_step_s']:8.1f}" if "first_step_s" in r else f"{'-':>8}"
            print(f"  {name:<16} {r['params']:>10,} {1e3 * r['step_s']:9.1f} "
                  f"{r['tokens_per_s']:9.0f} {rec} {ratio} {first}")
    if "recall" in parts:
        print(f"recall vs distance (segments of 8 tokens, {steps} steps, seeds {seeds}; "
              "chance 0.25):")
        result["recall"] = bench_recall(distances, seeds, steps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
