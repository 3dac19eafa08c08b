"""Relative training-step cost of every architecture at the demo's tiny size (ArchSpec.cost).

Each registered architecture is built as `memlm demo` builds it (BASE_MODEL plus
`arch_overrides(arch)`) and timed for optimizer steps in the full demo's regime: batch 32
of 16-token windows; a stateful model reads a 4-segment episode from a fresh memory and
back-propagates through all four, as the demo trains it (one thread, as in the demo's
workers). The median step time divided by the dense GPT's is the `cost` an architecture declares at `register_arch`; the demo starts
its slowest architectures first so its two worker processes finish together. Only the
order matters there, so the declared values are these measurements rounded.

    python benchmarks/arch_cost.py            # writes benchmarks/results/arch_cost.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import memlm
from memlm.experiments.demo import BASE_MODEL, MODES, WINDOW, arch_overrides
from memlm.registry import ARCHITECTURES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

VOCAB = 400  # about the demo's bpe:400 tokenizer


class TinyRun:
    """The demo's tiny `arch` with its optimizer, stepping on random token episodes."""

    def __init__(self, arch: str):
        mode = MODES["full"]
        torch.manual_seed(0)
        self.model = memlm.build(arch, vocab_size=VOCAB, **BASE_MODEL,
                                 **arch_overrides(arch)).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.batch = mode.batch_size
        self.segments = mode.bptt_window if self.model.is_stateful else 1
        self.g = torch.Generator().manual_seed(1)
        self.steps = 0

    def step(self) -> float:
        """One optimizer step; returns its wall time in seconds."""
        ids = torch.randint(0, VOCAB, (self.batch, self.segments * WINDOW + 1), generator=self.g)
        t0 = time.perf_counter()
        state = self.model.init_state(self.batch) if self.model.is_stateful else None
        loss = 0.0
        for s in range(self.segments):
            lo = s * WINDOW
            out = self.model(ids[:, lo:lo + WINDOW], targets=ids[:, lo + 1:lo + WINDOW + 1],
                             state=state)
            state = out.state
            loss = loss + out.loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        self.model.on_train_step_end(self.steps, 10**6)
        return time.perf_counter() - t0


def step_seconds(archs: list[str], steps: int, warmup: int = 2) -> dict[str, float]:
    """Median step time per architecture. The architectures take turns, step by step, so a
    change in how busy the machine is falls on all of them alike."""
    runs = {arch: TinyRun(arch) for arch in archs}
    times: dict[str, list[float]] = {arch: [] for arch in archs}
    for i in range(warmup + steps):
        for arch, run in runs.items():
            t = run.step()
            if i >= warmup:
                times[arch].append(t)
    return {arch: statistics.median(t) for arch, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per architecture")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the demo uses 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seconds = step_seconds(ARCHITECTURES.names(), args.steps)
    base = seconds["gpt"]
    rows = [{"arch": a, "step_ms": round(1000 * s, 2), "relative": round(s / base, 2),
             "declared_cost": ARCHITECTURES.get(a).cost}
            for a, s in sorted(seconds.items(), key=lambda kv: -kv[1])]
    for r in rows:
        print(f"{r['arch']:10s} {r['step_ms']:9.2f} ms/step  x{r['relative']:<6} "
              f"declared {r['declared_cost']}")
    write_json("arch_cost", {"steps": args.steps, "threads": args.threads, "rows": rows,
                             "command": "python benchmarks/arch_cost.py"})


if __name__ == "__main__":
    main()
