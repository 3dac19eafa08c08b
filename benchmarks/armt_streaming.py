"""Streaming cost of a tiny ARMT over 16K, 128K and 1M tokens, next to dense attention.

    python benchmarks/armt_streaming.py --threads 1           # 16K, 128K, 1M tokens (~6 min, CPU)
    python benchmarks/armt_streaming.py --threads 1 --quick   # 4K, 16K, 64K tokens (~1 min)

Three models share the same tiny backbone size (byte vocabulary, d 64, 2 layers, 4 heads):

* ``armt``        ARMT (segment_len 512, 16 memory tokens, d_mem 16), state carried;
* ``gpt-segment`` the same GPT on independent 512-token segments (no memory): the
                  floor of what segment-wise processing costs;
* ``gpt-full``    dense full attention over the whole sequence in one window, at the
                  ``--dense-lengths`` (its time grows quadratically and its memory linearly,
                  so on a CPU it stops being practical long before 1M tokens).

Every (model, length) runs in a fresh subprocess so that its peak resident memory is its
own. The stream reads a memory-mapped uint16 token file through
`memlm.eval.stream.stream_file`; the table reports tokens/s, wall time, the peak RSS sampled
after every segment and its growth relative to the shortest run. The claims checked at the
end: ARMT memory stays flat (<= 10% growth from the shortest to the longest length) and its
time is linear (tokens/s within 25% across lengths).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

SIZES = dict(vocab_size=256, n_layer=2, d_model=64, n_head=4)


def build(model: str, length: int, segment_len: int, mem: int):
    import memlm

    if model == "armt":
        return memlm.build("armt", **SIZES, context_len=segment_len, num_mem_tokens=mem,
                           d_mem=16)
    if model == "gpt-segment":
        return memlm.build("gpt", **SIZES, context_len=segment_len)
    return memlm.build("gpt", **SIZES, context_len=length)


def worker(job: dict) -> dict:
    """One measurement in this (fresh) process; prints nothing but the JSON result."""
    import torch

    from memlm.eval.stream import current_rss_bytes, stream_file

    torch.manual_seed(0)
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    model = build(job["model"], job["length"], job["segment_len"], job["mem"]).to(device)
    seg = job["length"] if job["model"] == "gpt-full" else job["segment_len"]
    tokens = np.memmap(job["path"], dtype=np.uint16, mode="r")
    # warm up kernels and allocator on a few segments, so the timed run measures steady state
    stream_file(model, None, np.asarray(tokens[: min(len(tokens), 4 * seg + 1)]),
                min(seg, 4096), progress=False, precision=job["precision"])
    rss_before = current_rss_bytes()
    report = stream_file(model, None, job["path"], seg, progress=False,
                         precision=job["precision"], max_tokens=job["length"])
    return {
        "model": job["model"], "tokens": report["n_scored"], "precision": job["precision"],
        "segment": seg, "tokens_per_s": report["tokens_per_s"], "wall_s": report["wall_s"],
        "rss_before_mb": rss_before / 2**20, "peak_rss_mb": report["peak_rss_bytes"] / 2**20,
        "cuda_peak_mb": report.get("cuda_peak_bytes", 0) / 2**20, "loss": report["loss"],
    }


def run_job(job: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": job["model"], "tokens": job["length"], "skipped": f"> {timeout:.0f}s"}
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {job}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4K/16K/64K tokens instead of 16K/128K/1M")
    p.add_argument("--lengths", default=None, help="comma-separated token counts")
    p.add_argument("--segment-len", type=int, default=512)
    p.add_argument("--mem", type=int, default=16, help="ARMT memory tokens")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: time both on the shortest ARMT run and keep the faster")
    p.add_argument("--dense-lengths", default=None,
                   help="token counts for dense full attention (default 16K,64K; quick 4K,16K)")
    p.add_argument("--models", default="armt,gpt-segment,gpt-full")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    lengths = ([int(x) for x in args.lengths.split(",")] if args.lengths
               else [4096, 16384, 65536] if args.quick else [16384, 131072, 1048576])
    dense = ([int(x) for x in args.dense_lengths.split(",")] if args.dense_lengths
             else [4096, 16384] if args.quick else [16384, 65536])
    models = args.models.split(",")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.bin"
        rng.integers(0, 256, max(lengths + dense) + 1, dtype=np.uint16).tofile(path)
        base = dict(path=str(path), segment_len=args.segment_len, mem=args.mem,
                    device=args.device, threads=args.threads)
        precision, probe = args.precision, {}
        if precision == "auto":
            for prec in ("fp32", "bf16"):
                probe[prec] = run_job({**base, "model": "armt", "length": lengths[0],
                                       "precision": prec}, args.timeout)["tokens_per_s"]
            precision = max(probe, key=probe.get)
            print(f"precision probe (ARMT, {lengths[0]} tokens, tokens/s): "
                  + ", ".join(f"{k} {v:,.0f}" for k, v in probe.items()) + f" -> {precision}")
        rows = []
        for model in models:
            for n in dense if model == "gpt-full" else lengths:
                t0 = time.perf_counter()
                row = run_job({**base, "model": model, "length": n, "precision": precision},
                              args.timeout)
                rows.append(row)
                print(f"  {model:12s} {n:>9,d} tokens  done in {time.perf_counter() - t0:.1f}s",
                      flush=True)
    for model in models:
        done = [r for r in rows if r["model"] == model and "peak_rss_mb" in r]
        for r in done:
            r["rss_growth_%"] = 100 * (r["peak_rss_mb"] / done[0]["peak_rss_mb"] - 1)
            r["speed_vs_first"] = r["tokens_per_s"] / done[0]["tokens_per_s"]
    columns = ["model", "tokens", "precision", "tokens_per_s", "wall_s", "peak_rss_mb",
               "rss_growth_%", "speed_vs_first", "skipped"]
    print()
    table = print_table(rows, columns)
    armt = [r for r in rows if r["model"] == "armt" and "peak_rss_mb" in r]
    checks = {}
    if len(armt) > 1:
        checks = {
            "armt_memory_flat (<= 10% growth)": armt[-1]["rss_growth_%"] <= 10.0,
            "armt_time_linear (tokens/s within 25%)": all(
                0.75 <= r["speed_vs_first"] <= 1.25 for r in armt),
        }
        for name, ok in checks.items():
            print(f"{name}: {'PASS' if ok else 'FAIL'}")
    write_json("armt_streaming", {
        "command": " ".join(sys.argv), "lengths": lengths, "dense_lengths": dense, "segment_len": args.segment_len,
        "precision": precision, "precision_probe": probe, "sizes": SIZES, "rows": rows,
        "checks": checks, "table": table,
    })


if __name__ == "__main__":
    main()
