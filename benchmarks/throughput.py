"""Training throughput (forward + backward + optimizer step) and model FLOPs utilisation.

For three dense-baseline sizes, in fp32 and bf16 autocast, time the trainer's own
`train_step` and compare the achieved model FLOP/s with the dense matmul peak of the
same dtype measured in the same run (MFU). Model FLOPs per token follow the usual
estimate 6 * N + 12 * n_layer * T * d_model (N = non-embedding parameters plus the
LM-head matmul; attention score/value products counted by the second term).

Each cell runs for about `--seconds` (at least `--min-steps` timed steps after one
warm-up step) and reports the median step, so a burst of load from other processes
moves the number less than a mean would. The peak is measured per dtype as the fastest
of torch.mm and F.linear on square matrices (see `_common.matmul_peak`). On CPUs
without native bf16 matmul (AVX2-only, e.g. AMD Zen 3) bf16 GEMMs are emulated: the bf16
peak is then a fraction of the fp32 one, and `mfu_vs_fp32_peak` shows what bf16
costs against simply training in fp32.

    python benchmarks/throughput.py [--quick] [--seconds 20] [--batch 8] [--seq-len 256]
                                    [--threads N] [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import flops_per_token, load_average, matmul_peak, print_table, write_json

from memlm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from memlm.train.trainer import Trainer

SIZES = [  # (name, n_layer, d_model, n_head)
    ("small d128", 4, 128, 4),
    ("medium d256", 4, 256, 4),
    ("large d384", 6, 384, 6),
]


def measure(name: str, n_layer: int, d_model: int, n_head: int, precision: str,
            seconds: float, min_steps: int, batch: int, seq_len: int,
            compile: bool) -> dict:
    cfg = RunConfig(
        model=ModelConfig(arch="gpt", n_layer=n_layer, n_head=n_head, d_model=d_model,
                          context_len=seq_len),
        train=TrainConfig(max_steps=10**6, batch_size=batch, precision=precision,
                          compile=compile, warmup_steps=1, eval_every=10**9,
                          save_every=10**9),
        data=DataConfig(source="builtin:stories", tokenizer="byte"),
    )
    trainer = Trainer(cfg, progress=False)
    t0 = time.perf_counter()
    float(trainer.train_step()["loss"])  # warm-up: allocator, kernel caches, compilation
    warmup_s = time.perf_counter() - t0
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < min_steps:
        t0 = time.perf_counter()
        logs = trainer.train_step()
        float(logs["loss"])  # wait for the step (a no-op on CPU, a sync on CUDA)
        times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2]
    tps = batch * seq_len / step_s
    return {
        "model": name, "precision": precision + (" +compile" if compile else ""),
        "params_M": trainer.model.num_params() / 1e6, "steps": len(times),
        "step_ms": step_s * 1e3, "tokens_per_sec": tps,
        "model_tflops": tps * flops_per_token(trainer.model, seq_len) / 1e12,
        "warmup_s": warmup_s,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per cell")
    ap.add_argument("--min-steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--compile", action="store_true", help="also time fp32 with torch.compile")
    ap.add_argument("--quick", action="store_true", help="two sizes, 4 s per cell")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = SIZES[:2] if args.quick else SIZES
    seconds = 4.0 if args.quick else args.seconds
    load_start = load_average()
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"measured matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads, "
          f"load average {load_start:.2f})")
    cells = [("fp32", False), ("bf16", False)] + ([("fp32", True)] if args.compile else [])
    rows = []
    for size in sizes:
        for precision, compile in cells:
            row = measure(*size, precision, seconds, args.min_steps, args.batch, args.seq_len,
                          compile)
            row["mfu"] = row["model_tflops"] * 1e12 / peaks[precision]
            row["mfu_vs_fp32_peak"] = row["model_tflops"] * 1e12 / peaks["fp32"]
            rows.append(row)
    print_table(rows, ["model", "precision", "params_M", "step_ms", "tokens_per_sec",
                       "model_tflops", "mfu", "mfu_vs_fp32_peak", "warmup_s"])
    load_end = load_average()
    print(f"load average (1 min): {load_start:.2f} at start, {load_end:.2f} at end")
    best = {}
    for r in rows:
        if r["model"] != SIZES[0][0]:
            best[r["precision"]] = max(best.get(r["precision"], 0.0), r["mfu"])
    for precision, mfu in best.items():
        print(f"best MFU at d_model >= 256, {precision}: {mfu:.1%}"
              + (f" (target >= 40%: {'MET' if mfu >= 0.4 else 'NOT MET'})"
                 if precision == "bf16" else ""))
    write_json("throughput" + ("_quick" if args.quick else ""),
               {"args": vars(args), "peak_flops": peaks, "rows": rows,
                "loadavg_start_end": [load_start, load_end]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
