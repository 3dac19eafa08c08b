"""BABILong qa1: tiny ARMT and RMT against a dense GPT with the same window.

Each model is trained by memlm's trainer on qa1 samples (facts hidden in the
built-in filler, byte tokens) with a segment curriculum: stages of 1, 2, 4, ...
segments of L tokens, up to 2K tokens. The dense GPT has a window of L tokens,
the memory models read L-token segments, so all three see the same amount of
text at once; only memory can carry a fact from an earlier segment.

Then every model answers held-out test questions (bAbI test file, evaluation
filler) at 0K, 1K, 4K, 16K and 64K tokens by greedy generation, scored by exact
match. The dense model sees only the last L tokens of each prompt.

    python benchmarks/babilong.py --quick            # minutes on a laptop CPU
    python benchmarks/babilong.py                    # the full curriculum
    python benchmarks/babilong.py --archs armt --lengths 0k,1k,4k --threads 1
    # sanity check: a dense model whose window holds every fact (learns qa1 at 0K)
    python benchmarks/babilong.py --archs gpt --segment-len 384 --stages 1 --steps 400 \
        --lr 2e-3 --lengths 0k --n-samples 30 --name babilong_sanity

Without bAbI files (../shared/data/babi or --babi) it falls back to memlm's
synthetic qa1 stand-in, and says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from _common import SHARED_DATA, matmul_peak, print_table, write_json

from memlm.config import DataConfig, RunConfig, TrainConfig, model_config_from_dict
from memlm.data.babilong import length_name, parse_lengths
from memlm.eval.babilong import evaluate_babilong
from memlm.train.trainer import train


def model_config(arch: str, args: argparse.Namespace):
    size = dict(arch=arch, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                context_len=args.segment_len)
    if arch in ("rmt", "armt"):
        size.update(num_mem_tokens=args.mem_tokens)
    if arch == "armt":
        size.update(d_mem=args.d_mem)
    return model_config_from_dict(size)


def run_one(arch: str, args: argparse.Namespace, task: str, babi: str | None) -> dict:
    source = f"babilong:{task}" + (f":babi={babi}" if babi else "")
    if arch not in ("rmt", "armt"):
        source += f":window={args.segment_len}"  # a dense model sees the last L tokens
    stages = [{"steps": args.steps, "seq_len": n * args.segment_len}
              for n in args.stages]
    cfg = RunConfig(
        model=model_config(arch, args),
        train=TrainConfig(
            max_steps=sum(s["steps"] for s in stages), batch_size=args.batch_size, lr=args.lr,
            min_lr=args.lr / 10, warmup_steps=min(50, args.steps), precision=args.precision,
            eval_every=10**9, eval_batches=2, save_every=10**9, log_every=10, seed=args.seed,
            curriculum=stages, weight_decay=0.01,
        ),
        data=DataConfig(source=source, tokenizer="byte"),
    )
    t0 = time.perf_counter()
    result = train(cfg, progress=not args.no_progress)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = evaluate_babilong(
        result.model, result.tokenizer, task, args.lengths, n_samples=args.n_samples,
        seed=args.seed, babi_dir=babi, batch_size=args.eval_batch_size,
        precision=args.precision, progress=not args.no_progress,
    )
    eval_s = time.perf_counter() - t0
    print(table)
    row = {"model": arch, "params": result.model.num_params(), "train_s": train_s,
           "eval_s": eval_s, "val_answer_nll": result.final.get("nll"),
           "val_answer_top1": result.final.get("top1")}
    row.update({length_name(n): table.accuracy(task, n) for n in args.lengths})
    return {"row": row, "table": table.to_dict(), "config": cfg.to_dict()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short curriculum, few eval samples")
    p.add_argument("--archs", default="armt,rmt,gpt")
    p.add_argument("--babi", default=str(SHARED_DATA / "babi"),
                   help="bAbI v1.2 folder (synthetic qa1 when absent)")
    p.add_argument("--lengths", default="0k,1k,4k,16k,64k")
    p.add_argument("--segment-len", type=int, default=128, help="L: segment / dense window")
    p.add_argument("--stages", default=None,
                   help="segments per curriculum stage (default 1,2,4,8,16; quick 1,2,4)")
    p.add_argument("--steps", type=int, default=None, help="steps per stage (default 400)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-mem", type=int, default=32)
    p.add_argument("--mem-tokens", type=int, default=16)
    p.add_argument("--n-samples", type=int, default=None, help="eval questions per length")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--name", default="babilong", help="results file benchmarks/results/NAME.json")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    args.stages = [int(x) for x in (args.stages or ("1,2,4" if args.quick else "1,2,4,8,16"))
                   .split(",")]
    args.steps = args.steps or (40 if args.quick else 400)
    args.n_samples = args.n_samples or (6 if args.quick else 100)
    args.lengths = parse_lengths(args.lengths)
    babi = args.babi if Path(args.babi).is_dir() else None
    task = "qa1" if babi else "synth-qa1"
    if babi is None:
        print(f"no bAbI folder at {args.babi}: using the synthetic qa1 stand-in (synth-qa1)")

    results, rows = {}, []
    for arch in args.archs.split(","):
        out = run_one(arch.strip(), args, task, babi)
        results[arch] = out
        rows.append(out["row"])
    columns = ["model", "params", "train_s", "eval_s"] + [length_name(n) for n in args.lengths]
    print(f"\nBABILong {task}, exact match (%), {args.n_samples} test questions per length, "
          f"segment/window L={args.segment_len}, curriculum {args.stages} x {args.steps} steps, "
          "background: memlm filler (not PG19)")
    text = print_table(rows, columns)
    write_json(args.name, {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else
                                                      sys.argv[1:])]),
        "task": task, "quick": args.quick, "table": text, "rows": rows,
        "fp32_matmul_peak_gflops": matmul_peak(torch.float32, seconds=0.5) / 1e9,
        "runs": results,
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
