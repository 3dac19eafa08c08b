"""CPU time per training step, an older checkout of memlm against this one, alternating.

For before/after comparisons on a shared machine: each measurement is a fresh process on
one thread that builds memlm's `Trainer` for an architecture at a `speed_vs_peers.py`
size, takes two untimed steps, then times `--steps` steps by the process's CPU time
(`time.process_time`), which other processes disturb far less than wall time. The old
code is a directory holding an older tree (for example `git archive f6b81cf | tar -x -C
/tmp/base`); it is put first on PYTHONPATH, so its `memlm` is the one imported.

    python benchmarks/step_ab.py --base /tmp/base --archs tmt,gpt --precisions fp32,bf16

Prints one line per process and, per architecture and precision, the medians of the
rounds for "base" and "this tree".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def worker(arch: str, size: str, precision: str, steps: int) -> float:
    """Median CPU seconds of `steps` training steps (after two untimed ones), one thread."""
    import time

    import torch

    sys.path.insert(0, str(HERE))
    from speed_vs_peers import warm_trainer

    torch.set_num_threads(1)
    trainer = warm_trainer(arch, size, precision)
    times = []
    for _ in range(steps):
        t0 = time.process_time()
        trainer.train_step()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="directory of the older tree (omit: this tree only)")
    ap.add_argument("--archs", default="tmt,gpt")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--size", default="small")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        arch, size, precision, steps = json.loads(args.worker)
        print(f"RESULT {worker(arch, size, precision, steps)}")
        return 0
    if args.base and not (Path(args.base) / "memlm").is_dir():
        print(f"step_ab: error: {args.base} holds no memlm package", file=sys.stderr)
        return 2
    trees = ([("base", Path(args.base).resolve())] if args.base else []) + [("this", ROOT)]
    results: dict[tuple[str, str, str], list[float]] = {}
    for precision in args.precisions.split(","):
        for _ in range(args.rounds):
            for arch in args.archs.split(","):
                for name, tree in trees:
                    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
                    spec = json.dumps([arch, args.size, precision, args.steps])
                    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()),
                                           "--worker", spec], capture_output=True, text=True,
                                          env=env, timeout=1800)
                    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                    if proc.returncode != 0 or not lines:
                        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                        print(f"step_ab: error: {name} {arch} {precision}: {tail}",
                              file=sys.stderr)
                        return 2
                    sec = float(lines[-1].split()[1])
                    results.setdefault((arch, precision, name), []).append(sec)
                    print(f"{name:5s} {arch:10s} {precision} {sec:.3f} s CPU/step "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
    print("\n| arch | precision | tree | CPU s per step (median of rounds) |\n|---|---|---|---:|")
    for (arch, precision, name), secs in results.items():
        print(f"| {arch} | {precision} | {name} | {statistics.median(secs):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
