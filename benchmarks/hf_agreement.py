"""Greedy tokens through transformers versus memlm, on trained tiny models, long prompts.

For every architecture a tiny model is trained for a few hundred steps on a generated
corpus (`memlm.testing.tiny`); then `--prompts` held-out prompts of 2 to 5 segments
(segments of 16 tokens) are continued greedily by `model.generate` (memlm) and by
`MemlmForCausalLM.generate` (transformers), with the cache. The table counts the prompts
whose continuations agree token for token, and for stateful models how many memlm
continuations change when the memory is reset (the prompt cut to its last segment):
a memory that is carried changes them.

    python benchmarks/hf_agreement.py [--archs rmt,armt] [--prompts 30] [--steps 200]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import print_table, write_json

import memlm
from memlm.hf import MemlmForCausalLM
from memlm.testing.tiny import tiny_corpus, train_tiny


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=None, help="comma-separated (default: all registered)")
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--steps", type=int, default=200, help="training steps per model")
    ap.add_argument("--new", type=int, default=24, help="tokens to generate")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="hf_agreement", help="results/<out>.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    archs = args.archs.split(",") if args.archs else memlm.architectures()
    train, held = tiny_corpus(20_000, seed=0), tiny_corpus(20_000, seed=1)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2 * 16 + 1, 5 * 16, (args.prompts,), generator=g).tolist()
    starts = torch.randint(0, held.numel() - 80, (args.prompts,), generator=g).tolist()
    prompts = [held[s : s + n][None] for s, n in zip(starts, lengths)]
    rows = []
    for arch in archs:
        t0 = time.perf_counter()
        model = train_tiny(arch, train, steps=args.steps)
        train_s = time.perf_counter() - t0
        hf = MemlmForCausalLM.from_memlm(model).eval()
        same = memory_matters = 0
        for p in prompts:
            ours = model.generate(p, args.new)
            theirs = hf.generate(p, max_new_tokens=args.new, do_sample=False)
            same += int(torch.equal(ours, theirs))
            if model.is_stateful:
                last = p[:, -16:]
                cut = model.generate(last, args.new)[:, last.shape[1]:]
                memory_matters += int(not torch.equal(cut, ours[:, p.shape[1]:]))
        rows.append({"arch": arch, "stateful": bool(model.is_stateful),
                     "hf_equals_memlm": f"{same}/{len(prompts)}",
                     "memory_changes_output": (f"{memory_matters}/{len(prompts)}"
                                               if model.is_stateful else "-"),
                     "train_s": round(train_s, 1)})
    print_table(rows, ["arch", "stateful", "hf_equals_memlm", "memory_changes_output",
                       "train_s"])
    write_json(args.out, {"steps": args.steps, "new": args.new,
                          "prompt_lengths": lengths, "rows": rows})


if __name__ == "__main__":
    main()
