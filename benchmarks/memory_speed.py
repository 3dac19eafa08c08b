"""Training speed of ARMT and DNC next to the dense GPT, measured interleaved in one process.

    python benchmarks/memory_speed.py                       # small: 6 x 256, seq 256, batch 8
    python benchmarks/memory_speed.py --precision fp32 --rounds 6
    python benchmarks/memory_speed.py --archs gpt,armt,dnc,dnc-compiled

The `small` shape of issue 18: 6 layers, 8 heads, d_model 256, vocab 256, batch 8, 256
tokens per segment. ARMT reads two segments per sample (512 tokens, state carried from the
first to the second inside one call), the DNC and the dense GPT one 256-token window (the
DNC carries its state from step to step, as the trainer does). One training step is
forward + backward + AdamW, under bf16 autocast or in fp32.

The models take turns: every round times `--steps` steps of each model in turn, so a burst
of load from other processes on a shared machine hits all of them alike, and the ratio to
dense is taken per round before the median over rounds. Tokens/s count the text tokens
of one step (ARMT's memory tokens are overhead, not throughput). `dnc-compiled` is the DNC
with `compile_step` (its warm-up, which includes the compilation, is in the JSON).

By default a step is timed by the process's CPU time with one thread: on a machine shared
with other jobs, elapsed time mostly measures how often the scheduler ran us, while the CPU
time of a single-threaded step is the work it did (it still moves with cache and memory
bandwidth contention). `--clock wall --threads 2` gives the elapsed-time numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, print_table, write_json  # noqa: E402

import memlm  # noqa: E402

SMALL = dict(vocab_size=256, n_layer=6, n_head=8, d_model=256)


def build(arch: str, seq: int):
    torch.manual_seed(0)
    if arch == "gpt":
        return memlm.build("gpt", **SMALL, context_len=seq), seq
    if arch == "armt":
        return memlm.build("armt", **SMALL, context_len=2 * seq, segment_len=seq), 2 * seq
    if arch in ("dnc", "dnc-compiled"):
        return memlm.build("dnc", **SMALL, context_len=seq,
                           compile_step=arch == "dnc-compiled"), seq
    raise SystemExit(f"unknown arch {arch!r}: use gpt, armt, dnc or dnc-compiled")


class Runner:
    """One model, its optimizer and its carried state: `step()` runs one training step."""

    def __init__(self, arch: str, seq: int, batch: int, precision: str):
        self.model, self.tokens = build(arch, seq)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.batch, self.precision = batch, precision
        self.gen = torch.Generator().manual_seed(0)
        self.state = None
        self.stateful = arch.startswith("dnc")

    def step(self, clock=time.process_time) -> float:
        ids = torch.randint(0, 256, (self.batch, self.tokens + 1), generator=self.gen)
        t0 = clock()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.model(ids[:, :-1], targets=ids[:, 1:], state=self.state)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.stateful:
            self.state = self.model.detach_state(out.state)
        return clock() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="gpt,armt,dnc")
    ap.add_argument("--precision", choices=["bf16", "fp32", "both"], default="both")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: the process's CPU time (robust on a shared machine with one "
                         "thread); wall: elapsed time")
    ap.add_argument("--out", default="memory_speed", help="name of the JSON in results/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    archs = args.archs.split(",")
    if "gpt" not in archs:
        archs = ["gpt", *archs]
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    precisions = ["bf16", "fp32"] if args.precision == "both" else [args.precision]
    rows, raw = [], {}
    for precision in precisions:
        runners = {}
        for a in archs:
            runners[a] = Runner(a, args.seq, args.batch, precision)
            t0 = time.perf_counter()
            runners[a].step()  # warm-up (and compilation)
            runners[a].step()
            raw[f"{a}/{precision}/warmup_s"] = time.perf_counter() - t0
        per_round: dict[str, list[float]] = {a: [] for a in archs}
        for _ in range(args.rounds):
            for a in archs:
                per_round[a].append(min(runners[a].step(clock) for _ in range(args.steps)))
        for a in archs:
            tps = [args.batch * runners[a].tokens / s for s in per_round[a]]
            ratios = [per_round["gpt"][i] / s * runners[a].tokens / args.seq
                      for i, s in enumerate(per_round[a])]
            rows.append({"arch": a, "precision": precision, "tokens_per_s": median(tps),
                         "vs_dense": median(ratios), "vs_dense_min": min(ratios),
                         "vs_dense_max": max(ratios)})
            raw[f"{a}/{precision}/step_s"] = per_round[a]
    print_table(rows, ["arch", "precision", "tokens_per_s", "vs_dense", "vs_dense_min",
                       "vs_dense_max"])
    write_json(args.out, {"command": " ".join(sys.argv), "args": vars(args),
                          "machine": machine(), "rows": rows, "raw": raw})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
