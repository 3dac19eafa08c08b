"""Greedy decoding through transformers' `generate()` versus memlm's own generator.

Both run the same model with its KV cache and must produce the same tokens (the
script checks); the difference in time is the cost of transformers' generation
loop (logits processors, stopping criteria, bookkeeping) on top of memlm's loop.
Each (architecture, API) pair is timed `--repeats` times after a warm-up; the
best time is reported.

    python benchmarks/hf_generate.py [--quick] [--archs gpt,armt] [--new 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import print_table, write_json

import memlm
from memlm.generation import generate
from memlm.hf import MemlmForCausalLM


def best_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up (and the tokens to compare)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few tokens")
    ap.add_argument("--archs", default=None, help="comma-separated (default: all registered)")
    ap.add_argument("--new", type=int, default=None, help="tokens to generate")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: decoding one token is too small to split)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = (dict(n_layer=2, d_model=64, n_head=4, context_len=128) if args.quick
            else dict(n_layer=4, d_model=256, n_head=4, context_len=512))
    new = args.new or (32 if args.quick else 256)
    archs = args.archs.split(",") if args.archs else memlm.architectures()
    torch.manual_seed(0)
    prompt = torch.randint(0, 256, (1, args.prompt))
    rows = []
    for arch in archs:
        model = memlm.build(arch, vocab_size=256, **size).eval()
        hf = MemlmForCausalLM.from_memlm(model).eval()
        t_memlm, a = best_time(lambda m=model: generate(m, prompt, new), args.repeats)
        t_hf, b = best_time(lambda h=hf: h.generate(prompt, max_new_tokens=new, do_sample=False),
                            args.repeats)
        rows.append({"arch": arch, "params": model.num_params(), "new_tokens": new,
                     "memlm_tok_s": new / t_memlm, "hf_tok_s": new / t_hf,
                     "hf_overhead_pct": 100.0 * (t_hf / t_memlm - 1.0),
                     "same_tokens": bool(torch.equal(a, b))})
    print_table(rows, ["arch", "params", "new_tokens", "memlm_tok_s", "hf_tok_s",
                       "hf_overhead_pct", "same_tokens"])
    write_json("hf_generate", {"size": size, "prompt": args.prompt, "quick": args.quick,
                               "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
