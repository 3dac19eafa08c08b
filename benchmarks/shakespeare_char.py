"""The dense baseline in nanoGPT's CPU "baby GPT" setting on tiny Shakespeare.

Setting (nanoGPT's shakespeare_char CPU command): char tokenizer, n_layer 4, n_head 4,
n_embd 128, block 64, batch 12, 2000 iterations, AdamW betas (0.9, 0.99), lr 1e-3
decaying to 1e-4, warmup 100, dropout 0, first 90% train / last 10% val.
Reference measured on this machine with nanoGPT's own train.py: val loss 1.886 in 88 s,
about 20.7K training tokens/s (fp32). Targets: val loss <= 1.89, >= 1.5x the tokens/s.

    python benchmarks/shakespeare_char.py [--steps 2000] [--precision bf16] [--compile]
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import SHARED_DATA, print_table, write_json

from memlm.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from memlm.eval.perplexity import evaluate
from memlm.train.trainer import train

NANOGPT = {"val_loss": 1.886, "wall_s": 88.0, "tokens_per_sec": 20_700}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--pos-emb", default="learned", choices=["learned", "rope"])
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    data = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not data.exists():
        print(f"skipped: {data} is absent")
        return 0
    cfg = RunConfig(
        model=ModelConfig(arch="gpt", n_layer=4, n_head=4, d_model=128, context_len=64,
                          dropout=0.0, pos_emb=args.pos_emb, bias=False),
        train=TrainConfig(max_steps=args.steps, batch_size=12, lr=1e-3, min_lr=1e-4,
                          warmup_steps=100, beta1=0.9, beta2=0.99, weight_decay=0.1,
                          grad_clip=1.0, precision=args.precision, compile=args.compile,
                          eval_every=10**9, save_every=10**9, log_every=100,
                          eval_batches=1, seed=args.seed),
        data=DataConfig(source=str(data), tokenizer="char", val_fraction=0.1),
    )
    t0 = time.perf_counter()
    res = train(cfg, None, progress=sys.stderr.isatty())
    wall = time.perf_counter() - t0
    # final validation loss over the WHOLE validation split (non-overlapping 64-token windows)
    from memlm.data.corpus import prepare_data

    val = prepare_data(cfg.data, tokenizer=res.tokenizer, progress=False).val
    full = evaluate(res.model, val, seq_len=64, batch_size=64, precision="fp32")
    train_tps = [r["tokens_per_sec"] for r in res.history if r.get("kind") == "train"]
    steady_tps = sorted(train_tps)[len(train_tps) // 2] if train_tps else res.tokens_per_sec
    row = {
        "setting": f"memlm {args.precision}{' +compile' if args.compile else ''}",
        "val_loss": full["nll"], "wall_s": wall, "tokens_per_sec": steady_tps,
        "speedup_vs_nanogpt": steady_tps / NANOGPT["tokens_per_sec"],
    }
    ref = {"setting": "nanoGPT fp32 (measured here, quoted)", **NANOGPT,
           "speedup_vs_nanogpt": 1.0}
    print_table([ref, row], ["setting", "val_loss", "wall_s", "tokens_per_sec",
                             "speedup_vs_nanogpt"])
    ok = full["nll"] <= 1.89 and steady_tps >= 1.5 * NANOGPT["tokens_per_sec"]
    print(f"targets (val loss <= 1.89, >= 1.5x tokens/s): {'MET' if ok else 'NOT MET'}")
    write_json("shakespeare_char", {"args": vars(args), "nanogpt": NANOGPT, "memlm": row,
                                    "val_tokens": full["tokens"], "targets_met": ok})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
