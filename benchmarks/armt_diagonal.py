"""ARMT inference with diagonal batching against the sequential reader, on a long stream.

    python benchmarks/armt_diagonal.py                          # tiny ARMT, 1M tokens
    python benchmarks/armt_diagonal.py --tokens 65536 --size small

The stream (random byte tokens, fixed seed) is read in chunks of `--chunk` segments, the
memory carried from chunk to chunk, once by `model(...)` (segment after segment, layer
after layer) and once by `model.read_diagonal(...)` (memlm/models/armt_diagonal.py), the two
alternating chunk by chunk so that load from other processes hits both alike. Time is the
process's CPU time (one thread by default; `--clock wall` for elapsed time). Every chunk's
logits and the final memory are compared (max abs difference printed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

import memlm  # noqa: E402

SIZES = {
    "tiny": dict(vocab_size=256, n_layer=2, d_model=64, n_head=4, segment_len=512,
                 num_mem_tokens=16, d_mem=16),  # benchmarks/armt_streaming.py's ARMT
    "small": dict(vocab_size=256, n_layer=6, d_model=256, n_head=8, segment_len=256,
                  num_mem_tokens=16, d_mem=64),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--chunk", type=int, default=32, help="segments per call")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    size = dict(SIZES[args.size])
    seg = size["segment_len"]
    torch.manual_seed(0)
    model = memlm.build("armt", **size, context_len=seg).eval()
    for layer in model.backbone.layers():  # W_V starts at zero: give the memory content
        torch.nn.init.normal_(layer.memory.w_v.weight, std=0.02)
    ids = torch.randint(0, 256, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    per_call = args.chunk * seg
    times = {"sequential": 0.0, "diagonal": 0.0}
    states = {"sequential": model.init_state(1), "diagonal": model.init_state(1)}
    max_diff = 0.0
    with torch.no_grad():
        for a in range(0, args.tokens, per_call):
            x = ids[:, a:a + per_call]
            t0 = clock()
            ref = model(x, state=states["sequential"])
            times["sequential"] += clock() - t0
            t0 = clock()
            out = model.read_diagonal(x, states["diagonal"])
            times["diagonal"] += clock() - t0
            states = {"sequential": ref.state, "diagonal": out.state}
            max_diff = max(max_diff, float((out.logits - ref.logits).abs().max()))
    state_diff = max(float((p.A - q.A).abs().max()) for p, q in
                     zip(states["sequential"].layers, states["diagonal"].layers))
    rows = [{"reader": k, "seconds": v, "tokens_per_s": args.tokens / v,
             "speedup": times["sequential"] / v} for k, v in times.items()]
    print(f"ARMT {args.size} ({model.num_params() / 1e6:.2f}M params, {size['n_layer']} layers, "
          f"d {size['d_model']}, segment {seg}, {size['num_mem_tokens']} memory tokens), "
          f"{args.tokens:,} tokens, {args.threads} thread(s), {args.clock} time")
    print_table(rows, ["reader", "seconds", "tokens_per_s", "speedup"])
    print(f"max |logit difference| {max_diff:.2e}, max |A difference| {state_diff:.2e}")
    write_json(args.out or f"armt_diagonal_{args.size}",
               {"command": " ".join(sys.argv), "args": vars(args), "size": size,
                "rows": rows, "max_logit_diff": max_diff, "max_state_diff": state_diff})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
