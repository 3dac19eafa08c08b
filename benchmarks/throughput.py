"""Training throughput (forward + backward + optimizer step) and model FLOPs utilisation.

For three dense-baseline sizes, in fp32 and bf16 autocast, time the trainer's own
`train_step` and compare the achieved model FLOP/s with the dense matmul peak of the
same dtype measured in the same run (MFU). Model FLOPs per token follow the usual
estimate 6 * N + 12 * n_layer * T * d_model (N = non-embedding parameters plus the
LM-head matmul; attention score/value products counted by the second term).

    python benchmarks/throughput.py [--quick] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import matmul_peak, print_table, write_json

from memlm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from memlm.train.trainer import Trainer

SIZES = [  # (name, n_layer, d_model, n_head)
    ("small d128", 4, 128, 4),
    ("medium d256", 4, 256, 4),
    ("large d384", 6, 384, 6),
]


def flops_per_token(model, seq_len: int) -> float:
    c = model.config
    n = model.num_params(non_embedding=True) + c.d_model * c.vocab_size
    return 6.0 * n + 12.0 * c.n_layer * seq_len * c.d_model


def measure(name, n_layer, d_model, n_head, precision, steps, batch, seq_len):
    cfg = RunConfig(
        model=ModelConfig(arch="gpt", n_layer=n_layer, n_head=n_head, d_model=d_model,
                          context_len=seq_len),
        train=TrainConfig(max_steps=steps + 3, batch_size=batch, precision=precision,
                          warmup_steps=1, eval_every=10**9, save_every=10**9),
        data=DataConfig(source="builtin:stories", tokenizer="byte"),
    )
    trainer = Trainer(cfg, progress=False)
    for _ in range(3):  # warm-up: allocator, autocast caches
        trainer.train_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        logs = trainer.train_step()
    float(logs["loss"])  # one sync at the end
    dt = time.perf_counter() - t0
    tokens = steps * batch * seq_len
    tps = tokens / dt
    return {
        "model": name, "precision": precision,
        "params_M": trainer.model.num_params() / 1e6,
        "tokens_per_sec": tps,
        "model_tflops": tps * flops_per_token(trainer.model, seq_len) / 1e12,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="fewer steps, two sizes")
    args = ap.parse_args()
    sizes = SIZES[:2] if args.quick else SIZES
    steps = 5 if args.quick else args.steps
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"measured matmul peak: fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s")
    rows = []
    for size in sizes:
        for precision in ("fp32", "bf16"):
            row = measure(*size, precision, steps, args.batch, args.seq_len)
            row["mfu"] = row["model_tflops"] * 1e12 / peaks[precision]
            rows.append(row)
    print_table(rows, ["model", "precision", "params_M", "tokens_per_sec", "model_tflops", "mfu"])
    write_json("throughput", {"args": vars(args), "peak_flops": peaks, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
